"""I3D two-stream extractor: windows and timestamps, the I3D input mapping, parity with an
independent per-frame re-computation, stream selection, frame folders, weights and options.

Checkpoints are random weights written in the published layouts under the card file names in the
private torch hub cache, so every extractor here loads them through the real path. The PWC-Net
checkpoint has its last refiner layer scaled up so that the random network's flow spans several
pixels (up to the [-20, 20] clamp); with plain random weights it is ~0.1 px, which would
leave the flow stream nearly constant and the flow checks toothless.

Frames of every video are 64x48 (resized to 341x256 inside), stacks are short, and PWC-Net /
RAFT run on as few pairs as the checks need: flow is what costs time on a CPU. Where only the
windowing is under test, cheap stand-ins replace the networks.
"""
from __future__ import annotations

import logging
import shutil

import av
import numpy as np
import pytest
import torch
from PIL import Image

from video_features.models.i3d.extractor import I3DExtractor, flow_to_i3d, rgb_to_i3d
from video_features.models.i3d.weights import get_card, load_labels
from video_features.models.i3d.weights import write_random_checkpoint as write_i3d
from video_features.models import flow_weights
from tests.conftest import run_main
from video_features.utils.config import make_config, parse_args
from video_features.utils.errors import ConfigError, VideoError, WeightsError

CPU = torch.device("cpu")
W, H = 64, 48            # source frames; resized to short side 256 -> 341x256
FPS = 25.0
PWC_GAIN = 20.0          # scale of the PWC refiner's last layer in the random checkpoint


# -- checkpoints ---------------------------------------------------------------------------------
def _write_i3d_card(hub, name: str) -> None:
    card = get_card(name)
    write_i3d(hub / card.filename, card.layout, card.extra["stream"], card.num_classes)


def _write_pwc(hub) -> None:
    path = flow_weights.write_random_checkpoint(hub / flow_weights.PWC_CARD.filename, "pwc")
    state = torch.load(path, weights_only=True)
    for key in ("moduleRefiner.moduleMain.12.weight", "moduleRefiner.moduleMain.12.bias"):
        state[key] = state[key] * PWC_GAIN
    torch.save(state, path)


@pytest.fixture(scope="session")
def i3d_weights(hub_checkpoints):
    _write_i3d_card(hub_checkpoints, "i3d_rgb")
    _write_i3d_card(hub_checkpoints, "i3d_flow")
    _write_pwc(hub_checkpoints)
    return hub_checkpoints


@pytest.fixture(scope="session")
def charades_weights(hub_checkpoints):
    for name in ("pytorch_i3d_rgb_charades", "pytorch_i3d_flow_charades"):
        _write_i3d_card(hub_checkpoints, name)
    return hub_checkpoints


@pytest.fixture(scope="session")
def raft_weights(hub_checkpoints):
    return flow_weights.write_random_checkpoint(
        hub_checkpoints / flow_weights.RAFT_CARD.filename, "raft")


# -- helpers -------------------------------------------------------------------------------------
def _cfg(**kw):
    base = dict(timestamps_form="reference", video_paths=["x"], device="cpu", stack_size=4, step_size=4, batch_size=2)
    base.update(kw)
    return make_config("i3d", **base)


def _extract(path, **kw):
    ex = I3DExtractor(_cfg(**kw), CPU)
    return ex, ex.extract(str(path))


def expected_stack_ends(n_frames: int, stack: int, step: int, tail: str) -> list[int]:
    """Index of the last frame of every stack, counted directly from the definition: a stack
    starting at frame s reads frames s .. s + stack (stack + 1 frames, flow needs pairs), stacks
    start every ``step`` frames; with tail='pad' one more stack starts at the next position when
    at least one more pair of frames is left, and ends at the video's last frame."""
    ends, s = [], 0
    while s + stack <= n_frames - 1:
        ends.append(s + stack)
        s += step
    if tail == "pad" and s < n_frames - 1:
        ends.append(n_frames - 1)
    return ends


def decode_rgb(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def pil_resize_short_256(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    size = (int(256 * w / h), 256) if h <= w else (256, int(256 * h / w))
    return np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR))


def features_close(got: np.ndarray, want: np.ndarray, rel: float) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max())


