"""TV-L1 optical flow (models/tvl1): each building block against OpenCV's own function, whole
flows against ``cv2.optflow.DualTVL1OpticalFlow`` at the same parameters (sample-video frames and
generated scenes), a known sub-pixel motion, batching independence, the CPU loops against the
tensor ops, and the i3d flow stream fed by it against OpenCV's flow through the same path."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from video_features.models.tvl1 import cpu_loop
from video_features.models.tvl1.net import (TVL1, TVL1Params, downscale, level_sizes, median_filter,
                                            rgb_to_gray, warp_cubic)

cv2 = pytest.importorskip("cv2")
if not hasattr(cv2, "optflow"):
    pytest.skip("OpenCV without the contrib modules (pip install opencv-contrib-python-headless)",
                allow_module_level=True)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
ROOT = Path(__file__).resolve().parent.parent
#: fewer iterations than the defaults keep most cases fast; one case runs the defaults
QUICK = TVL1Params(nscales=3, warps=2, outer_iterations=3, inner_iterations=10)


def opencv_tvl1(p: TVL1Params):
    """OpenCV's solver at ``p`` (a fresh object per pair: it shrinks its nscales on small
    images)."""
    # positional: OpenCV's keyword for the inner iterations is misspelt
    return cv2.optflow.DualTVL1OpticalFlow_create(
        p.tau, p.lambda_, p.theta, p.nscales, p.warps, p.epsilon, p.inner_iterations,
        p.outer_iterations, p.scale_step, p.gamma, p.median_filtering)


def opencv_flows(rgb: np.ndarray, p: TVL1Params) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N-1, 2, H, W) flow by OpenCV from the frames' 8-bit gray."""
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb]
    return np.stack([opencv_tvl1(p).calc(a, b, None).transpose(2, 0, 1)
                     for a, b in zip(gray[:-1], gray[1:])])


def ours(rgb: np.ndarray, p: TVL1Params, kernel: str = "auto") -> np.ndarray:
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float()
    return TVL1(p, kernel=kernel).estimate(x[:-1], x[1:]).numpy()


def endpoint_errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a - b) ** 2).sum(axis=-3))


def sample_frames(n: int, size: tuple[int, int], name: str = "A.mp4") -> np.ndarray:
    """The first ``n`` frames of a sample video, resized to ``size`` (h, w) by area averaging."""
    out = []
    with av.open(str(ROOT / "sample" / name)) as c:
        for f in c.decode(video=0):
            out.append(cv2.resize(f.to_ndarray(format="rgb24"), size[::-1],
                                  interpolation=cv2.INTER_AREA))
            if len(out) == n:
                break
    return np.stack(out)


def texture(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth random texture in 0..255 (float32): blurred noise at two scales."""
    rng = np.random.default_rng(seed)
    coarse = cv2.resize(rng.random((h // 8 + 2, w // 8 + 2)).astype(np.float32), (w, h),
                        interpolation=cv2.INTER_CUBIC)
    fine = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 1.5)
    t = 0.6 * coarse + 0.4 * fine
    return (255 * (t - t.min()) / (t.max() - t.min())).astype(np.float32)


def shifted(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``img`` moved by (dx, dy) pixels (bicubic), content at x + dx in the result."""
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, img.shape[1::-1], flags=cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_REFLECT)


