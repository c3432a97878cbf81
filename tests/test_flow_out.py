"""Optical flow as the output (feature_type raft / pwc): the size rule against the reference
tool's, the saved flow against the network run directly on PIL-resized frames, batching and
chunk boundaries, float16 / float32, the JPEG pairs, weights and errors, and a run through the
runner. Weights are random in the published layouts, loaded through the real cache path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from video_features.models import flow_weights
from video_features.models.flow_out.extractor import (PWCFlowExtractor, RAFTFlowExtractor, flow_size,
                                       quantise)
from video_features.utils.config import make_config
from video_features.utils.errors import ConfigError, VideoError, WeightsError
from video_features.utils.video import open_frames

CPU = torch.device("cpu")
EXTRACTORS = {"pwc": PWCFlowExtractor, "raft": RAFTFlowExtractor}


@pytest.fixture(scope="module", autouse=True)
def flow_checkpoints(hub_checkpoints):
    for card, kind in ((flow_weights.PWC_CARD, "pwc"), (flow_weights.RAFT_CARD, "raft"),
                       (flow_weights.RAFT_KITTI_CARD, "raft")):
        flow_weights.write_random_checkpoint(hub_checkpoints / card.filename, kind,
                                             seed=1 if card.name == "raft-kitti" else 0)


@pytest.fixture(scope="module")
def video(make_video):
    return make_video("flow7.mp4", n_frames=7, fps=25.0, width=128, height=96)


def _cfg(ft: str, **kw):
    base = dict(timestamps_form="reference", video_paths=["x"], device="cpu", batch_size=2)
    if ft == "raft":
        base["raft_iters"] = 3
    base.update(kw)
    return make_config(ft, **base)


def decode(path) -> np.ndarray:
    with open_frames(str(path)) as src:
        return np.concatenate([c.frames for c in src.chunks(8)])


def reference_size(w: int, h: int, size: int | None, smaller: bool) -> tuple[int, int]:
    """The reference tool's ResizeImproved rule on a PIL size (w, h) -> (w, h)."""
    if size is None or (w <= h and w == size) or (h <= w and h == size):
        return w, h
    if (w < h) == smaller:
        return size, int(size * h / w)
    return int(size * w / h), size


def direct_flow(ft: str, frames: np.ndarray, side_size, smaller=True, iters=3) -> np.ndarray:
    """The network on consecutive frames resized by PIL (bilinear) one by one, as the reference
    feeds them."""
    h, w = frames.shape[1:3]
    ow, oh = reference_size(w, h, side_size, smaller)
    pil = [np.asarray(Image.fromarray(f).resize((ow, oh), Image.BILINEAR)) if (ow, oh) != (w, h)
           else f for f in frames]
    x = torch.from_numpy(np.stack(pil)).permute(0, 3, 1, 2).float()
    if ft == "pwc":
        net = flow_weights.load_pwc()
        out = net.estimate(x[:-1], x[1:])
    else:
        net = flow_weights.load_raft()
        out = net.estimate(x[:-1], x[1:], iters=iters, unpad=True)
    return out.detach().numpy()


@pytest.mark.parametrize("w,h", [(640, 360), (360, 640), (256, 256), (300, 256), (256, 300),
                                 (99, 70)])
@pytest.mark.parametrize("size", [None, 128, 256])
@pytest.mark.parametrize("smaller", [True, False])
def test_size_rule_is_the_reference_tools(w, h, size, smaller):
    ow, oh = reference_size(w, h, size, smaller)
    assert flow_size(h, w, size, smaller) == (oh, ow)


@pytest.mark.parametrize("ft,side,smaller", [("pwc", None, True), ("pwc", 40, True),
                                             ("raft", 100, False), ("raft", None, True)])