@pytest.fixture(scope="module")
def video9(make_video):
    return make_video("i3d9.mp4", n_frames=9, fps=FPS, width=W, height=H)


@pytest.fixture(scope="module")
def video5(make_video):
    return make_video("i3d5.mp4", n_frames=5, fps=FPS, width=W, height=H)


@pytest.fixture(scope="module")
def base_run(i3d_weights, video9):
    """Both streams, stack 4, step 4 over 9 frames: 2 stacks (frames 0-4 and 4-8). Decoding
    runs in chunks of 8 frames, so the second stack straddles a chunk boundary."""
    ex, out = _extract(video9)
    return ex, out


# -- 1. outputs, window counts, timestamps ---------------------------------------------------------
def test_two_stream_outputs(base_run):
    ex, out = base_run
    assert list(out) == ["rgb", "flow", "fps", "timestamps_ms"] == list(ex.output_keys)
    for s in ("rgb", "flow"):
        assert out[s].shape == (2, 1024) and out[s].dtype == np.float32
        assert np.isfinite(out[s]).all()
    assert not np.allclose(out["rgb"][0], out["rgb"][1])      # features follow the content
    assert not np.allclose(out["flow"][0], out["flow"][1])
    assert out["fps"].dtype == np.float64 and float(out["fps"]) == FPS
    np.testing.assert_allclose(out["timestamps_ms"],
                               [e / FPS * 1000 for e in expected_stack_ends(9, 4, 4, "drop")])
    np.testing.assert_allclose(out["timestamps_ms"], [160.0, 320.0])
    assert ex.frames_read == 9


class _Probe:
    """Stands in for an I3D net where only the windowing is under test: the "feature" of a stack
    is the mean of each of its elements (one number per element, zero-padded to 1024)."""

    num_classes = 400

    def features(self, x: torch.Tensor) -> torch.Tensor:   # (B, C, T, H, W)
        m = x.mean(dim=(1, 3, 4))
        return torch.nn.functional.pad(m, (0, 1024 - m.shape[1]))


class _FakeFlow:
    """A cheap stand-in for PWC-Net: the "flow" of a pair is a scaled frame difference, so every
    element's flow is distinct, and an element whose flow was skipped (zeros, not even the
    mapped 0 px = 128 level) shows."""

    def estimate(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b - a)[:, :2] * 0.25


@pytest.fixture
def probe_nets(monkeypatch):
    monkeypatch.setattr("video_features.models.i3d.extractor.load_i3d", lambda *a, **k: _Probe())
    monkeypatch.setattr(flow_weights, "load_pwc", lambda *a, **k: _FakeFlow())


@pytest.mark.parametrize("n,stack,step,tail", [
    (13, 4, 2, "drop"),   # overlapping
    (13, 4, 4, "drop"),   # back to back
    (13, 4, 5, "drop"),   # gaps between stacks: the flow of skipped elements is not computed
    (13, 3, 5, "drop"),
    (13, 6, 4, "drop"),
    (13, 2, 3, "drop"),   # a stack (elements 6, 7) across the 8-frame decoding chunks
    (13, 4, 3, "pad"),    # padded tail stack after 3 full ones
    (13, 4, 5, "pad"),    # padded tail after a gap
    (13, 4, 4, "pad"),    # pad with nothing left over: no extra stack
    (10, 3, 2, "drop"),
    (10, 3, 4, "pad"),
    (10, 9, 1, "drop"),   # one stack using every frame
    (10, 12, 3, "pad"),   # shorter than a stack: one padded stack
])
def test_window_counts_timestamps_and_contents(make_video, probe_nets, n, stack, step, tail):
    path = make_video(f"i3d{n}.mp4", n_frames=n, fps=FPS, width=W, height=H)
    # every element on its own: row i holds the mean of element i (frame i, its flow to i + 1)
    _, single = _extract(path, stack_size=1, step_size=1)
    elem = {s: single[s][:, 0] for s in ("rgb", "flow")}
    assert len(elem["rgb"]) == n - 1
    assert (np.abs(elem["flow"]) > 1e-4).all()    # distinguishable from a skipped (zero) element
    _, out = _extract(path, stack_size=stack, step_size=step, tail=tail)
    ends = expected_stack_ends(n, stack, step, tail)
    np.testing.assert_allclose(out["timestamps_ms"], np.array(ends) / FPS * 1000)
    for s in ("rgb", "flow"):
        assert out[s].shape == (len(ends), 1024) and out[s].dtype == np.float32
        for k, row in enumerate(out[s]):  # stack k: elements k*step ..., the last one repeated
            idx = np.minimum(np.arange(k * step, k * step + stack), n - 2)
            np.testing.assert_allclose(row[:stack], elem[s][idx], rtol=0, atol=1e-6)
            assert not row[stack:].any()