def scene(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A generated scene: a textured background drifting by (0.7, -0.4) px per frame and a
    textured square moving by (-1.6, 1.1) px per frame over it (motion boundaries)."""
    bg, fg = texture(h, w, seed), texture(h, w, seed + 1)
    frames = []
    for i in range(n):
        img = shifted(bg, 0.7 * i, -0.4 * i)
        x0, y0 = int(w * 0.3 - 1.6 * i), int(h * 0.3 + 1.1 * i)
        s = min(h, w) // 3
        img[y0:y0 + s, x0:x0 + s] = shifted(fg, -1.6 * i, 1.1 * i)[y0:y0 + s, x0:x0 + s]
        rgb = np.clip(np.round(img), 0, 255).astype(np.uint8)
        frames.append(np.stack([rgb, np.roll(rgb, 3, 1), 255 - rgb], -1))
    return np.stack(frames)


# -- building blocks, against OpenCV's own functions ---------------------------------------------
def test_gray_is_opencvs_rgb2gray_bit_for_bit():
    rgb = np.random.default_rng(0).integers(0, 256, (3, 37, 53, 3), dtype=np.uint8)
    want = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb])
    got = rgb_to_gray(torch.from_numpy(rgb).permute(0, 3, 1, 2).float()).numpy()
    np.testing.assert_array_equal(got, want)


def test_pyramid_levels_are_opencvs_resizes():
    img = texture(75, 101, 3)
    p = TVL1Params(nscales=6)
    sizes = level_sizes(75, 101, p)
    want, level = [img], img
    for _ in sizes[1:]:
        level = cv2.resize(level, None, fx=p.scale_step, fy=p.scale_step,
                           interpolation=cv2.INTER_LINEAR)
        want.append(level)
    assert [w.shape for w in want] == sizes
    got = torch.from_numpy(img)[None]
    for size, w in zip(sizes[1:], want[1:]):
        got = downscale(got, size, p.scale_step)
        np.testing.assert_allclose(got[0].numpy(), w, atol=2e-3)
    # OpenCV stops before a level with a side under 16 pixels
    assert level_sizes(40, 200, TVL1Params(nscales=9))[-1] == (17, 82)   # next: 14 rows


def test_warping_is_opencvs_cubic_remap_with_zeros_outside():
    rng = np.random.default_rng(1)
    h, w = 31, 45
    img = texture(h, w, 5)
    u1 = (rng.standard_normal((h, w)) * 4).astype(np.float32)
    u2 = (rng.standard_normal((h, w)) * 4).astype(np.float32)
    u1[0, :5] = [-3.5, -40.0, 1e4, w + 0.25, -1.5]   # out of the image, far out, at the edge
    mx = np.arange(w, dtype=np.float32)[None] + u1
    my = np.arange(h, dtype=np.float32)[:, None] + u2
    want = cv2.remap(img, mx, my, cv2.INTER_CUBIC)
    got = warp_cubic(torch.from_numpy(img)[None, None], torch.from_numpy(u1)[None],
                     torch.from_numpy(u2)[None])[0, 0].numpy()
    np.testing.assert_allclose(got, want, atol=2e-3)


@pytest.mark.parametrize("k", [3, 5])
def test_median_filters_are_opencvs_median_blur(k):
    u = (np.random.default_rng(2).standard_normal((23, 29)) * 3).astype(np.float32)
    want = cv2.medianBlur(u, k)
    np.testing.assert_array_equal(median_filter(torch.from_numpy(u)[None], k)[0].numpy(), want)
    lo, hi = cpu_loop.median_network(k * k)
    got = u.copy()
    cpu_loop._median(got, k, lo, hi, np.empty((k * k, 29), np.float32), np.empty_like(u))
    np.testing.assert_array_equal(got, want)


def test_the_median_network_finds_the_median_of_any_values():
    for n in (9, 25, 49):
        lo, hi = cpu_loop.median_network(n)
        x = np.random.default_rng(n).standard_normal((n, 500)).astype(np.float32)
        x[:, :50] = np.round(x[:, :50])            # ties
        y = x.copy()
        for a, b in zip(lo, hi):
            y[a], y[b] = np.minimum(y[a], y[b]), np.maximum(y[a], y[b])
        np.testing.assert_array_equal(y[n // 2], np.median(x, axis=0).astype(np.float32))


# -- whole flows ---------------------------------------------------------------------------------
def assert_parity(got: np.ndarray, want: np.ndarray, mean: float = 0.05, p99: float = 0.5):
    epe = endpoint_errors(got, want)
    assert epe.mean() <= mean and np.percentile(epe, 99) <= p99, (
        f"EPE mean {epe.mean():.4f}, 99th percentile {np.percentile(epe, 99):.4f}")
    # and the flow is not trivially zero: parity has teeth
    assert np.sqrt((want ** 2).sum(axis=-3)).mean() > 0.1


@pytest.mark.parametrize("kernel", ["auto", "torch"])
@pytest.mark.parametrize("source", ["video", "scene"])
def test_flow_matches_opencv_at_the_same_parameters(source, kernel):
    rgb = sample_frames(4, (60, 80)) if source == "video" else scene(3, 56, 72)
    assert_parity(ours(rgb, QUICK, kernel), opencv_flows(rgb, QUICK))


def test_flow_matches_opencv_at_its_defaults_on_real_frames():
    rgb = sample_frames(3, (120, 160), "B.mp4")
    assert_parity(ours(rgb, TVL1Params()), opencv_flows(rgb, TVL1Params()))


def test_options_off_the_defaults_match_opencv_too():
    p = TVL1Params(tau=0.2, lambda_=0.3, theta=0.25, nscales=4, warps=2, epsilon=0.02,
                   inner_iterations=8, outer_iterations=3, scale_step=0.6, gamma=0.1,
                   median_filtering=3)
    rgb = scene(2, 48, 64, seed=4)
    assert_parity(ours(rgb, p), opencv_flows(rgb, p))


def test_a_known_sub_pixel_translation_is_recovered():
    img = texture(72, 96, 7)
    dx, dy = 0.4, -0.7
    frames = np.stack([img, shifted(img, dx, dy)])
    rgb = np.repeat(np.clip(np.round(frames), 0, 255).astype(np.uint8)[..., None], 3, -1)
    # the flow u of a pair satisfies I1(x + u) = I0(x): content moved by (dx, dy) gives (dx, dy)
    flow = ours(rgb, TVL1Params())[0]
    inner = flow[:, 8:-8, 8:-8]
    epe = np.sqrt((inner[0] - dx) ** 2 + (inner[1] - dy) ** 2)
    assert epe.mean() <= 0.1, epe.mean()


def test_each_pair_is_solved_as_if_alone_in_its_batch():
    rgb = np.concatenate([sample_frames(3, (40, 52)), sample_frames(1, (40, 52))])  # a still pair
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float()
    for kernel in ("auto", "torch"):
        net = TVL1(QUICK, kernel=kernel)
        batch = net.estimate(x[:-1], x[1:])
        for i in range(len(x) - 1):
            alone = net.estimate(x[i:i + 1], x[i + 1:i + 2])
            np.testing.assert_allclose(batch[i].numpy(), alone[0].numpy(), atol=1e-5)


def test_the_cpu_loops_give_the_tensor_ops_flow():
    rgb = sample_frames(3, (44, 60))
    np.testing.assert_allclose(ours(rgb, QUICK, "auto"), ours(rgb, QUICK, "torch"), atol=2e-3)
    # and one warp alone (the loops' solve_warp, used where the warping is done in tensor ops)
    from video_features.models.tvl1.net import WarpData, centred_gradient, solve_warp_torch

    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float()
    i0, i1 = rgb_to_gray(x[:-1]), rgb_to_gray(x[1:])
    i1x, i1y = centred_gradient(i1)
    u = [0.5 * torch.ones_like(i0), -0.25 * torch.ones_like(i0)]
    w1, wx, wy = warp_cubic(torch.stack([i1, i1x, i1y], 1), *u).unbind(1)
    d = WarpData(wx.contiguous(), wy.contiguous(), wx * wx + wy * wy, w1 - wx * u[0] - wy * u[1] - i0)
    results = []
    for solve in (solve_warp_torch, cpu_loop.solve_warp):
        state, dual = [t.clone() for t in u], [torch.zeros_like(i0) for _ in range(4)]
        solve(d, state, dual, TVL1Params(inner_iterations=10, outer_iterations=3))
        results.append(torch.stack(state + dual))
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=0)


def test_a_fused_kernel_that_fails_gives_way_to_tensor_ops_once(monkeypatch, caplog):
    from video_features.models.tvl1 import net

    def broken(*args):
        raise RuntimeError("no C compiler\nmore lines")

    monkeypatch.setitem(net._FUSED, "cpu", SimpleNamespace(solve_level=broken, solve_warp=broken))
    rgb = sample_frames(3, (32, 40))
    with caplog.at_level("WARNING"):
        got = ours(rgb, QUICK, "auto")
    np.testing.assert_allclose(got, ours(rgb, QUICK, "torch"), atol=1e-6)
    warned = [r for r in caplog.records if "fused kernel failed" in r.getMessage()]
    assert len(warned) == 1 and "RuntimeError: no C compiler" in warned[0].getMessage()
    assert net._FUSED["cpu"] is None


def test_frames_too_small_for_a_gradient_are_refused():
    with pytest.raises(ValueError, match="at least 3 x 3"):
        TVL1().estimate(torch.zeros(1, 3, 2, 10), torch.zeros(1, 3, 2, 10))


@pytest.mark.parametrize("kw,match", [(dict(tau=0.0), "tau"), (dict(scale_step=1.0), "scale_step"),
                                      (dict(median_filtering=4), "odd"),
                                      (dict(warps=0), "warps")])
def test_bad_parameters_name_themselves(kw, match):
    with pytest.raises(ValueError, match=match):
        TVL1Params(**kw)


# -- through the feature types -------------------------------------------------------------------
@pytest.fixture(scope="module")
def video9(make_video):
    return make_video("tvl1_9.mp4", n_frames=9, fps=25.0, width=64, height=48)


def decoded(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_i3d_flow_features_from_ours_and_from_opencvs_flow_agree(hub_checkpoints, video9):
    from video_features.models.i3d.extractor import I3DExtractor
    from video_features.models.i3d.weights import get_card, write_random_checkpoint
    from video_features.utils.config import make_config
    from video_features.utils.transforms import resize_short_side

    card = get_card("i3d_flow")
    write_random_checkpoint(hub_checkpoints / card.filename, card.layout, "flow", card.num_classes)
    p = TVL1Params(warps=2, outer_iterations=2)
    cfg = make_config("i3d", video_paths=["x"], device="cpu", streams=["flow"], flow_type="tvl1",
                      stack_size=4, step_size=4, batch_size=2, tvl1_warps=2,
                      tvl1_outer_iterations=2)
    ex = I3DExtractor(cfg, torch.device("cpu"))
    got = ex.extract(str(video9))["flow"]
    assert got.shape == (2, 1024)
    # the same frames (the pipeline's resize to 256 x 341), OpenCV's flow, the same I3D path
    frames = torch.from_numpy(decoded(video9)).permute(0, 3, 1, 2).float()
    rgb = resize_short_side(frames, 256).round().clamp(0, 255).to(torch.uint8)
    flow = torch.from_numpy(opencv_flows(rgb.permute(0, 2, 3, 1).numpy(), p))
    crop = flow[..., 16:240, 58:282]
    x = 2 * torch.round(128 + 255 / 40 * crop.clamp(-20, 20)) / 255 - 1    # (8, 2, 224, 224)
    with torch.no_grad():
        want = torch.stack([ex.nets["flow"].features(x[s:s + 4].permute(1, 0, 2, 3)[None])[0]
                            for s in (0, 4)]).numpy()
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
    assert np.abs(got[1] - want[0]).max() > 5e-2 * np.abs(want).max()   # the check has teeth


def _flow_cfg(**kw):
    from video_features.utils.config import make_config

    base = dict(video_paths=["x"], device="cpu", batch_size=3, dtype="float32", tvl1_warps=2,
                tvl1_outer_iterations=2, timestamps_form="reference")
    return make_config("tvl1", **{**base, **kw})


def test_the_tvl1_feature_type_saves_the_solvers_flow(video9, tmp_path):
    from video_features.models.flow_out.extractor import TVL1FlowExtractor

    out = TVL1FlowExtractor(_flow_cfg(), torch.device("cpu")).extract(str(video9))
    flow = np.asarray(out["tvl1"])
    assert flow.shape == (8, 2, 48, 64) and out["timestamps_ms"].shape == (9,)
    x = torch.from_numpy(decoded(video9)).permute(0, 3, 1, 2).float()
    want = TVL1(TVL1Params(warps=2, outer_iterations=2)).estimate(x[:-1], x[1:]).numpy()
    np.testing.assert_allclose(flow, want, atol=1e-4)


def test_the_tvl1_feature_type_writes_jpeg_pairs_on_the_command_line(video9, tmp_path):
    from tests.conftest import run_main

    res = run_main("--feature_type", "tvl1", "--video_paths", str(video9), "--on_extraction",
                   "save_numpy", "--output_path", str(tmp_path), "flow_format=jpg",
                   "tvl1_warps=1", "tvl1_outer_iterations=1", "device=cpu")
    assert res.returncode == 0, res.stderr
    found = sorted((tmp_path / "tvl1").rglob("*.jpg"))
    assert {p.parent.name for p in found} == {video9.stem}
    assert len(found) == 16 and [p.name for p in found[:2]] == [f"{video9.stem}-000001x.jpg",
                                                                f"{video9.stem}-000001y.jpg"]


def _abandoned_folder(target: Path, pid: int) -> Path:
    """A JPEG folder as a run with process id ``pid`` leaves it when killed mid-input."""
    from video_features.utils.output import HOST

    folder = target.with_name(f".{target.name}.{HOST}.{pid}.0badf00d.tmp")
    folder.mkdir(parents=True)
    (folder / f"{target.name}-000001x.jpg").write_bytes(b"half a run")
    return folder


@pytest.mark.parametrize("how", ["keep_rows", "finish", "keep_rows_of_one_of_two_types"])
def test_jpeg_folders_of_killed_runs_and_failed_inputs_are_removed(make_video, tmp_path,
                                                                   monkeypatch, how):
    import subprocess

    from video_features.models.flow_out.extractor import TVL1FlowExtractor
    from video_features.utils.config import parse_configs
    from video_features.utils.errors import VideoError
    from video_features.utils.runner import run

    video = make_video("tvl1_30.mp4", n_frames=30, fps=25.0, width=64, height=48)
    out = tmp_path / "out"
    gone = subprocess.Popen(["true"])
    gone.wait()
    killed = _abandoned_folder(out / "tvl1" / video.stem, gone.pid)      # its writer is dead
    live = _abandoned_folder(out / "tvl1" / "other", os.getppid())       # another run's, alive
    seen = []
    method = how.split("_of_")[0]
    original = getattr(TVL1FlowExtractor, method)

    def fail_later(self, work, *args):
        st = work.state
        if st.pairs == 0:          # the first batch's JPEGs are written, then it fails
            return original(self, work, *args)
        for job in getattr(st, "jpg_jobs", ()):   # written by the JPEG threads
            job.result()
        seen.append(len(list(st.jpg_dir.iterdir())))
        raise VideoError("stopped on purpose")

    monkeypatch.setattr(TVL1FlowExtractor, method, fail_later)
    types = ["tvl1", "null"] if how.endswith("two_types") else ["tvl1"]
    summary = run(parse_configs([
        "--feature_type", *types, "--video_paths", str(video), "--on_extraction", "save_numpy",
        "--output_path", str(out), "--device", "cpu", f"input_root={video.parent}",
        "batch_size=3", "tvl1_warps=1", "tvl1_outer_iterations=1", "flow_format=jpg",
        "progress=false"]))
    assert summary.count("failed") == 1 and "stopped on purpose" in summary.failed[0].reason
    assert seen and seen[0] >= 6                 # the input had JPEGs on disk when it failed
    assert not killed.exists() and live.exists()
    assert sorted(p.name for p in (out / "tvl1").iterdir()) == [live.name]
    if len(types) == 2:                          # the other type's output is written
        assert (out / "null" / f"{video.stem}_null.npy").exists()


def test_too_short_and_too_small_inputs_get_one_line(make_video, video9):
    from video_features.models.flow_out.extractor import TVL1FlowExtractor
    from video_features.utils.errors import VideoError

    one = make_video("tvl1_1.mp4", n_frames=1, fps=25.0, width=64, height=48)
    with pytest.raises(VideoError, match="at least 2 frames"):
        TVL1FlowExtractor(_flow_cfg(), torch.device("cpu")).extract(str(one))
    with pytest.raises(VideoError, match="too small for TV-L1"):
        TVL1FlowExtractor(_flow_cfg(side_size=8), torch.device("cpu")).extract(str(video9))


@pytest.mark.parametrize("ft,kw,match", [
    ("tvl1", dict(tvl1_scale_step=1.5), "tvl1_scale_step"),
    ("tvl1", dict(tvl1_median_filtering=4), "tvl1_median_filtering"),
    ("tvl1", dict(tvl1_tau=0.0), "tvl1_tau"),
    ("i3d", dict(flow_type="tvl1", flow_checkpoint_path="x.pth"), "TV-L1 has no weights"),
    ("i3d", dict(flow_type="tvl1", tvl1_warps=0), "tvl1_warps"),
])
def test_bad_tvl1_options_are_config_errors(ft, kw, match):
    from video_features.utils.config import make_config
    from video_features.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        make_config(ft, video_paths=["x"], device="cpu", **kw)


def test_the_yaml_defaults_are_opencvs_in_every_feature_type():
    from video_features.utils.config import CONFIG_DIR, read_yaml

    want = TVL1Params()
    for name in ("i3d", "tvl1", "finetune"):
        values = read_yaml(CONFIG_DIR / f"{name}.yml")
        assert TVL1Params(**{k[len("tvl1_"):] + ("_" if k == "tvl1_lambda" else ""): v
                             for k, v in values.items() if k.startswith("tvl1_")}) == want, name