def test_flow_equals_the_network_on_pil_resized_frames(ft, side, smaller, video):
    frames = decode(video)
    with torch.inference_mode():
        expect = direct_flow(ft, frames, side, smaller)
    out = EXTRACTORS[ft](_cfg(ft, side_size=side, resize_to_smaller_edge=smaller,
                              dtype="float32"), CPU).extract(str(video))
    flow = np.asarray(out[ft])
    assert flow.dtype == np.float32 and flow.shape == expect.shape
    assert flow.shape[0] == len(frames) - 1 and flow.shape[1] == 2
    # PIL's and our resize agree but for rare one-level differences; the flow follows closely
    scale = np.abs(expect).max()
    assert np.abs(flow - expect).max() <= 1e-4 * scale if side is None else \
        np.abs(flow - expect).mean() <= 1e-3 * scale
    assert len(out["timestamps_ms"]) == len(frames)
    np.testing.assert_allclose(np.diff(out["timestamps_ms"]), 40.0, atol=1e-6)
    assert float(out["fps"]) == pytest.approx(25.0)


def test_batches_and_chunks_do_not_change_the_flow_and_float16_is_its_rounding(video):
    one = np.asarray(PWCFlowExtractor(_cfg("pwc", batch_size=1, dtype="float32"), CPU)
                     .extract(str(video))["pwc"])
    three = PWCFlowExtractor(_cfg("pwc", batch_size=3, dtype="float32"), CPU)
    three.chunk_frames = lambda: 2  # pairs cross every chunk boundary
    np.testing.assert_allclose(np.asarray(three.extract(str(video))["pwc"]), one, rtol=0,
                               atol=1e-5 * np.abs(one).max())
    # float16 is the float32 flow of the same batches, rounded
    full = PWCFlowExtractor(_cfg("pwc", batch_size=3, dtype="float32"), CPU).extract(str(video))
    half = PWCFlowExtractor(_cfg("pwc", batch_size=3), CPU).extract(str(video))["pwc"]
    assert half.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(half), np.asarray(full["pwc"]).astype(np.float16))


def test_rows_go_to_disk_not_memory(video):
    ex = PWCFlowExtractor(_cfg("pwc"), CPU)
    held = []
    orig = ex.keep_rows

    def spy(work, key, rows, stamps):
        orig(work, key, rows, stamps)
        held.append(sum(len(r) for r in work.rows.get(key, [])))
    ex.keep_rows = spy
    out = ex.extract(str(video))
    assert held and max(held) == 0           # nothing kept on the work item
    assert isinstance(out["pwc"], np.memmap)  # the array is read back from the spill file


def test_batches_that_run_out_of_memory_are_halved_for_the_rest_of_the_run(video, monkeypatch,
                                                                            caplog):
    ex = PWCFlowExtractor(_cfg("pwc", batch_size=6, dtype="float32"), CPU)
    want = np.array(ex.extract(str(video))["pwc"])
    real, sizes = ex.estimate, []

    def limited(a, b):
        sizes.append(len(a))
        if len(a) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(a, b)

    monkeypatch.setattr(ex, "estimate", limited)
    with caplog.at_level("WARNING"):
        first = np.array(ex.extract(str(video))["pwc"])
        second = np.array(ex.extract(str(video))["pwc"])
    # the 6 pairs go as one batch that fails and is split; the next video's batches are 3 pairs
    assert sizes == [6, 3, 3, 3, 3] and ex.batch_size_of("flow") == 3
    assert sum("ran out of GPU memory" in r.message for r in caplog.records) == 1
    np.testing.assert_allclose(first, want, atol=1e-5)
    np.testing.assert_allclose(second, want, atol=1e-5)