def test_extraction_fps_changes_the_count(i3d_weights, make_video):
    path = make_video("i3d13.mp4", n_frames=13, fps=FPS, width=W, height=H)
    _, native = _extract(path, streams=["rgb"], stack_size=2, step_size=2)
    assert native["rgb"].shape[0] == len(expected_stack_ends(13, 2, 2, "drop")) == 6
    _, out = _extract(path, streams=["rgb"], stack_size=2, step_size=2, extraction_fps=10)
    # 13 frames at 25 fps last 0.52 s: 5 frames at 10 fps (slots 0 .. 4), 2 stacks
    n10 = int(np.floor(13 / FPS * 10 + 0.5))
    ends = expected_stack_ends(n10, 2, 2, "drop")
    assert float(out["fps"]) == 10.0
    assert out["rgb"].shape == (len(ends), 1024) == (2, 1024)
    np.testing.assert_allclose(out["timestamps_ms"], np.array(ends) / 10 * 1000)
    np.testing.assert_allclose(out["timestamps_ms"], [200.0, 400.0])


# -- 2. stream selection -------------------------------------------------------------------------
def test_rgb_only(base_run, video9):
    _, both = base_run
    ex, out = _extract(video9, streams=["rgb"])
    assert list(out) == ["rgb", "fps", "timestamps_ms"]
    assert I3DExtractor.output_keys_for(ex.cfg) == ("rgb", "fps", "timestamps_ms") == ex.output_keys
    assert ex.flow_net is None and set(ex.nets) == {"rgb"}
    features_close(out["rgb"], both["rgb"], 1e-5)   # the other stream changes nothing
    np.testing.assert_array_equal(out["timestamps_ms"], both["timestamps_ms"])


def test_stream_order_does_not_change_features(base_run, video9):
    _, both = base_run
    _, out = _extract(video9, streams=["flow", "rgb"], step_size=8)   # one stack, frames 0-4
    assert list(out) == ["flow", "rgb", "fps", "timestamps_ms"]
    features_close(out["rgb"][0], both["rgb"][0], 1e-5)
    features_close(out["flow"][0], both["flow"][0], 1e-4)


def _pool_like_i3d(maps: np.ndarray) -> np.ndarray:
    """The published pooling of Mixed_5c maps: (2, 7, 7) window, stride 1, then the mean of
    what is left, as I3D.features does after feature_maps."""
    t = torch.from_numpy(maps)
    pooled = torch.nn.functional.avg_pool3d(t, (min(2, t.shape[2]), 7, 7), stride=1)
    return pooled.mean(dim=(2, 3, 4)).numpy()


def test_flow_only_with_spatial_maps(base_run, video9):
    _, both = base_run
    # step 8: one stack (frames 0-4); the flow of elements 4-7 is not needed and not computed
    ex, out = _extract(video9, streams=["flow"], step_size=8, spatial=True)
    assert list(out) == ["flow", "fps", "timestamps_ms"]
    assert I3DExtractor.output_keys_for(ex.cfg) == ("flow", "fps", "timestamps_ms") == ex.output_keys
    assert set(ex.nets) == {"flow"}
    maps = out["flow"]
    assert maps.shape == (1, 1024, 1, 7, 7) and maps.dtype == np.float32   # (Tv, 1024, t, 7, 7)
    features_close(_pool_like_i3d(maps)[0], both["flow"][0], 1e-4)
    np.testing.assert_allclose(out["timestamps_ms"], [160.0])


