"""Frame-wise ResNet: preprocessing parity with the per-frame PIL path, weights, outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from video_features.models.resnet.extractor import ResNetExtractor, preprocess
from video_features.utils.config import make_config
from video_features.utils.errors import VideoError, WeightsError
from video_features.utils.transforms import to_device
from video_features.utils.video import open_frames


def pil_reference(frame: np.ndarray) -> torch.Tensor:
    """torchvision's ImageNet eval transform on one PIL image (what the reference tool runs)."""
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return tf(Image.fromarray(frame))


@pytest.mark.parametrize("size", [(320, 240), (240, 320), (250, 188)])
def test_batched_preprocessing_matches_pil_per_frame(make_video, size):
    w, h = size
    path = make_video(f"pp{w}x{h}.mp4", n_frames=6, fps=25.0, width=w, height=h)
    with open_frames(str(path)) as src:
        frames = next(iter(src.chunks(6))).frames
    ref = torch.stack([pil_reference(f) for f in frames])
    x = to_device(frames, torch.device("cpu"))
    level = 1 / 255 / 0.224  # one 8-bit level after the smallest std
    # CPU path (uint8 kernel): PIL's pixels but for a handful of rounding ties
    ours = preprocess(x)
    assert ours.shape == ref.shape == (6, 3, 224, 224)
    diff = (ours - ref).abs()
    assert diff.max().item() <= level + 1e-5
    assert (diff > 1e-5).float().mean().item() < 1e-4
    # device path (float, two 8-bit passes as on a GPU): rarely off, by at most two levels
    diff = (preprocess(x.float()) - ref).abs()
    assert diff.max().item() <= 2 * level + 1e-5
    assert (diff > 1e-5).float().mean().item() < 0.02


def _cfg(**kw):
    base = dict(timestamps_form="reference", video_paths=["x"], device="cpu", model_name="resnet18", batch_size=4)
    base.update(kw)
    return make_config("resnet", **base)


def test_features_shapes_and_values_through_official_layout(make_video, resnet_weights):
    resnet_weights("resnet18")
    path = make_video("r.mp4", n_frames=10, fps=25.0, width=96, height=72)
    ex = ResNetExtractor(_cfg(), torch.device("cpu"))
    out = ex.extract(str(path))
    assert set(out) == {"resnet", "fps", "timestamps_ms"}
    assert out["resnet"].shape == (10, 512) and out["resnet"].dtype == np.float32
    assert float(out["fps"]) == 25.0
    np.testing.assert_allclose(out["timestamps_ms"], np.arange(10) * 40.0)
    # independent computation: torchvision's model with the same checkpoint, PIL preprocessing
    import torchvision

    net = torchvision.models.resnet18()
    net.load_state_dict(torch.load(resnet_weights("resnet18"), weights_only=True))
    net.fc = torch.nn.Identity()
    net.eval()
    with open_frames(str(path)) as src:
        frames = np.concatenate([c.frames for c in src.chunks(5)])
    with torch.no_grad():
        ref = net(torch.stack([pil_reference(f) for f in frames])).numpy()
    np.testing.assert_allclose(out["resnet"], ref, rtol=0.02, atol=0.02 * np.abs(ref).max())
    assert ex.frames_read == 10


def test_resnet50_dim_and_short_video(make_video, resnet_weights):
    resnet_weights("resnet50")
    path = make_video("short.mp4", n_frames=3, fps=25.0, width=64, height=48)
    ex = ResNetExtractor(_cfg(model_name="resnet50", batch_size=32), torch.device("cpu"))
    out = ex.extract(str(path))  # shorter than one batch: still one row per frame
    assert out["resnet"].shape == (3, 2048)


def test_extraction_fps_changes_rows(make_video, resnet_weights):
    resnet_weights("resnet18")
    path = make_video("fps.mp4", n_frames=25, fps=25.0, width=64, height=48)
    out = ResNetExtractor(_cfg(extraction_fps=4), torch.device("cpu")).extract(str(path))
    assert out["resnet"].shape[0] == 4 and float(out["fps"]) == 4.0
    np.testing.assert_allclose(out["timestamps_ms"], [0, 250, 500, 750])


def test_show_pred_prints_top5(make_video, resnet_weights, capsys):
    resnet_weights("resnet18")
    path = make_video("sp.mp4", n_frames=2, fps=25.0, width=64, height=48)
    ResNetExtractor(_cfg(show_pred=True), torch.device("cpu")).extract(str(path))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "frame #" in ln]
    assert len(lines) == 2 and lines[1].count(":") == 6  # title + 5 "label: p"


