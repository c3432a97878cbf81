"""One warp of the Dual TV-L1 solver as fused GPU kernels (Triton).

In tensor ops (:func:`models.tvl1.net.solve_warp_torch`) one inner iteration is some fifty
elementwise kernels, each reading and writing whole ``B x H x W`` images: about fifty passes over
memory for what is a few arithmetic operations per pixel. Here an inner iteration is two kernel
launches, each one pass:

* :func:`_primal_kernel`: the thresholding (v from u), the divergence of the dual field at the
  pixel (backward differences, reading p at x - 1 and y - 1), the new ``u = v + theta * div p``
  written over u, and the summed squared change of u, added atomically to the pair's ``err``;
* :func:`_dual_kernel`: the forward differences of the new u (reading u at x + 1 and y + 1) and
  the dual update, written over p.

Both run in place: in the first a pixel's u is read and written by its own program only and p is
only read; in the second p likewise and u is only read. The grid is (pixel blocks, pairs).

No host synchronisation per inner iteration: each pair has an int32 ``active`` flag that every
program reads first, returning at once for a pair that has stopped. The first program of each
pair in :func:`_dual_kernel` sets the pair's flag for the next iteration (``err > eps``, and 0 for
a pair already stopped) and clears its ``err``. It writes a second flag buffer, not the one the
other programs of its launch read; the host swaps the two buffers every iteration. So a pair
stops exactly after the step whose change is at most ``eps``, with u and p as that step left
them, as in :func:`~models.tvl1.net.solve_warp_torch`. The host looks at the flags once per outer
iteration, to end the warp when no pair is left.

The median filter at the start of each outer iteration (:func:`_median_kernel`) reads u and
writes a second pair of buffers (medians for the pairs still iterating, copies for the others);
the iterations go on in those, and the result is copied into the caller's tensors at the end.
Each median is a forgetful selection in registers (see :func:`_median_plane`), exact as a sort.

Sums of squared changes are in float64 (as the tensor ops); float32 arithmetic otherwise, without
fused multiply-adds, so the result matches the tensor ops up to the order of the error sums.

Importing this module needs Triton; :func:`available` says whether it can run on a tensor.
With ``TRITON_INTERPRET=1`` in the environment (set before the import) the kernels run on the
CPU in Triton's interpreter, which is how the tests hold them against the tensor ops.

Before anything is written, every kernel the warp needs is launched once with all pairs marked
stopped (they return at once): a kernel that cannot compile or launch (no C compiler, no
``libcuda``) raises there, with ``u`` and ``dual`` untouched, so a caller can run the same warp
with the tensor ops instead.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from video_features.models.tvl1.net import FLT_EPSILON, TVL1Params, WarpData, _f32

#: pixels per program of the two inner-iteration kernels
BLOCK = 1024
#: pixels per program of the median filter (each holds about half its window in registers)
MEDIAN_BLOCK = 256
_NUM_WARPS = 4


@triton.jit
def _block_pixels(pid, b, H, W, BLOCK: tl.constexpr):
    """Program ``pid``'s pixels of pair ``b``: their offsets in the plane, whether each is in
    the image, their columns and rows, and the offset of the pair's plane in (B, H, W)."""
    hw = H * W
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < hw, offs % W, offs // W, b.to(tl.int64) * hw