# -- 3. the input mapping ------------------------------------------------------------------------
def test_flow_to_i3d_by_hand():
    f = torch.tensor([-25.0, -20.0, -0.1, 0.0, 0.07, 3.3, 20.0, 31.0])
    # clamp to [-20, 20]; 128 + 6.375 f = 0.5, 0.5, 127.3625, 128, 128.44625, 149.0375, 255.5,
    # 255.5; rounded half to even (torch.round, as the reference tool does): 0 and 256 at the
    # clamp limits (so +20 maps just above 1, exactly as in the reference)
    levels = np.array([0, 0, 127, 128, 128, 149, 256, 256], dtype=np.float64)
    want = 2 * levels / 255 - 1
    got = flow_to_i3d(f)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.numpy()[[0, 3, 5, 6]], [-1.0, 1 / 255, 43 / 255, 257 / 255],
                               atol=1e-6)
    # shape is kept and every value sits on the 8-bit grid
    x = torch.linspace(-30, 30, 2 * 3 * 7).reshape(2, 3, 7)
    q = (flow_to_i3d(x) + 1) * 255 / 2
    assert q.shape == x.shape
    torch.testing.assert_close(q, q.round(), atol=1e-4, rtol=0)


def test_rgb_to_i3d_by_hand():
    x = torch.tensor([0.0, 1.0, 127.5, 128.0, 254.0, 255.0])
    want = [-1.0, 2 / 255 - 1, 0.0, 1 / 255, 253 / 255, 1.0]
    np.testing.assert_allclose(rgb_to_i3d(x).numpy(), want, rtol=0, atol=1e-6)


# -- 4. independent re-computation of one stack ------------------------------------------------
def test_first_stack_matches_hand_built_input(base_run, video9):
    ex, out = base_run
    frames = decode_rgb(video9)[:5]                    # stack 0 reads frames 0 .. 4
    resized = np.stack([pil_resize_short_256(f) for f in frames])
    hh, ww = resized.shape[1:3]
    assert (hh, ww) == (256, 341)
    top, left = (hh - 224) // 2, (ww - 224) // 2
    x = torch.from_numpy(resized).permute(0, 3, 1, 2).float()       # (5, 3, 256, 341)
    with torch.no_grad():
        flows = torch.cat([ex.flow_net.estimate(x[i:i + 1], x[i + 1:i + 2]) for i in range(4)])
    flow = flows[..., top:top + 224, left:left + 224].numpy().astype(np.float64)
    # the random PWC-Net's flow is large enough to exercise the mapping: several pixels, many levels
    assert np.abs(flow).max() > 10 and len(np.unique(np.round(6.375 * flow))) > 5
    flow_in = 2 * np.round(128 + 255 / 40 * np.clip(flow, -20, 20)) / 255 - 1
    rgb_in = 2 * resized[:4, top:top + 224, left:left + 224].astype(np.float64) / 255 - 1

    def clip(a):  # (T, H, W, C) or (T, C, H, W) -> (1, C, T, H, W)
        t = torch.from_numpy(a).float()
        return (t.permute(3, 0, 1, 2) if t.shape[-1] == 3 else t.permute(1, 0, 2, 3))[None]

    with torch.no_grad():
        want_rgb = ex.nets["rgb"].features(clip(rgb_in))[0].numpy()
        want_flow = ex.nets["flow"].features(clip(flow_in))[0].numpy()
    # PIL's resize and torch's uint8 kernel disagree by one grey level on ~0.05 % of the pixels
    # (measured: max |diff| 6e-5 of the largest rgb feature, 5e-6 for flow); a 20x margin
    features_close(out["rgb"][0], want_rgb, 2e-3)
    features_close(out["flow"][0], want_flow, 2e-3)
    # and the comparison has teeth: the second stack is far from the first stack's features
    assert np.abs(out["rgb"][1] - want_rgb).max() > 0.05 * np.abs(want_rgb).max()


