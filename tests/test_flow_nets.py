"""PWC-Net and RAFT: numerics against naive re-computations, checkpoint layouts and loading,
pre/post-processing rules, shapes and batching. Small frames only, random weights."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from video_features.models.flow_weights import (PWC_CARD, RAFT_CARD, convert_pwc_state_dict, load_pwc,
                                 load_raft, write_random_checkpoint)
from video_features.models.pwc.net import PWCNet, correlation
from video_features.models.raft.net import RAFT, CorrPyramid, convex_upsample, pad_amounts
from video_features.utils.errors import WeightsError

ROOT = Path(__file__).resolve().parent.parent

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An empty torch hub under tmp_path, downloads disabled; returns its checkpoint folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("VIDEO_FEATURES_OFFLINE", "1")
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def pwc() -> PWCNet:
    torch.manual_seed(1)
    return PWCNet().eval()


@pytest.fixture(scope="module")
def raft() -> RAFT:
    torch.manual_seed(2)
    return RAFT().eval()


def frames(b: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    one = torch.rand(b, 3, h, w, generator=g) * 255
    # the second frame: the first shifted by a pixel plus noise, so there is some motion
    two = (torch.roll(one, shifts=(1, 2), dims=(2, 3)) + 10 * torch.randn(b, 3, h, w, generator=g))
    return one, two.clamp(0, 255)


# --------------------------------------------------------------------------------------------
# cost volumes


def naive_pwc_correlation(one: torch.Tensor, two: torch.Tensor, d: int = 4) -> torch.Tensor:
    b, c, h, w = one.shape
    k = 2 * d + 1
    out = torch.zeros(b, k * k, h, w, dtype=torch.float64)
    for n in range(b):
        for y in range(h):
            for x in range(w):
                for ch in range(k * k):
                    dy, dx = ch // k - d, ch % k - d  # the kernel: channel % 9 is the x offset
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w:
                        out[n, ch, y, x] = float((one[n, :, y, x].double()
                                                  * two[n, :, yy, xx].double()).sum()) / c
    return out


def test_pwc_cost_volume_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    one = torch.randn(2, 7, 6, 9, generator=g)
    two = torch.randn(2, 7, 6, 9, generator=g)
    got = correlation(one, two)
    assert got.shape == (2, 81, 6, 9)
    torch.testing.assert_close(got.double(), naive_pwc_correlation(one, two), atol=1e-5, rtol=1e-5)


def test_fused_cost_volume_kernel_matches_tensor_ops():
    """The Triton kernel (GPU path), run on the CPU in Triton's interpreter: the same cost volume
    as the naive loop and the tensor-op version (odd sizes, channel counts that are not powers of
    two up to PWC-Net's 196, maps smaller than the window, bf16 and fp16 inputs), and the same
    PWC-Net flow through the dispatching ``correlation``."""
    pytest.importorskip("triton")
    code = """
import torch
from video_features.models.pwc import correlation_triton as k
from video_features.models.pwc.net import PWCNet, correlation_torch
from tests.test_flow_nets import frames, naive_pwc_correlation
assert k.available(torch.zeros(1))
g = torch.Generator().manual_seed(0)
for shape in [(2, 7, 6, 9), (1, 40, 5, 13), (1, 3, 1, 2), (1, 196, 3, 4)]:
    one, two = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    got = k.correlation(one, two, 4)
    torch.testing.assert_close(got.double(), naive_pwc_correlation(one, two), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, correlation_torch(one, two), atol=1e-6, rtol=1e-5)
one, two = torch.randn(2, 16, 5, 7, generator=g), torch.randn(2, 16, 5, 7, generator=g)
for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
    got = k.correlation(one.to(dtype), two.to(dtype), 4)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), correlation_torch(one, two), atol=tol, rtol=tol)
torch.manual_seed(0)
net = PWCNet().eval()
a, b = frames(1, 64, 64)
with torch.no_grad():
    fused = net.estimate(a, b)
    import video_features.models.pwc.net as pn
    assert pn._KERNEL == [k]  # the kernel ran (no launch failed over to tensor ops)
    pn._KERNEL[:] = [None]
    ref = net.estimate(a, b)
torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_pwc_cost_volume_small_maps():
    # maps smaller than the displacement window (level 6 of a 64x64 frame is 1x1)
    one, two = torch.randn(1, 3, 1, 2), torch.randn(1, 3, 1, 2)
    torch.testing.assert_close(correlation(one, two).double(), naive_pwc_correlation(one, two))