@triton.jit
def _primal_kernel(ix_ptr, iy_ptr, grad_ptr, rhoc_ptr,
                   u1_ptr, u2_ptr, u3_ptr,
                   p11_ptr, p12_ptr, p21_ptr, p22_ptr, p31_ptr, p32_ptr,
                   err_ptr, active_ptr, H, W, l_t, theta, gamma, flt_eps,
                   GAMMA: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    if tl.load(active_ptr + b) == 0:
        return
    offs, valid, x, y, base = _block_pixels(pid, b, H, W, BLOCK)
    idx = base + offs
    left = valid & (x > 0)
    up = valid & (y > 0)

    i1wx = tl.load(ix_ptr + idx, mask=valid, other=0.0)
    i1wy = tl.load(iy_ptr + idx, mask=valid, other=0.0)
    grad = tl.load(grad_ptr + idx, mask=valid, other=0.0)
    u1 = tl.load(u1_ptr + idx, mask=valid, other=0.0)
    u2 = tl.load(u2_ptr + idx, mask=valid, other=0.0)

    # thresholding (threshold_step)
    rho = tl.load(rhoc_ptr + idx, mask=valid, other=0.0) + (i1wx * u1 + i1wy * u2)
    if GAMMA:
        u3 = tl.load(u3_ptr + idx, mask=valid, other=0.0)
        rho = rho + gamma * u3
    lg = l_t * grad
    nz = grad > flt_eps
    fi = tl.where(nz, tl.math.div_rn(-rho, tl.where(nz, grad, 1.0)), 0.0)
    scale = tl.where(rho < -lg, l_t, tl.where(rho > lg, -l_t, fi))

    # u = v + theta * div p (divergence: zero before the first column / row)
    p11 = tl.load(p11_ptr + idx, mask=valid, other=0.0)
    p12 = tl.load(p12_ptr + idx, mask=valid, other=0.0)
    div1 = ((p11 - tl.load(p11_ptr + idx - 1, mask=left, other=0.0))
            + (p12 - tl.load(p12_ptr + idx - W, mask=up, other=0.0)))
    new1 = (u1 + scale * i1wx) + theta * div1
    p21 = tl.load(p21_ptr + idx, mask=valid, other=0.0)
    p22 = tl.load(p22_ptr + idx, mask=valid, other=0.0)
    div2 = ((p21 - tl.load(p21_ptr + idx - 1, mask=left, other=0.0))
            + (p22 - tl.load(p22_ptr + idx - W, mask=up, other=0.0)))
    new2 = (u2 + scale * i1wy) + theta * div2
    tl.store(u1_ptr + idx, new1, mask=valid)
    tl.store(u2_ptr + idx, new2, mask=valid)
    d1 = new1 - u1
    d2 = new2 - u2
    change = (d1 * d1).to(tl.float64) + (d2 * d2).to(tl.float64)
    if GAMMA:
        p31 = tl.load(p31_ptr + idx, mask=valid, other=0.0)
        p32 = tl.load(p32_ptr + idx, mask=valid, other=0.0)
        div3 = ((p31 - tl.load(p31_ptr + idx - 1, mask=left, other=0.0))
                + (p32 - tl.load(p32_ptr + idx - W, mask=up, other=0.0)))
        new3 = (u3 + scale * gamma) + theta * div3
        tl.store(u3_ptr + idx, new3, mask=valid)
        d3 = new3 - u3
        change = change + (d3 * d3).to(tl.float64)
    tl.atomic_add(err_ptr + b, tl.sum(tl.where(valid, change, 0.0), axis=0))


@triton.jit
def _dual_update(u_ptr, pa_ptr, pb_ptr, idx, valid, right, down, W, taut):
    """Forward differences of u (zero on the last column / row), then (pa, pb) in place."""
    uc = tl.load(u_ptr + idx, mask=valid, other=0.0)
    ux = tl.where(right, tl.load(u_ptr + idx + 1, mask=right, other=0.0) - uc, 0.0)
    uy = tl.where(down, tl.load(u_ptr + idx + W, mask=down, other=0.0) - uc, 0.0)
    ng = 1.0 + taut * tl.math.sqrt_rn(ux * ux + uy * uy)
    pa = tl.load(pa_ptr + idx, mask=valid, other=0.0)
    pb = tl.load(pb_ptr + idx, mask=valid, other=0.0)
    tl.store(pa_ptr + idx, tl.math.div_rn(pa + taut * ux, ng), mask=valid)
    tl.store(pb_ptr + idx, tl.math.div_rn(pb + taut * uy, ng), mask=valid)


@triton.jit
def _dual_kernel(u1_ptr, u2_ptr, u3_ptr,
                 p11_ptr, p12_ptr, p21_ptr, p22_ptr, p31_ptr, p32_ptr,
                 err_ptr, active_ptr, next_ptr, H, W, taut, eps,
                 GAMMA: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    act = tl.load(active_ptr + b)
    if pid == 0:
        # the flag of the next iteration, in the other buffer: this launch's programs read
        # active_ptr only. err is complete: the primal kernel has finished.
        going = (act != 0) & (tl.load(err_ptr + b) > eps)
        tl.store(next_ptr + b, going.to(tl.int32))
        tl.store(err_ptr + b, 0.0)
    if act == 0:
        return
    offs, valid, x, y, base = _block_pixels(pid, b, H, W, BLOCK)
    idx = base + offs
    right = valid & (x < W - 1)
    down = valid & (y < H - 1)
    _dual_update(u1_ptr, p11_ptr, p12_ptr, idx, valid, right, down, W, taut)
    _dual_update(u2_ptr, p21_ptr, p22_ptr, idx, valid, right, down, W, taut)
    if GAMMA:
        _dual_update(u3_ptr, p31_ptr, p32_ptr, idx, valid, right, down, W, taut)


@triton.jit
def _window_value(src_ptr, base, x, y, valid, H, W, c: tl.constexpr, K: tl.constexpr):
    """Value ``c`` (row-major) of the K x K window around each pixel, replicated borders."""
    cx = tl.minimum(tl.maximum(x + (c % K - K // 2), 0), W - 1)
    cy = tl.minimum(tl.maximum(y + (c // K - K // 2), 0), H - 1)
    return tl.load(src_ptr + base + (cy * W + cx), mask=valid, other=0.0)


@triton.jit
def _median_plane(src_ptr, dst_ptr, base, offs, valid, x, y, H, W, K: tl.constexpr):
    """K x K median of one plane at the block's pixels (replicated borders), written to dst.

    Forgetful selection, in registers: of n = 2m + 1 values, any m + 2 hold their median
    between their minimum and their maximum, and dropping those two leaves the median of the
    remaining 2m - 1 values unchanged. So: hold m + 2 window values; drop the minimum and the
    maximum (two compare-exchange passes) and take in the next window value, until all are in;
    the last three's middle is the median."""
    M: tl.constexpr = (K * K - 1) // 2
    held = ()
    for c in tl.static_range(M + 2):
        held = held + (_window_value(src_ptr, base, x, y, valid, H, W, c, K),)
    for r in tl.static_range(M):
        # m + 2 - r values held; the minimum moves out front, the maximum to the end
        lo = held[0]
        rest = ()
        for i in tl.static_range(1, M + 2 - r):
            rest = rest + (tl.maximum(lo, held[i]),)
            lo = tl.minimum(lo, held[i])
        hi = rest[0]
        held = ()
        for i in tl.static_range(1, M + 1 - r):
            held = held + (tl.minimum(hi, rest[i]),)
            hi = tl.maximum(hi, rest[i])
        if r < M - 1:
            held = held + (_window_value(src_ptr, base, x, y, valid, H, W, M + 2 + r, K),)
    tl.store(dst_ptr + base + offs, held[0], mask=valid)


@triton.jit
def _median_kernel(u1_ptr, u2_ptr, o1_ptr, o2_ptr, active_ptr, H, W,
                   K: tl.constexpr, BLOCK: tl.constexpr):
    """u1, u2 median-filtered into o1, o2 for the pairs still iterating, copied for the others."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs, valid, x, y, base = _block_pixels(pid, b, H, W, BLOCK)
    if tl.load(active_ptr + b) == 0:
        tl.store(o1_ptr + base + offs, tl.load(u1_ptr + base + offs, mask=valid), mask=valid)
        tl.store(o2_ptr + base + offs, tl.load(u2_ptr + base + offs, mask=valid), mask=valid)
    else:
        _median_plane(u1_ptr, o1_ptr, base, offs, valid, x, y, H, W, K)
        _median_plane(u2_ptr, o2_ptr, base, offs, valid, x, y, H, W, K)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(t: torch.Tensor) -> bool:
    """Whether the kernels can run on ``t``'s device: a CUDA GPU, or the CPU in the interpreter."""
    return t.is_cuda or (interpreted() and t.device.type == "cpu")


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous float32, else such a copy."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.contiguous().float()


def solve_warp(d: WarpData, u: list, dual: list, p: TVL1Params, *,
               block: int | None = None) -> None:
    """Same contract as :func:`models.tvl1.net.solve_warp_torch`: the outer and inner iterations
    of one warp, in place on ``u`` ([u1, u2] or [u1, u2, u3] with ``p.gamma``) and ``dual``
    ([p11, p12, p21, p22] (+ [p31, p32])), all (B, H, W). ``block``: pixels per program (a power
    of two; tests use small ones so that images span several programs)."""
    gamma = bool(p.gamma)
    n = 3 if gamma else 2
    if len(u) != n or len(dual) != 2 * n:
        raise ValueError(f"TV-L1 warp needs {n} flow and {2 * n} dual components, got "
                         f"{len(u)} and {len(dual)}")
    bsz, h, w = d.grad.shape
    if bsz == 0 or h * w == 0:
        return
    dev = d.grad.device
    eps = _f32(p.epsilon * p.epsilon * d.grad.shape[1] * d.grad.shape[2])
    data = [_plain(t) for t in (d.I1wx, d.I1wy, d.grad, d.rho_c)]
    cur = [_plain(t) for t in u]
    pd = [_plain(t) for t in dual]
    if not gamma:                        # unused pointers of the gamma components
        cur.append(cur[0])
        pd += [pd[0], pd[0]]
    blk = block or BLOCK
    grid = (triton.cdiv(h * w, blk), bsz)
    launch = dict(num_warps=_NUM_WARPS, enable_fp_fusion=False)
    err = torch.zeros(bsz, device=dev, dtype=torch.float64)
    flags = torch.ones(bsz, device=dev, dtype=torch.int32)
    spare_flags = torch.zeros(bsz, device=dev, dtype=torch.int32)
    l_t, theta, gval, taut = p.l_t, _f32(p.theta), _f32(p.gamma), p.taut

    def primal(active: torch.Tensor) -> None:
        _primal_kernel[grid](*data, *cur, *pd, err, active, h, w, l_t, theta, gval, FLT_EPSILON,
                             GAMMA=gamma, BLOCK=blk, **launch)

    def dual_step(active: torch.Tensor, following: torch.Tensor) -> None:
        _dual_kernel[grid](*cur, *pd, err, active, following, h, w, taut, eps,
                           GAMMA=gamma, BLOCK=blk, **launch)

    k = p.median_filtering
    filtering = k > 1
    mgrid = (triton.cdiv(h * w, block or MEDIAN_BLOCK), bsz)
    spare = [torch.empty_like(cur[0]), torch.empty_like(cur[1])] if filtering else []

    def median(active: torch.Tensor, swap: bool = True) -> None:
        _median_kernel[mgrid](cur[0], cur[1], spare[0], spare[1], active, h, w,
                              K=k, BLOCK=block or MEDIAN_BLOCK, num_warps=_NUM_WARPS)
        if swap:                         # the iterations go on in the filtered buffers
            cur[0], spare[0] = spare[0], cur[0]
            cur[1], spare[1] = spare[1], cur[1]

    # every kernel once with all pairs stopped: compiles them (a failure raises here, before
    # anything is written) and writes only scratch buffers
    stopped = torch.zeros(bsz, device=dev, dtype=torch.int32)
    if filtering:
        median(stopped, swap=False)
    primal(stopped)
    dual_step(stopped, spare_flags)

    for _ in range(p.outer_iterations):
        if filtering:
            median(flags)
        for _ in range(p.inner_iterations):
            primal(flags)
            dual_step(flags, spare_flags)
            flags, spare_flags = spare_flags, flags
        if not bool(flags.any()):        # the one synchronisation per outer iteration
            break

    for dst, src in zip(list(u) + list(dual), cur[:n] + pd[:2 * n]):
        if src is not dst:
            dst.copy_(src)