# -- 5. overlapping stacks reuse elements without changing numbers -----------------------------
def test_overlapping_stacks_equal_separate_runs(base_run, video9):
    _, sep = base_run                       # stacks start at frames 0, 4
    ex, out = _extract(video9, step_size=2)  # stacks start at frames 0, 2, 4
    ends = expected_stack_ends(9, 4, 2, "drop")
    assert out["rgb"].shape == out["flow"].shape == (len(ends), 1024) == (3, 1024)
    np.testing.assert_allclose(out["timestamps_ms"], np.array(ends) / FPS * 1000)
    for k, j in ((0, 0), (2, 1)):            # same start frame in both runs
        features_close(out["rgb"][k], sep["rgb"][j], 1e-5)
        features_close(out["flow"][k], sep["flow"][j], 1e-4)
    # the middle stack (start 2) is a stack of its own
    assert np.abs(out["rgb"][1] - sep["rgb"][0]).max() > 1e-3
    assert ex.frames_read == 9


# -- 6. frame folders ----------------------------------------------------------------------------
def test_frame_folder_equals_video(base_run, video9, tmp_path):
    _, vid = base_run
    folder = tmp_path / "frames"
    folder.mkdir()
    # numbered 8 .. 16: natural order differs from plain string order ("10" < "8")
    for i, f in enumerate(decode_rgb(video9)):
        Image.fromarray(f).save(folder / f"frame_{i + 8}.png")
    # rgb alone shows that the same frames arrive in the same order (flow is a function of them)
    ex, out = _extract(folder, streams=["rgb"], frames_fps=FPS)
    assert list(out) == ["rgb", "fps", "timestamps_ms"]
    assert float(out["fps"]) == FPS
    np.testing.assert_array_equal(out["timestamps_ms"], vid["timestamps_ms"])
    features_close(out["rgb"], vid["rgb"], 1e-5)


# -- 7. too short ----------------------------------------------------------------------------------
def test_too_short_raises_then_pad_gives_one_stack(i3d_weights, video5):
    with pytest.raises(VideoError, match="stack_size"):
        _extract(video5, streams=["rgb"], stack_size=5)  # a stack needs 6 frames, there are 5
    ex, out = _extract(video5, stack_size=5, tail="pad")
    assert out["rgb"].shape == out["flow"].shape == (1, 1024)
    np.testing.assert_allclose(out["timestamps_ms"], [4 / FPS * 1000])  # the last real frame
    assert np.isfinite(out["flow"]).all()


def test_padded_stack_repeats_the_last_element(i3d_weights, video5):
    ex, out = _extract(video5, streams=["rgb"], stack_size=6, tail="pad")
    from video_features.utils.video import open_frames

    from video_features.utils.pipeline import VideoWork

    work = VideoWork(0, str(video5))
    ex.begin(work)
    with open_frames(str(video5)) as src:                 # the 4 real elements
        elems = torch.cat([ex.elements(work.state, ex.to_device_frames(c.frames), c.timestamps_ms)[0]["rgb"]
                           for c in src.chunks(8)])
    assert elems.shape == (4, 3, 224, 224)
    clip = elems[[0, 1, 2, 3, 3, 3]].permute(1, 0, 2, 3)[None]
    with torch.no_grad():
        want = ex.nets["rgb"].features(clip)[0].numpy()
    features_close(out["rgb"][0], want, 1e-5)


# -- 8. spatial feature maps (flow: see test_flow_only_with_spatial_maps) ------------------------
def test_spatial_rgb_maps_pool_to_the_vectors(base_run, video9):
    _, vec = base_run
    _, out = _extract(video9, streams=["rgb"], spatial=True)
    maps = out["rgb"]
    assert maps.shape == (2, 1024, 1, 7, 7) and maps.dtype == np.float32
    features_close(_pool_like_i3d(maps), vec["rgb"], 1e-5)
    np.testing.assert_array_equal(out["timestamps_ms"], vec["timestamps_ms"])


def test_spatial_time_axis_follows_the_stack(i3d_weights, make_video):
    path = make_video("i3d17.mp4", n_frames=17, fps=FPS, width=W, height=H)
    _, out = _extract(path, streams=["rgb"], spatial=True, stack_size=16, step_size=16)
    assert out["rgb"].shape == (1, 1024, 2, 7, 7)     # 16 frames -> 2 steps of Mixed_5c