def test_raft_corr_lookup_matches_naive():
    g = torch.Generator().manual_seed(3)
    b, c, h, w = 2, 8, 6, 7
    f1, f2 = torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)
    pyramid = CorrPyramid(f1, f2, num_levels=2, radius=4)
    # integer positions (some near the border, so samples fall outside) plus a fractional one
    coords = torch.stack((torch.arange(w).float().view(1, 1, w).expand(b, h, w),
                          torch.arange(h).float().view(1, h, 1).expand(b, h, w)), 1).clone()
    coords[1] += 0.5
    out = pyramid(coords)
    assert out.shape == (b, 2 * 81, h, w)

    full = torch.einsum("bchw,bcyx->bhwyx", f1.double(), f2.double()) / c ** 0.5
    pooled = F.avg_pool2d(full.reshape(b * h * w, 1, h, w), 2).reshape(b, h, w, h // 2, w // 2)

    def bilinear(img: torch.Tensor, x: float, y: float) -> float:  # zeros outside
        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
        total = 0.0
        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                if 0 <= yy < img.shape[0] and 0 <= xx < img.shape[1]:
                    total += wy * wx * float(img[yy, xx])
        return total

    for n in range(b):
        for y in range(h):
            for x in range(w):
                cx, cy = coords[n, 0, y, x].item(), coords[n, 1, y, x].item()
                for lvl, vol in ((0, full), (1, pooled)):
                    for k in range(81):
                        # first window axis moves x, second moves y (official ordering)
                        ox, oy = k // 9 - 4, k % 9 - 4
                        want = bilinear(vol[n, y, x], cx / 2 ** lvl + ox, cy / 2 ** lvl + oy)
                        got = out[n, lvl * 81 + k, y, x].item()
                        assert abs(got - want) < 1e-4, (n, y, x, lvl, k, got, want)


def test_raft_convex_upsampling_matches_naive():
    g = torch.Generator().manual_seed(4)
    n, h, w = 2, 3, 4
    flow = torch.randn(n, 2, h, w, generator=g)
    mask = torch.randn(n, 9 * 64, h, w, generator=g)
    got = convex_upsample(flow, mask)
    assert got.shape == (n, 2, 8 * h, 8 * w)
    weights = torch.softmax(mask.view(n, 9, 8, 8, h, w), dim=1)
    padded = F.pad(8 * flow, (1, 1, 1, 1))
    want = torch.zeros_like(got)
    for b in range(n):
        for y in range(h):
            for x in range(w):
                for sy in range(8):
                    for sx in range(8):
                        acc = torch.zeros(2)
                        for j in range(9):  # 3x3 neighbourhood, row-major
                            acc += weights[b, j, sy, sx, y, x] * padded[b, :, y + j // 3, x + j % 3]
                        want[b, :, 8 * y + sy, 8 * x + sx] = acc
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# checkpoints


def test_pwc_random_checkpoint_has_published_layout_and_loads(hub):
    path = write_random_checkpoint(hub / PWC_CARD.filename, "pwc", seed=5)
    state = torch.load(path, weights_only=True)
    assert len(state) == 126
    assert state["moduleExtractor.moduleOne.0.weight"].shape == (16, 3, 3, 3)
    assert state["moduleSix.moduleOne.0.weight"].shape == (128, 81, 3, 3)
    assert state["moduleTwo.moduleUpfeat.weight"].shape == (81 + 64 + 4 + 448, 2, 4, 4)
    assert state["moduleRefiner.moduleMain.12.bias"].shape == (2,)
    assert not any(k.startswith("net") for k in state)

    model = load_pwc(device="cpu")  # found in the cache of TORCH_HOME
    loaded = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key.replace("module", "net")], value, rtol=0, atol=0)
    assert not model.training


def test_pwc_accepts_new_key_spelling_and_dataparallel_prefix(tmp_path):
    old = torch.load(write_random_checkpoint(tmp_path / "old.pt", "pwc", seed=6),
                     weights_only=True)
    new = convert_pwc_state_dict(old)
    assert "netExtractor.netOne.0.weight" in new and "netRefiner.netMain.0.weight" in new
    torch.save({"module." + k: v for k, v in new.items()}, tmp_path / "new.pt")
    a = load_pwc(str(tmp_path / "old.pt")).state_dict()
    b = load_pwc(str(tmp_path / "new.pt")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_raft_random_checkpoint_has_published_layout_and_loads(hub):
    path = write_random_checkpoint(hub / RAFT_CARD.filename, "raft", seed=7)
    state = torch.load(path, weights_only=True)
    assert all(k.startswith("module.") for k in state)
    for key in ("module.fnet.conv1.weight", "module.cnet.norm1.running_var",
                "module.cnet.layer2.0.norm3.weight", "module.cnet.layer2.0.downsample.1.weight",
                "module.update_block.encoder.convc1.weight", "module.update_block.gru.convq2.bias",
                "module.update_block.flow_head.conv2.weight", "module.update_block.mask.2.bias"):
        assert key in state, key
    assert state["module.update_block.encoder.convc1.weight"].shape == (256, 4 * 81, 1, 1)
    assert state["module.update_block.mask.2.weight"].shape == (576, 256, 1, 1)
    params = sum(v.numel() for k, v in state.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                 and ".downsample.1." not in k)
    assert params == 5_257_536  # the parameter count of the official full model

    model = load_raft(device="cpu")
    loaded = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key[len("module."):]], value, rtol=0, atol=0)

    # saves without the BatchNorm counters (older PyTorch) load as well
    trimmed = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(trimmed, hub / "trimmed.pth")
    load_raft(str(hub / "trimmed.pth"))