def test_jpg_pairs_in_the_pytorch_i3d_layout(video, tmp_path):
    from video_features.utils.runner import run

    frames = decode(video)
    flow = np.array(PWCFlowExtractor(_cfg("pwc", dtype="float32"), CPU).extract(str(video))["pwc"])
    bound = round(float(np.abs(flow).max()) * 0.8, 3)  # random weights: a bound the flow fills
    cfg = _cfg("pwc", video_paths=[str(video)], on_extraction="save_numpy",
               output_path=str(tmp_path / "out"), input_root=str(video.parent),
               flow_format="jpg", flow_bound=bound, progress=False)
    assert run(cfg).count("done") == 1
    folder = tmp_path / "out" / "pwc" / video.stem
    names = sorted(p.name for p in folder.iterdir())
    n = len(frames) - 1
    assert names == sorted(f"{video.stem}-{i:06d}{a}.jpg" for i in range(1, n + 1) for a in "xy")
    levels = quantise(torch.from_numpy(flow), bound).numpy().astype(int)
    assert levels.min() <= 1 and levels.max() - levels.min() > 50
    np.testing.assert_array_equal(  # the quantisation rule, computed independently
        levels, np.clip(np.round(128 + 255 / (2 * bound) * np.clip(flow, -bound, bound)), 0, 255))
    for i in (1, n):
        for c, a in enumerate("xy"):
            img = np.asarray(Image.open(folder / f"{video.stem}-{i:06d}{a}.jpg"))
            assert img.shape == flow.shape[2:] and img.dtype == np.uint8
            # JPEG at quality 95: a level or two off on average
            assert np.abs(img.astype(int) - levels[i - 1, c]).mean() < 2.0
    saved = {p.name for p in (tmp_path / "out" / "pwc").glob("*.npy")}
    assert saved == {f"{video.stem}_fps.npy", f"{video.stem}_timestamps_ms.npy"}
    assert not list((tmp_path / "out" / "pwc").glob(".*.tmp"))


def test_finetuned_on_picks_the_checkpoint(video):
    cfg = _cfg("raft", finetuned_on="kitti", dtype="float32")
    card, _ = RAFTFlowExtractor.weights_for(cfg)["raft"]
    assert card.name == "raft-kitti" and card.filename == "raft-kitti.pth"
    kitti = np.asarray(RAFTFlowExtractor(cfg, CPU).extract(str(video))["raft"])
    sintel = np.asarray(RAFTFlowExtractor(_cfg("raft", dtype="float32"), CPU)
                        .extract(str(video))["raft"])
    assert np.abs(kitti - sintel).max() > 1e-3  # another file, another network


def test_missing_weights_name_the_url(tmp_path, monkeypatch, video):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    card = flow_weights.RAFT_KITTI_CARD
    with pytest.raises(WeightsError) as err:
        RAFTFlowExtractor(_cfg("raft", finetuned_on="kitti"), CPU)
    assert card.url in str(err.value) and f"hub/checkpoints/{card.filename}" in str(err.value)


@pytest.mark.parametrize("ft,kw,match", [
    ("pwc", dict(dtype="int8"), "dtype"),
    ("pwc", dict(flow_format="png"), "flow_format"),
    ("pwc", dict(flow_format="jpg", on_extraction="print"), "flow_format"),
    ("pwc", dict(flow_bound=0.0), "flow_bound"),
    ("pwc", dict(side_size=4), "side_size"),
    ("raft", dict(finetuned_on="chairs"), "finetuned_on"),
])
def test_invalid_options_name_the_option(ft, kw, match):
    with pytest.raises(ConfigError, match=match):
        EXTRACTORS[ft](_cfg(ft, **kw), CPU)


def test_frames_too_small_for_raft_are_a_video_error(make_video):
    small = make_video("flow_small.mp4", n_frames=3, width=64, height=48)
    with pytest.raises(VideoError, match="too small for RAFT"):
        RAFTFlowExtractor(_cfg("raft"), CPU).extract(str(small))
    out = RAFTFlowExtractor(_cfg("raft", side_size=64), CPU).extract(str(small))
    assert out["raft"].shape == (2, 2, 64, 85)


def test_bad_inputs_fail_alone_with_a_reason(make_video, video, tmp_path):
    from video_features.utils.runner import run

    one = make_video("flow1.mp4", n_frames=1, width=64, height=48)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(VideoError, match="at least 2 frames"):
        PWCFlowExtractor(_cfg("pwc"), CPU).extract(str(one))
    cfg = _cfg("pwc", video_paths=[str(one), str(broken), str(video)], on_extraction="save_numpy",
               output_path=str(tmp_path / "out"), progress=False)
    summary = run(cfg)
    assert summary.count("done") == 1 and summary.count("failed") == 2
    saved = list((tmp_path / "out" / "pwc").rglob("*_pwc.npy"))
    assert len(saved) == 1 and np.load(saved[0]).shape[:2] == (6, 2)