# -- 9. Charades checkpoints and --show_pred -------------------------------------------------------
def test_charades_weights_and_show_pred(i3d_weights, charades_weights, video5, capsys):
    ex, out = _extract(video5, weights="charades", show_pred=True, stack_size=2, step_size=2,
                       batch_size=1)
    for s in ("rgb", "flow"):
        net = ex.nets[s]
        assert net.num_classes == 157 and net.variant == "pytorch_i3d"
        assert out[s].shape == (2, 1024)
    labels = set(load_labels("charades157"))
    assert len(labels) == 157
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " stack #" in ln]
    for s in ("rgb", "flow"):
        mine = [ln for ln in lines if f" {s} stack #" in ln]
        assert [ln.split(" stack #")[1].split(":")[0] for ln in mine] == ["0", "1"]
        for ln in mine:
            preds = ln.split(" stack #", 1)[1].split(": ", 1)[1].split("  ")
            assert len(preds) == 5
            for p in preds:
                name, prob = p.rsplit(": ", 1)
                assert name in labels and 0.0 < float(prob) < 1.0


def test_flow_batch_size_does_not_change_features(base_run, video9):
    _, both = base_run
    _, out = _extract(video9, flow_batch_size=3)  # 8 pairs per chunk in groups of 3, 3, 2
    features_close(out["flow"], both["flow"], 1e-4)
    features_close(out["rgb"], both["rgb"], 1e-6)


def test_flow_batches_that_run_out_of_memory_are_halved(base_run, video9, monkeypatch, caplog):
    """A flow batch that runs out of GPU memory is retried at half the size, for the rest of the
    run, with one warning; the features do not change. ``auto`` is 16 pairs on the CPU."""
    _, both = base_run
    ex = I3DExtractor(_cfg(flow_batch_size="auto"), CPU)
    assert ex.flow_pairs is None and ex.auto_flow_pairs(256, 341) == 16
    real, sizes = ex._flow, []

    def limited(a, b):
        sizes.append(len(a))
        if len(a) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(a, b)

    monkeypatch.setattr(ex, "_flow", limited)
    with caplog.at_level("WARNING"):
        out = ex.extract(str(video9))
    # the 8 pairs of the video's two chunks go as one batch: 8 and 4 fail, halves of 2 pass
    assert ex.flow_pairs == 2 and sizes == [8, 4, 2, 2, 2, 2]
    assert sum("ran out of GPU memory" in r.message for r in caplog.records) == 2
    features_close(out["flow"], both["flow"], 1e-4)


def test_spatial_maps_still_show_predictions(i3d_weights, video5, capsys):
    _, plain = _extract(video5, streams=["rgb"], show_pred=True, stack_size=2, step_size=2)
    vec_lines = [ln for ln in capsys.readouterr().out.splitlines() if " stack #" in ln]
    _, out = _extract(video5, streams=["rgb"], show_pred=True, spatial=True, stack_size=2, step_size=2)
    map_lines = [ln for ln in capsys.readouterr().out.splitlines() if " stack #" in ln]
    assert out["rgb"].ndim == 5 and len(map_lines) == len(vec_lines) == len(plain["rgb"])
    assert map_lines == vec_lines  # same classes and probabilities from maps as from vectors


def test_allow_random_weights_works_and_warns(i3d_weights, video5, caplog):
    # no imagenet checkpoint in the cache: without the option the error names the URL
    with pytest.raises(WeightsError, match="rgb_imagenet.pt"):
        I3DExtractor(_cfg(streams=["rgb"], weights="imagenet"), CPU)
    with caplog.at_level(logging.WARNING):
        ex, out = _extract(video5, streams=["rgb"], weights="imagenet", allow_random_weights=True,
                           stack_size=4)
    assert "RANDOM WEIGHTS" in caplog.text
    assert out["rgb"].shape == (1, 1024) and np.isfinite(out["rgb"]).all()


# -- 10. option validation -------------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [
    ("streams", ["rgb", "depth"]),
    ("streams", ["rgb", "rgb"]),
    ("flow_type", "farneback"),
    ("raft_padding", "x"),
    ("checkpoint_path", "i3d.pt"),
    ("stack_size", 0),
    ("step_size", 0),
    ("tail", "wrap"),
    ("weights", "kinetics"),
    ("raft_iters", 0),
])
def test_invalid_options_fail_in_validation(option, value):
    with pytest.raises(ConfigError, match=option):
        make_config("i3d", video_paths=["x"], device="cpu", **{option: value})


