"""The iterations of one TV-L1 warp as compiled loops on the CPU (numba), one pair per thread.

The tensor-op version (:func:`models.tvl1.net.solve_warp_torch`) makes some fifty passes over
memory per inner iteration and sorts 25-element windows for the median filter; here an inner
iteration is two passes over the pair's pixels (the primal step with its summed change, then the
dual step), and the median is a sorting network applied a row at a time, so both compile to
vector instructions. Each pair runs its whole warp (outer and inner iterations, stopping on its
own) in one call that releases the GIL, so pairs run in parallel on a thread pool of
``torch.get_num_threads()`` threads. The change of the flow is summed in float32 in row-major
order, as OpenCV does, so a pair stops after the same iteration as there.
"""
from __future__ import annotations

import concurrent.futures
import functools
import threading

import numba
import numpy as np
import torch

from video_features.models.tvl1.net import FLT_EPSILON, TVL1Params, WarpData, _f32


@functools.lru_cache(maxsize=None)
def median_network(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Compare-exchange pairs ``(lo, hi)`` that leave the median of ``n`` values at index
    ``n // 2``: Batcher's odd-even merge sort for the next power of two, without the comparators
    that touch the padding (it would hold +inf and never move) or that cannot reach the median."""
    size = 1
    while size < n:
        size *= 2
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k - 1, size - j - k - 1) + 1):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    pairs = [(a, b) for a, b in pairs if b < n]
    needed, kept = {n // 2}, []
    for a, b in reversed(pairs):   # backwards: keep what can still move a value onto the median
        if a in needed or b in needed:
            needed |= {a, b}
            kept.append((a, b))
    kept.reverse()
    return (np.array([a for a, _ in kept], np.int64), np.array([b for _, b in kept], np.int64))


@numba.njit(nogil=True, cache=True)
def _median(u, k, lo, hi, win, tmp):
    """k x k median of ``u`` in place, replicated borders; ``win`` (k*k, W) and ``tmp`` (H, W)
    are scratch."""
    h, w = u.shape
    r = k // 2
    for y in range(h):
        n = 0
        for dy in range(-r, r + 1):
            yy = min(max(y + dy, 0), h - 1)
            for dx in range(-r, r + 1):
                for x in range(w):
                    win[n, x] = u[yy, min(max(x + dx, 0), w - 1)]
                n += 1
        for c in range(lo.shape[0]):
            a = lo[c]
            b = hi[c]
            for x in range(w):
                va = win[a, x]
                vb = win[b, x]
                win[a, x] = min(va, vb)
                win[b, x] = max(va, vb)
        m = (k * k) // 2
        for x in range(w):
            tmp[y, x] = win[m, x]
    u[:, :] = tmp


@numba.njit(nogil=True, cache=True)
def _solve_pair(ix_, iy_, grad, rho_c, u1, u2, u3, p11, p12, p21, p22, p31, p32, l_t, theta,
                taut, gamma, eps, inner, outer, median, lo, hi, win, tmp, row):
    """One warp of one pair, in place on u and p: OpenCV's procOneScale loop body."""
    h, w = u1.shape
    use_gamma = gamma != 0
    zero = np.float32(0.0)
    one = np.float32(1.0)
    feps = np.float32(FLT_EPSILON)
    error = np.float32(np.inf)
    n_outer = 0
    while n_outer < outer and error > eps:
        if median > 1:
            _median(u1, median, lo, hi, win, tmp)
            _median(u2, median, lo, hi, win, tmp)
        n_inner = 0
        while n_inner < inner and error > eps:
            # primal step: threshold (v), divergence of p, new u; the change summed in order
            error = zero
            for y in range(h):
                for x in range(w):
                    ix = ix_[y, x]
                    iy = iy_[y, x]
                    g = grad[y, x]
                    rho = rho_c[y, x] + (ix * u1[y, x] + iy * u2[y, x])
                    if use_gamma:
                        rho = rho + gamma * u3[y, x]
                    lg = l_t * g
                    if rho < -lg:
                        s = l_t
                    elif rho > lg:
                        s = -l_t
                    elif g > feps:
                        s = -rho / g
                    else:
                        s = zero
                    left1 = p11[y, x - 1] if x > 0 else zero
                    left2 = p21[y, x - 1] if x > 0 else zero
                    up1 = p12[y - 1, x] if y > 0 else zero
                    up2 = p22[y - 1, x] if y > 0 else zero
                    n1 = (u1[y, x] + s * ix) + theta * ((p11[y, x] - left1) + (p12[y, x] - up1))
                    n2 = (u2[y, x] + s * iy) + theta * ((p21[y, x] - left2) + (p22[y, x] - up2))
                    d1 = n1 - u1[y, x]
                    d2 = n2 - u2[y, x]
                    change = d1 * d1 + d2 * d2
                    if use_gamma:
                        left3 = p31[y, x - 1] if x > 0 else zero
                        up3 = p32[y - 1, x] if y > 0 else zero
                        n3 = (u3[y, x] + s * gamma) + theta * ((p31[y, x] - left3) + (p32[y, x] - up3))
                        d3 = n3 - u3[y, x]
                        change = change + d3 * d3
                        u3[y, x] = n3
                    u1[y, x] = n1
                    u2[y, x] = n2
                    row[x] = change
                for x in range(w):
                    error += row[x]
            # dual step: forward differences of the new u (zero on the last column / row)
            for y in range(h):
                yn = min(y + 1, h - 1)
                for x in range(w):
                    xn = min(x + 1, w - 1)
                    a = u1[y, x]
                    gx = u1[y, xn] - a
                    gy = u1[yn, x] - a
                    ng = one + taut * np.sqrt(gx * gx + gy * gy)
                    p11[y, x] = (p11[y, x] + taut * gx) / ng
                    p12[y, x] = (p12[y, x] + taut * gy) / ng
                    a = u2[y, x]
                    gx = u2[y, xn] - a
                    gy = u2[yn, x] - a
                    ng = one + taut * np.sqrt(gx * gx + gy * gy)
                    p21[y, x] = (p21[y, x] + taut * gx) / ng
                    p22[y, x] = (p22[y, x] + taut * gy) / ng
                    if use_gamma:
                        a = u3[y, x]
                        gx = u3[y, xn] - a
                        gy = u3[yn, x] - a
                        ng = one + taut * np.sqrt(gx * gx + gy * gy)
                        p31[y, x] = (p31[y, x] + taut * gx) / ng
                        p32[y, x] = (p32[y, x] + taut * gy) / ng
            n_inner += 1
        n_outer += 1


_POOL: list = []
_POOL_LOCK = threading.Lock()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    with _POOL_LOCK:
        threads = max(1, torch.get_num_threads())
        if not _POOL or _POOL[0][0] != threads:
            if _POOL:
                _POOL[0][1].shutdown(wait=False)
            _POOL[:] = [(threads, concurrent.futures.ThreadPoolExecutor(
                threads, thread_name_prefix="tvl1"))]
        return _POOL[0][1]


def solve_warp(d: WarpData, u: list, dual: list, p: TVL1Params) -> None:
    """Same contract as :func:`models.tvl1.net.solve_warp_torch`, for CPU tensors."""
    b, h, w = d.grad.shape
    arrays = [t.contiguous().numpy() for t in (d.I1wx, d.I1wy, d.grad, d.rho_c)]
    state = [t.numpy() for t in u + dual]   # the callers' tensors: contiguous float32, shared
    if not all(t.is_contiguous() and t.dtype == torch.float32 for t in u + dual):
        raise ValueError("TV-L1 state tensors must be contiguous float32")
    k = p.median_filtering if p.median_filtering > 1 else 1
    lo, hi = median_network(k * k) if k > 1 else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    eps = np.float32(_f32(p.epsilon * p.epsilon * h * w))
    scalars = (np.float32(p.l_t), np.float32(_f32(p.theta)), np.float32(p.taut),
               np.float32(_f32(p.gamma)), eps, p.inner_iterations, p.outer_iterations, k, lo, hi)
    none = np.zeros((1, 1), np.float32)

    def one(i: int) -> None:
        u1, u2 = state[0][i], state[1][i]
        u3 = state[2][i] if p.gamma else none
        duals = [s[i] for s in state[len(u):]] + ([] if p.gamma else [none, none])
        _solve_pair(*(a[i] for a in arrays), u1, u2, u3, *duals, *scalars,
                    np.empty((k * k, w), np.float32), np.empty((h, w), np.float32),
                    np.empty(w, np.float32))

    if b == 1:
        one(0)
    else:
        list(_pool().map(one, range(b)))
