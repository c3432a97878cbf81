"""R(2+1)D-18 clip features: windows and timestamps, the reference preprocessing recomputed with
plain torch ops, features against torchvision's own r2plus1d_18, errors and the alias.

The checkpoint is a random torchvision state dict written under the card's file name in the
private torch hub cache, so the extractor loads it through the real path.
"""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.r21d.extractor import R21DExtractor, preprocess
from models.r21d.weights import CARD, labels, write_random_checkpoint
from models.registry import get_extractor_class
from utils.config import make_config, parse_args
from utils.errors import ConfigError, VideoError, WeightsError
from utils.transforms import to_device

CPU = torch.device("cpu")
W, H = 64, 48
FPS = 25.0
MEAN = (0.43216, 0.394666, 0.37645)
STD = (0.22803, 0.22145, 0.216989)


@pytest.fixture(scope="session")
def r21d_weights(hub_checkpoints):
    path = hub_checkpoints / CARD.filename
    write_random_checkpoint(path)   # seeded: rewriting gives the same weights
    return path


def _cfg(**kw):
    base = dict(video_paths=["x"], device="cpu", stack_size=4, step_size=4, batch_size=2)
    base.update(kw)
    return make_config("r21d", **base)


def _extract(path, **kw):
    ex = R21DExtractor(_cfg(**kw), CPU)
    return ex, ex.extract(str(path))


def expected_stack_ends(n_frames: int, stack: int, step: int, tail: str) -> list[int]:
    """Index of each clip's last frame: clips of ``stack`` frames start every ``step`` frames;
    with tail='pad' one more clip starts at the next position if a frame is left there, and
    ends at the last frame."""
    ends, s = [], 0
    while s + stack <= n_frames:
        ends.append(s + stack - 1)
        s += step
    if tail == "pad" and s < n_frames:
        ends.append(n_frames - 1)
    return ends


def decode_rgb(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def reference_preprocess(frames: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, 112, 112), the reference recipe step by step."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(128, 171), mode="bilinear", align_corners=False)  # no antialias
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    h, w = x.shape[-2:]
    top, left = int(round((h - 112) / 2)), int(round((w - 112) / 2))
    return x[..., top:top + 112, left:left + 112]


@pytest.fixture(scope="module")
def video20(make_video):
    return make_video("r21d20.mp4", n_frames=20, fps=FPS, width=W, height=H)


def test_preprocess_matches_reference_recipe(make_video):
    for w, h in ((W, H), (90, 50)):   # 4:3 and a wide frame: the output size is fixed anyway
        frames = decode_rgb(make_video(f"r21d_pp{w}x{h}.mp4", n_frames=3, width=w, height=h))
        ours = preprocess(to_device(frames, CPU))
        want = reference_preprocess(frames)
        assert ours.shape == want.shape == (3, 3, 112, 112) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)   # measured: identical