def test_invalid_option_on_the_command_line():
    with pytest.raises(ConfigError, match="flow_type"):
        parse_args(["--feature_type", "i3d", "--device", "cpu", "--video_paths", "a.mp4",
                    "--flow_type", "farneback"])
    with pytest.raises(ConfigError, match="streams"):
        parse_args(["--feature_type", "i3d", "--device", "cpu", "--video_paths", "a.mp4",
                    "--streams", "rgb", "depth"])
    cfg = parse_args(["--feature_type", "i3d", "--device", "cpu", "--video_paths", "a.mp4",
                      "--streams", "flow", "stack_size=8"])
    assert cfg.streams == ["flow"] and cfg.stack_size == 8


# -- 11. RAFT --------------------------------------------------------------------------------------
def test_raft_flow_both_paddings(i3d_weights, raft_weights, make_video):
    path = make_video("i3d3.mp4", n_frames=3, fps=FPS, width=W, height=H)
    outs = {}
    for padding in ("reference", "unpad"):
        ex, outs[padding] = _extract(path, streams=["flow"], flow_type="raft", raft_iters=2,
                                     raft_padding=padding, stack_size=2, step_size=2)
        assert type(ex.flow_net).__name__ == "RAFT"
        assert outs[padding]["flow"].shape == (1, 1024)
        assert np.isfinite(outs[padding]["flow"]).all()
        np.testing.assert_allclose(outs[padding]["timestamps_ms"], [80.0])
    # 341 columns are padded to 344 (1 left, 2 right): keeping the pad shifts the crop by one
    a, b = outs["reference"]["flow"][0], outs["unpad"]["flow"][0]
    assert np.abs(a - b).max() > 1e-4 * np.abs(b).max()


