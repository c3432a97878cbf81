"""Dual TV-L1's fused warp solver (models/tvl1/triton_step.py) against the tensor ops
(``solve_warp_torch``): run on the CPU in Triton's interpreter, in a subprocess with
``TRITON_INTERPRET=1``, on small warps built as ``TVL1._level`` builds them, with pairs that stop
at different iterations."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from video_features.models.tvl1.net import (TVL1Params, WarpData, _f32, centred_gradient,
                                            inner_step_torch, median_filter, solve_warp_torch,
                                            warp_cubic)

ROOT = Path(__file__).resolve().parent.parent

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def smooth_images(b: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """(b, h, w) smooth random images in gray levels 20..220."""
    coarse = torch.rand(b, 1, h // 4 + 3, w // 4 + 3, generator=g)
    return (F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[:, 0]
            * 200 + 20).clamp(0, 255)


def warp_state(h: int = 20, w: int = 24, gamma: bool = False, seed: int = 0,
               device: str = "cpu") -> tuple[WarpData, list, list]:
    """One warp's data and a mid-solve state for three pairs: the first two images identical at
    zero flow (it stops at the first step), the others shifted by 0.3 and 1.5 pixels (the second
    stops later than the third, or not at all) from a small smooth flow guess."""
    g = torch.Generator().manual_seed(seed)
    b = 3
    i0 = smooth_images(b, h, w, g)
    shift = torch.tensor([0.0, 0.3, 1.5]).view(b, 1, 1).expand(b, h, w)
    i1 = warp_cubic(i0[:, None], -shift, -0.5 * shift)[:, 0]
    i1[0] = i0[0]
    u = [torch.zeros(b, h, w) for _ in range(3 if gamma else 2)]
    u[0][1:] = 0.3 * smooth_images(2, h, w, g) / 255
    u[1][1:] = -0.2 * smooth_images(2, h, w, g) / 255
    if gamma:
        u[2][1:] = 0.01 * torch.randn(2, h, w, generator=g)
    dual = [0.1 * torch.randn(b, h, w, generator=g) for _ in range(2 * len(u))]
    for t in dual:
        t[0] = 0
    # as TVL1._level: the second image and its derivatives sampled at x + u
    i1x, i1y = centred_gradient(i1)
    i1w, i1wx, i1wy = warp_cubic(torch.stack([i1, i1x, i1y], 1), u[0], u[1]).unbind(1)
    d = WarpData(i1wx.contiguous(), i1wy.contiguous(), i1wx * i1wx + i1wy * i1wy,
                 i1w - i1wx * u[0] - i1wy * u[1] - i0)
    move = lambda t: t.to(device).contiguous()  # noqa: E731
    return (WarpData(*(move(t) for t in (d.I1wx, d.I1wy, d.grad, d.rho_c))),
            [move(t) for t in u], [move(t) for t in dual])


def stopping_steps(d: WarpData, u: list, dual: list, p: TVL1Params) -> list:
    """Each pair's (outer, inner) iteration at which it stops alone, None if it runs to the end."""
    eps = _f32(p.epsilon * p.epsilon * d.grad.shape[1] * d.grad.shape[2])
    steps = []
    for b in range(d.grad.shape[0]):
        db = WarpData(*(t[b:b + 1] for t in (d.I1wx, d.I1wy, d.grad, d.rho_c)))
        ub, pb = [t[b:b + 1].clone() for t in u], [t[b:b + 1].clone() for t in dual]
        step = None
        for outer in range(p.outer_iterations):
            if p.median_filtering > 1:
                ub[0] = median_filter(ub[0], p.median_filtering)
                ub[1] = median_filter(ub[1], p.median_filtering)
            for inner in range(p.inner_iterations):
                if inner_step_torch(db, ub, pb, p).item() <= eps:
                    step = (outer, inner)
                    break
            if step:
                break
        steps.append(step)
    return steps


def compare(p: TVL1Params, solve, device: str = "cpu", atol: float = 1e-5, **kwargs) -> None:
    """``solve`` and solve_warp_torch from the same state: the same flow and dual field."""
    d, u, dual = warp_state(gamma=bool(p.gamma), device=device)
    steps = stopping_steps(d, u, dual, p)
    assert steps[0] == (0, 0) and len(set(steps)) == 3, steps  # the pairs stop apart
    ref_u, ref_dual = [t.clone() for t in u], [t.clone() for t in dual]
    solve_warp_torch(d, ref_u, ref_dual, p)
    got_u, got_dual = [t.clone() for t in u], [t.clone() for t in dual]
    ids = [id(t) for t in got_u + got_dual]
    solve(d, got_u, got_dual, p, **kwargs)
    assert [id(t) for t in got_u + got_dual] == ids        # in place
    for name, got, want in zip(["u1", "u2", "u3"][:len(u)] + ["p11", "p12", "p21", "p22",
                                                              "p31", "p32"][:len(dual)],
                               got_u + got_dual, ref_u + ref_dual):
        torch.testing.assert_close(got, want, atol=atol, rtol=atol,
                                   msg=lambda m: f"{name} ({p}, stops {steps}): {m}")