def test_features_match_torchvision_r2plus1d_18(r21d_weights, video20):
    # 20 frames, clips of 8 every 8: 2 clips; decoding runs in chunks of 16 frames, so the
    # second clip straddles a chunk boundary
    ex, out = _extract(video20, stack_size=8, step_size=8)
    assert list(out) == ["r21d", "fps", "timestamps_ms"]
    assert out["r21d"].shape == (2, 512) and out["r21d"].dtype == np.float32
    assert float(out["fps"]) == FPS
    np.testing.assert_allclose(out["timestamps_ms"], [7 / FPS * 1000, 15 / FPS * 1000])
    assert ex.frames_read == 20

    import torchvision

    net = torchvision.models.video.r2plus1d_18(weights=None)
    net.load_state_dict(torch.load(r21d_weights, weights_only=True))
    net.fc = torch.nn.Identity()
    net.eval()
    x = reference_preprocess(decode_rgb(video20)[:16])             # (16, 3, 112, 112)
    clips = x.reshape(2, 8, 3, 112, 112).permute(0, 2, 1, 3, 4)    # (B, C, T, H, W)
    with torch.no_grad():
        want = net(clips).numpy()
    # the same float ops in the same order: measured identical (max |diff| 0.0)
    np.testing.assert_allclose(out["r21d"], want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.abs(want[0] - want[1]).max() > 1e-2 * np.abs(want).max()   # the check has teeth


class _Probe(torch.nn.Module):
    """Stands in for the network where only the windowing is under test: the "feature" of a
    clip is the mean of each of its frames (one number per frame, zero-padded to 512)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:    # (B, C, T, H, W)
        m = x.mean(dim=(1, 3, 4))
        return F.pad(m, (0, 512 - m.shape[1]))


@pytest.mark.parametrize("n,stack,step,tail", [
    (13, 4, 4, "drop"),
    (13, 4, 3, "drop"),   # overlapping
    (13, 3, 5, "drop"),   # gaps between clips
    (13, 4, 6, "pad"),    # padded tail clip after a gap
    (13, 4, 3, "pad"),    # 13 = 3 * 3 + 4: nothing left over, no extra clip
    (20, 16, 16, "drop"),  # the defaults' clip length; frames 16-19 are dropped
    (20, 16, 2, "pad"),    # overlapping across the 16-frame decoding chunks, padded tail
])
def test_window_counts_timestamps_and_contents(make_video, monkeypatch, n, stack, step, tail):
    monkeypatch.setattr("models.r21d.extractor.load_r21d", lambda cfg, device: _Probe())
    path = make_video(f"r21d{n}.mp4", n_frames=n, fps=FPS, width=W, height=H)
    _, single = _extract(path, stack_size=1, step_size=1)       # row i: mean of frame i
    frame_mean = single["r21d"][:, 0]
    assert len(frame_mean) == n
    _, out = _extract(path, stack_size=stack, step_size=step, tail=tail, batch_size=3)
    ends = expected_stack_ends(n, stack, step, tail)
    assert out["r21d"].shape == (len(ends), 512) and out["r21d"].dtype == np.float32
    np.testing.assert_allclose(out["timestamps_ms"], np.array(ends) / FPS * 1000)
    for k, row in enumerate(out["r21d"]):  # clip k: frames k*step ..., the last one repeated
        idx = np.minimum(np.arange(k * step, k * step + stack), n - 1)
        np.testing.assert_allclose(row[:stack], frame_mean[idx], rtol=0, atol=1e-6)
        assert not row[stack:].any()


def test_extraction_fps_changes_the_count(r21d_weights, make_video):
    path = make_video("r21d13.mp4", n_frames=13, fps=FPS, width=W, height=H)
    _, out = _extract(path, stack_size=2, step_size=2, extraction_fps=10)
    n10 = int(np.floor(13 / FPS * 10 + 0.5))                       # 0.52 s at 10 fps: 5 frames
    ends = expected_stack_ends(n10, 2, 2, "drop")
    assert float(out["fps"]) == 10.0 and out["r21d"].shape == (len(ends), 512) == (2, 512)
    np.testing.assert_allclose(out["timestamps_ms"], np.array(ends) / 10 * 1000)


def test_too_short_raises_video_error(r21d_weights, make_video):
    path = make_video("r21d3.mp4", n_frames=3, fps=FPS, width=W, height=H)
    with pytest.raises(VideoError, match="stack_size"):
        _extract(path, stack_size=4)
    _, out = _extract(path, stack_size=4, tail="pad")
    assert out["r21d"].shape == (1, 512)
    np.testing.assert_allclose(out["timestamps_ms"], [2 / FPS * 1000])


def test_show_pred_numbers_clips_across_batches(r21d_weights, make_video, capsys):
    path = make_video("r21d13.mp4", n_frames=13, fps=FPS, width=W, height=H)
    _extract(path, show_pred=True, stack_size=4, step_size=4, batch_size=2)  # batches of 2 + 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " stack #" in ln]
    assert [ln.split(" stack #")[1].split(":")[0] for ln in lines] == ["0", "1", "2"]
    names = set(labels())
    assert len(names) == 400
    for ln in lines:
        preds = ln.split(" stack #", 1)[1].split(": ", 1)[1].split("  ")
        assert len(preds) == 5 and all(p.rsplit(": ", 1)[0] in names for p in preds)


def test_alias_r21d_rgb():
    cfg = make_config("r21d_rgb", video_paths=["a.mp4"], device="cpu")
    assert cfg.feature_type == "r21d" and cfg.stack_size == 16 and cfg.step_size == 16
    assert get_extractor_class(cfg.feature_type) is R21DExtractor
    cfg = parse_args(["--feature_type", "r21d_rgb", "--device", "cpu", "--video_paths", "a.mp4",
                      "stack_size=8"])
    assert cfg.feature_type == "r21d" and cfg.stack_size == 8


@pytest.mark.parametrize("option,value", [("stack_size", 0), ("step_size", -1), ("tail", "x")])
def test_invalid_options_name_the_option(option, value):
    with pytest.raises(ConfigError, match=option):
        make_config("r21d", video_paths=["a.mp4"], device="cpu", **{option: value})


def test_missing_weights_name_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsError) as ei:
        R21DExtractor(_cfg(), CPU)
    msg = str(ei.value)
    assert "https://download.pytorch.org/models/r2plus1d_18-91a641e6.pth" in msg
    assert "hub/checkpoints/r2plus1d_18-91a641e6.pth" in msg