# -- 12. end to end --------------------------------------------------------------------------------
def test_main_saves_numpy_files(base_run, video9, tmp_path):
    _, ref = base_run                        # the worker loads the same cached checkpoints
    (tmp_path / "d1").mkdir()
    shutil.copy(video9, tmp_path / "d1" / "clip.mp4")
    res = run_main("--feature_type", "i3d", "--device", "cpu", "--video_paths", "d1/clip.mp4",
                   "--on_extraction", "save_numpy", "--output_path", "out",
                   "stack_size=4", "step_size=8", "progress=false", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "out" / "i3d" / "d1"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([f"clip_{k}.npy" for k in ("rgb", "flow", "fps", "timestamps_ms")]
                           + ["clip_meta.json"])
    rgb, flow = np.load(folder / "clip_rgb.npy"), np.load(folder / "clip_flow.npy")
    assert rgb.shape == flow.shape == (1, 1024) and rgb.dtype == np.float32
    assert float(np.load(folder / "clip_fps.npy")) == FPS
    # span (the default): the 5 frames a 4-element stack reads, 0 to the end of frame 4
    np.testing.assert_allclose(np.load(folder / "clip_timestamps_ms.npy"), [[0.0, 200.0]])
    features_close(rgb[0], ref["rgb"][0], 1e-5)
    features_close(flow[0], ref["flow"][0], 1e-4)


# -- crops ---------------------------------------------------------------------------------------
class _ColumnProbe(_Probe):
    """Like _Probe, but each element's number weights the columns unequally, so a crop and its
    mirror image give different numbers."""

    def features(self, x: torch.Tensor) -> torch.Tensor:   # (B, C, T, H, W)
        col = torch.linspace(0.0, 1.0, x.shape[-1])
        m = (x * col).mean(dim=(1, 3, 4))
        return torch.nn.functional.pad(m, (0, 1024 - m.shape[1]))


def _views(img: torch.Tensor, crops: str) -> list[torch.Tensor]:
    """torchvision's FiveCrop / TenCrop of (C, H, W), written out from their definition."""
    from torchvision.transforms.v2 import functional as TF

    views = TF.five_crop(img, [224, 224]) if crops == "5" else TF.ten_crop(img, [224, 224])
    return list(views)


@pytest.mark.parametrize("crops", ["5", "10"])
def test_crops_are_torchvision_views_of_both_streams(make_video, monkeypatch, crops):
    """Every element of each stream, per view, against an independent re-computation: PIL
    resize, the flow stand-in on the resized frames, torchvision's five_crop / ten_crop (the
    flow field cropped and flipped as an image), the I3D input mapping."""
    monkeypatch.setattr("video_features.models.i3d.extractor.load_i3d", lambda *a, **k: _ColumnProbe())
    monkeypatch.setattr(flow_weights, "load_pwc", lambda *a, **k: _FakeFlow())
    path = make_video("i3d9.mp4", n_frames=9, fps=FPS, width=W, height=H)
    ex, out = _extract(path, stack_size=1, step_size=1, crops=crops)
    views = int(crops)
    assert ex.cfg.batch_size == 2           # explicit batch sizes count stacks, not views
    resized = [torch.from_numpy(np.array(pil_resize_short_256(f))).permute(2, 0, 1).float()
               for f in decode_rgb(path)]
    col = torch.linspace(0.0, 1.0, 224)
    for s in ("rgb", "flow"):
        assert out[s].shape == (8, views, 1024)
        for i in range(8):
            if s == "rgb":
                elem = rgb_to_i3d(resized[i])
                want = [float((v * col).mean()) for v in _views(elem, crops)]
            else:
                flow = (resized[i + 1] - resized[i])[:2] * 0.25
                want = [float((flow_to_i3d(v) * col).mean()) for v in _views(flow, crops)]
            np.testing.assert_allclose(out[s][i, :, 0], want, rtol=0, atol=2e-3)
        assert not np.allclose(out[s][:, 0, 0], out[s][:, 1, 0])
        if views == 10:  # the mirrored views are not the plain ones
            assert not np.allclose(out[s][:, :5, 0], out[s][:, 5:, 0])
    # the centre view is the single-crop element
    _, center = _extract(path, stack_size=1, step_size=1)
    for s in ("rgb", "flow"):
        np.testing.assert_allclose(out[s][:, 4], center[s], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["timestamps_ms"], center["timestamps_ms"])


def test_crops_with_real_networks_and_spatial_maps(i3d_weights, video9):
    """Real I3D nets: view 4 equals the crops=center features; spatial maps keep the views."""
    _, center = _extract(video9)
    _, out = _extract(video9, crops="5")
    for s in ("rgb", "flow"):
        assert out[s].shape == (2, 5, 1024)
        features_close(out[s][:, 4], center[s], 1e-5)
    _, maps = _extract(video9, crops="10", streams=["rgb"], spatial=True)
    assert maps["rgb"].shape[:3] == (2, 10, 1024) and maps["rgb"].shape[-2:] == (7, 7)


def test_flow_runs_at_the_precision_option_without_index_tensors(i3d_weights, video9, monkeypatch):
    """precision=bf16 reaches the flow network (as every network), and with step_size >
    stack_size only the pairs some stack uses are computed, cut as slices (no index tensor)."""
    ex = I3DExtractor(_cfg(streams=["flow"], stack_size=2, step_size=3, precision="bf16"), CPU)
    real = ex.flow_net.estimate
    seen = []

    def estimate(a, b, **kw):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), len(a)))
        return real(a, b, **kw)
    monkeypatch.setattr(ex.flow_net, "estimate", estimate)
    out = ex.extract(str(video9))
    assert seen and all(on and dtype == torch.bfloat16 for on, dtype, _ in seen)
    # 9 frames -> 8 elements; stacks of 2 every 3: elements 0,1 3,4 6,7 -> 6 pairs computed
    assert sum(n for _, _, n in seen) == 6
    assert out["flow"].dtype == np.float32 and np.isfinite(out["flow"]).all()
    fp32 = I3DExtractor(_cfg(streams=["flow"], stack_size=2, step_size=3), CPU).extract(str(video9))
    assert fp32["flow"].shape == out["flow"].shape
    assert np.abs(fp32["flow"] - out["flow"]).max() < 0.1 * np.abs(fp32["flow"]).max() + 1e-3


def test_runs_of_consecutive_indices():
    from video_features.models.i3d.extractor import _runs

    assert _runs(np.array([0, 1, 3, 4, 6, 7, 8, 10])) == [(0, 2), (3, 5), (6, 9), (10, 11)]
    assert _runs(np.array([5])) == [(5, 6)] and _runs(np.array([], int)) == []