CASES = [
    TVL1Params(inner_iterations=6, outer_iterations=3, epsilon=0.05, median_filtering=1),
    TVL1Params(inner_iterations=6, outer_iterations=3, epsilon=0.05, gamma=0.2,
               median_filtering=3),
    TVL1Params(inner_iterations=6, outer_iterations=3, epsilon=0.05, median_filtering=5),
]


def _interpret(code: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_fused_warp_matches_tensor_ops():
    """The Triton kernels run in Triton's interpreter: the same flow and dual field after a warp
    as the tensor ops, with pairs stopping at the first step, mid-warp and not at all, without
    and with gamma, without and with (3 x 3, 5 x 5) median filtering; blocks of 128 pixels so
    that each image spans several programs, the last one partly. The median filter kernel
    alone: bit-exact for 3 x 3 to 7 x 7 windows (ties included), copying the stopped pairs."""
    pytest.importorskip("triton", reason="Triton is not installed")
    _interpret("""
import torch, triton
from video_features.models.tvl1 import triton_step as ts
from video_features.models.tvl1.net import median_filter
from tests.test_tvl1_triton import CASES, compare
assert ts.available(torch.zeros(1))
for p in CASES:
    compare(p, ts.solve_warp, block=128)
g = torch.Generator().manual_seed(0)
for k in (3, 5, 7):
    u1 = torch.randn(2, 9, 13, generator=g)
    u2 = torch.randint(0, 4, (2, 9, 13), generator=g).float()
    o1, o2 = torch.full_like(u1, 7.0), torch.full_like(u2, 7.0)
    active = torch.tensor([1, 0], dtype=torch.int32)
    ts._median_kernel[(triton.cdiv(9 * 13, 32), 2)](u1, u2, o1, o2, active, 9, 13, K=k, BLOCK=32)
    assert torch.equal(o1[0], median_filter(u1, k)[0]), k
    assert torch.equal(o2[0], median_filter(u2, k)[0]), k
    assert torch.equal(o1[1], u1[1]) and torch.equal(o2[1], u2[1]), k
print("ok")
""")


def test_fused_warp_in_whole_flow_and_failed_launch():
    """Through TVL1.flow (pyramid, warps, upscaled flows as the solver's input), the fused
    solver gives the tensor ops' flow. A kernel that fails to launch raises before anything is
    written: u and the dual field are as they were, for a caller to fall back on."""
    pytest.importorskip("triton", reason="Triton is not installed")
    _interpret("""
import torch
from video_features.models.tvl1 import net, triton_step as ts
from video_features.models.tvl1.net import TVL1, TVL1Params
from tests.test_tvl1_triton import CASES, smooth_images, warp_state
g = torch.Generator().manual_seed(1)
i0 = smooth_images(2, 24, 30, g)
i1 = torch.roll(i0, shifts=(1, 1), dims=(1, 2))
model = TVL1(TVL1Params(nscales=2, warps=2, inner_iterations=4, outer_iterations=2))
ref = model.flow(i0, i1)
net._FUSED['cpu'] = ts   # the interpreter runs on CPU tensors
torch.testing.assert_close(model.flow(i0, i1), ref, atol=1e-4, rtol=1e-4)

class Failing:
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("no compiler")
        return launch
ts._dual_kernel = Failing()
d, u, dual = warp_state()
before = [t.clone() for t in u + dual]
try:
    ts.solve_warp(d, u, dual, CASES[2])
except RuntimeError:
    pass
else:
    raise AssertionError("the failed launch did not raise")
assert all(torch.equal(a, b) for a, b in zip(u + dual, before))
print("ok")
""")


@pytest.mark.gpu
@pytest.mark.parametrize("p", CASES, ids=["plain", "gamma-median3", "median5"])
def test_fused_warp_on_gpu_matches_tensor_ops(p):
    """The compiled kernels on a GPU, default block sizes, against the tensor ops there."""
    ts = pytest.importorskip("video_features.models.tvl1.triton_step",
                             reason="Triton is not installed")
    assert ts.available(torch.zeros(1, device="cuda"))
    compare(p, ts.solve_warp, device="cuda", atol=1e-4)