def test_missing_weights_name_the_url(hub):
    for loader, card in ((load_pwc, PWC_CARD), (load_raft, RAFT_CARD)):
        with pytest.raises(WeightsError) as err:
            loader()
        assert card.url in str(err.value)
        assert card.filename in str(err.value)


def test_checkpoint_of_the_other_network_is_refused(tmp_path):
    path = write_random_checkpoint(tmp_path / "raft.pth", "raft")
    with pytest.raises(WeightsError, match="does not fit"):
        load_pwc(str(path))


def test_random_weights_only_when_allowed(hub, caplog):
    with caplog.at_level(logging.WARNING):
        model = load_raft(allow_random=True)
    assert isinstance(model, RAFT)
    assert "RANDOM WEIGHTS" in caplog.text


# --------------------------------------------------------------------------------------------
# pre- and post-processing, shapes, batching


def test_pwc_preprocessing_and_rescaling(pwc, monkeypatch):
    seen = {}

    def fake_forward(img1, img2):
        seen["img1"] = img1
        b, _, h, w = img1.shape
        return torch.ones(b, 2, h // 4, w // 4)  # 1 px in both directions at the 64-size

    monkeypatch.setattr(pwc, "forward", fake_forward)
    one, two = frames(2, 70, 90)
    flow = pwc.estimate(one, two)
    assert flow.shape == (2, 2, 70, 90) and flow.dtype == torch.float32
    assert seen["img1"].shape == (2, 3, 128, 128)
    bgr = F.interpolate(one[:, [2, 1, 0]] / 255.0, size=(128, 128), mode="bilinear",
                        align_corners=False)
    torch.testing.assert_close(seen["img1"], bgr)
    torch.testing.assert_close(flow[:, 0], torch.full((2, 70, 90), 90 / 128))
    torch.testing.assert_close(flow[:, 1], torch.full((2, 70, 90), 70 / 128))


def test_pwc_shapes_and_batch_equals_pairs(pwc):
    one, two = frames(3, 72, 100, seed=1)
    flow = pwc.estimate(one, two)
    assert flow.shape == (3, 2, 72, 100) and torch.isfinite(flow).all()
    for i in range(3):
        torch.testing.assert_close(pwc.estimate(one[i:i + 1], two[i:i + 1]), flow[i:i + 1],
                                   atol=1e-3, rtol=1e-4)
    assert pwc.estimate(*frames(1, 64, 64)).shape == (1, 2, 64, 64)


def test_raft_padding_and_normalisation(raft, monkeypatch):
    seen = {}

    def fake_forward(image1, image2, iters=20):
        seen["image1"], seen["iters"] = image1, iters
        return torch.zeros(image1.shape[0], 2, *image1.shape[2:])

    monkeypatch.setattr(raft, "forward", fake_forward)
    one, two = frames(1, 61, 90)
    assert pad_amounts(61, 90) == (3, 3, 1, 2)  # 61 -> 64, 90 -> 96
    raft.estimate(one, two, iters=7)
    want = 2 * (F.pad(one, [3, 3, 1, 2], mode="replicate") / 255.0) - 1
    torch.testing.assert_close(seen["image1"], want)
    assert seen["iters"] == 7


def test_raft_shapes_unpad_and_batch_equals_pairs(raft):
    one, two = frames(2, 61, 90, seed=2)
    padded = raft.estimate(one, two, iters=3, unpad=False)
    assert padded.shape == (2, 2, 64, 96)
    flow = raft.estimate(one, two, iters=3, unpad=True)
    assert flow.shape == (2, 2, 61, 90) and torch.isfinite(flow).all()
    left, _, top, _ = pad_amounts(61, 90)
    torch.testing.assert_close(flow, padded[:, :, top:top + 61, left:left + 90])
    for i in range(2):
        torch.testing.assert_close(raft.estimate(one[i:i + 1], two[i:i + 1], iters=3),
                                   flow[i:i + 1], atol=1e-3, rtol=1e-4)


def test_raft_default_iterations_on_multiples_of_8(raft):
    one, two = frames(1, 64, 64, seed=3)  # coarsest correlation level is 1x1 here
    flow = raft.estimate(one, two)
    assert flow.shape == (1, 2, 64, 64) and torch.isfinite(flow).all()
    assert torch.equal(flow, raft.estimate(one, two, unpad=False))


@pytest.mark.gpu
def test_gpu_matches_cpu(pwc, raft):
    import copy

    one, two = frames(2, 72, 100, seed=4)
    for model, kwargs in ((pwc, {}), (raft, {"iters": 4})):
        cpu = model.estimate(one, two, **kwargs)
        gpu_model = copy.deepcopy(model).cuda()
        gpu = gpu_model.estimate(one.cuda(), two.cuda(), **kwargs)
        assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-2, rtol=1e-3)
    import importlib.util

    import video_features.models.pwc.net as pn
    if (importlib.util.find_spec("triton") is not None
            and os.environ.get("VIDEO_FEATURES_CORRELATION", "auto") != "torch"):
        assert pn._KERNEL and pn._KERNEL[0] is not None, "the fused cost volume fell back to tensor ops"
