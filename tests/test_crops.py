"""crops=center|5|10 across the visual feature types: the views themselves (torchvision's
FiveCrop / TenCrop), the option's checks, batch sizes, records and saved layouts. Each family's
own test module checks its views against its upstream preprocessing or network."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from tests.conftest import run_main
from video_features.utils.config import make_config, parse_configs
from video_features.utils.errors import ConfigError
from video_features.utils.runner import run
from video_features.utils.transforms import center_crop, crop_views

VISUAL = ("resnet", "i3d", "r21d", "s3d", "tv_video", "videomae", "clip", "timm")


@pytest.mark.parametrize("hw,size", [((256, 455), 224), ((257, 300), 224), ((128, 171), 112),
                                     ((60, 80), (40, 30))])
@pytest.mark.parametrize("crops", ["5", "10"])
def test_views_are_torchvision_five_and_ten_crop(hw, size, crops):
    x = torch.rand(3, 2, 3, *hw)          # any leading axes (frames, stack elements)
    ours = crop_views(x, size, crops, lambda y: center_crop(y, size))
    want = (TF.five_crop if crops == "5" else TF.ten_crop)(x, list(size) if isinstance(size, tuple) else [size, size])
    assert ours.shape == (3, 2, int(crops), 3, *want[0].shape[-2:])
    for v, view in enumerate(want):
        assert torch.equal(ours[:, :, v], view), v


def test_the_centre_view_is_the_feature_types_own():
    x = torch.rand(1, 3, 256, 343)        # margin 119: floor 59, round 60
    floor = crop_views(x, 224, "5", lambda y: center_crop(y, 224, offset="floor"))
    assert torch.equal(floor[:, 4], center_crop(x, 224, offset="floor"))
    assert torch.equal(crop_views(x, 224, "center", lambda y: center_crop(y, 224, "floor")),
                       floor[:, 4])


def test_a_side_shorter_than_the_crop_is_kept_whole():
    x = torch.rand(2, 3, 223, 300)        # s3d's reference resize can floor a side to 223
    views = crop_views(x, 224, "10", lambda y: y[..., :224, 38:262])
    assert views.shape == (2, 10, 3, 223, 224)


@pytest.mark.parametrize("ft", VISUAL)
def test_every_visual_type_has_the_option_with_center_by_default(ft):
    extra = {"model_name": "x"} if ft == "videomae" else {}
    assert make_config(ft, video_paths=["a.mp4"], device="cpu", **extra).crops == "center"
    assert make_config(ft, video_paths=["a.mp4"], device="cpu", crops="10", **extra).crops == "10"


@pytest.mark.parametrize("ft", ["vggish", "clap", "raft", "pwc", "null"])
def test_types_without_frames_to_crop_refuse_it(ft):
    with pytest.raises(ConfigError, match=f"unknown option 'crops' for feature_type={ft}"):
        make_config(ft, video_paths=["a.mp4"], device="cpu", crops="5")


def test_invalid_crops_name_the_option():
    with pytest.raises(ConfigError, match="crops"):
        make_config("resnet", video_paths=["a.mp4"], device="cpu", crops="3")
    result = run_main("--feature_type", "resnet", "--video_paths", "a.mp4", "--device", "cpu",
                      "crops=four")
    assert result.returncode == 2 and "crops" in result.stderr and "Traceback" not in result.stderr


def test_auto_batch_sizes_count_the_views():
    def batch(ft, **kw):
        return make_config(ft, video_paths=["a.mp4"], device="cpu", **kw).batch_size

    assert batch("resnet") == 8 and batch("resnet", crops="5") == 1 and batch("resnet", crops="10") == 1
    assert batch("vggish") == 64          # no crops: untouched
    assert batch("resnet", crops="10", batch_size=3) == 3   # an explicit value counts frames


def test_several_types_share_the_option_where_they_have_it():
    cfgs = parse_configs(["--feature_type", "resnet", "vggish", "--video_paths", "a.mp4",
                          "--device", "cpu", "crops=10"])
    by_type = {c.feature_type: c for c in cfgs}
    assert by_type["resnet"].crops == "10" and "crops" not in by_type["vggish"]


def test_saved_layouts_and_records_hold_the_views(tmp_path, make_video, resnet_weights):
    resnet_weights("resnet18")
    video = make_video("crops_rec.mp4", n_frames=5, fps=25.0, width=64, height=48)
    out = tmp_path / "out"

    def cfg(**kw):
        return make_config("resnet", video_paths=[str(video)], device="cpu", model_name="resnet18",
                           on_extraction="save_numpy", output_path=str(out),
                           input_root=str(video.parent), **kw)

    assert run(cfg()).count("done") == 1
    feats = out / "resnet" / "crops_rec_resnet.npy"
    center = np.load(feats)
    assert center.shape == (5, 512)
    s = run(cfg(crops="10"))              # other crops: recomputed, not reused
    assert s.count("done") == 1
    ten = np.load(feats)
    assert ten.shape == (5, 10, 512)
    np.testing.assert_allclose(ten[:, 4], center, rtol=0, atol=1e-5 * np.abs(center).max())
    meta = json.loads((out / "resnet" / "crops_rec_meta.json").read_text())
    assert meta["record"]["options"]["crops"] == "10"
    assert meta["outputs"]["resnet"]["shape"] == [5, 10, 512]
    assert run(cfg(crops="10")).count("skipped") == 1

    h5 = tmp_path / "h5"
    s = run(make_config("resnet", video_paths=[str(video)], device="cpu", model_name="resnet18",
                        on_extraction="save_hdf5", output_path=str(h5), input_root=str(video.parent),
                        crops="5", dtype="float16"))
    assert s.count("done") == 1
    with h5py.File(h5 / "resnet.h5") as f:
        rows = f["crops_rec"]["resnet"][()]
    assert rows.shape == (5, 5, 512) and rows.dtype == np.float16
    np.testing.assert_allclose(rows[:, :5], ten[:, :5], rtol=0, atol=2e-3 * np.abs(ten).max())