def test_missing_weights_name_url_and_cache_path():
    with pytest.raises(WeightsError) as ei:
        ResNetExtractor(_cfg(model_name="resnet34"), torch.device("cpu"))
    msg = str(ei.value)
    assert "https://download.pytorch.org/models/resnet34-b627a593.pth" in msg
    assert "hub/checkpoints/resnet34-b627a593.pth" in msg


def test_explicit_checkpoint_path_and_layout_mismatch(tmp_path, make_video):
    from video_features.models.resnet.weights import write_random_checkpoint

    ck = write_random_checkpoint(tmp_path / "mine.pth", "resnet34")
    ex = ResNetExtractor(_cfg(model_name="resnet34", checkpoint_path=str(ck)), torch.device("cpu"))
    assert ex.extract(str(make_video("e.mp4", n_frames=2, width=64, height=48)))["resnet"].shape == (2, 512)
    with pytest.raises(WeightsError, match="does not fit the network"):
        ResNetExtractor(_cfg(model_name="resnet50", checkpoint_path=str(ck)), torch.device("cpu"))


def test_bad_video_raises_video_error(tmp_path, resnet_weights):
    resnet_weights("resnet18")
    ex = ResNetExtractor(_cfg(), torch.device("cpu"))
    bad = tmp_path / "bad.mp4"
    bad.write_text("nope")
    with pytest.raises(VideoError):
        ex.extract(str(bad))


@pytest.mark.parametrize("crops", ["5", "10"])
def test_crops_equal_torchvision_five_and_ten_crop_per_pil_frame(make_video, resnet_weights, crops):
    """crops=5/10: rows N x V x D equal torchvision's model on its FiveCrop / TenCrop of each
    PIL-resized frame; view 4 (the centre) is the crops=center row."""
    import torchvision

    resnet_weights("resnet18")
    path = make_video("crops.mp4", n_frames=4, fps=25.0, width=96, height=60)  # 409x256: odd margin
    ex = ResNetExtractor(_cfg(crops=crops, batch_size=3), torch.device("cpu"))
    out = ex.extract(str(path))
    views = int(crops)
    assert out["resnet"].shape == (4, views, 512)
    center = ResNetExtractor(_cfg(), torch.device("cpu")).extract(str(path))["resnet"]
    np.testing.assert_allclose(out["resnet"][:, 4], center, rtol=0, atol=1e-5 * np.abs(center).max())
    np.testing.assert_array_equal(out["timestamps_ms"], np.arange(4) * 40.0)

    net = torchvision.models.resnet18()
    net.load_state_dict(torch.load(resnet_weights("resnet18"), weights_only=True))
    net.fc = torch.nn.Identity()
    net.eval()
    crop = T.FiveCrop(224) if views == 5 else T.TenCrop(224)
    tail = T.Compose([T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with open_frames(str(path)) as src:
        frames = np.concatenate([c.frames for c in src.chunks(4)])
    with torch.no_grad():
        ref = torch.stack([net(torch.stack([tail(v) for v in crop(T.Resize(256)(Image.fromarray(f)))]))
                           for f in frames]).numpy()
    np.testing.assert_allclose(out["resnet"], ref, rtol=0.02, atol=0.02 * np.abs(ref).max())
    # the views are distinct crops, not copies of one
    assert not np.allclose(out["resnet"][:, 0], out["resnet"][:, 1])


def test_normalisation_constants_are_made_once_per_device_and_dtype():
    """Mean/std tensors are cached (building them per call is a blocking copy on a GPU) and give
    the same values as building them in place."""
    from video_features.utils.transforms import (IMAGENET_MEAN, IMAGENET_STD, channel_constant,
                                                 normalize)

    x = torch.rand(2, 3, 4, 5) * 255
    a, b = channel_constant(IMAGENET_MEAN, x), channel_constant(list(IMAGENET_MEAN), x)
    assert a is b and a.shape == (3, 1, 1) and a.dtype == x.dtype
    assert channel_constant(IMAGENET_MEAN, x.double()) is not a
    want = (x - torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)) / torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    assert torch.equal(normalize(x, IMAGENET_MEAN, IMAGENET_STD), want)
    with torch.inference_mode():
        made_inside = channel_constant((0.1, 0.2, 0.3), x)
    assert not made_inside.is_inference()   # usable outside inference mode too
