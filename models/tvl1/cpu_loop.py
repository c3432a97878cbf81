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


@numba.njit(nogil=True, cache=True, error_model="numpy")
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
            a = win[lo[c]]
            b = win[hi[c]]
            for x in range(w):   # selects, not min() / max(): they vectorise
                va = a[x]
                vb = b[x]
                a[x] = va if va < vb else vb
                b[x] = vb if va < vb else va
        m = (k * k) // 2
        for x in range(w):
            tmp[y, x] = win[m, x]
    u[:, :] = tmp


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _primal_row(ix, iy, g, rc, u1, u2, u3, p11, p12, p21, p22, p31, p32, p12u, p22u, p32u,
                first_row, l_t, theta, gamma, use_gamma, change):
    """One row of the primal step in place on u; ``p*2u`` are the dual rows above (ignored on the
    first row); each pixel's squared change of the flow into ``change``."""
    w = u1.shape[0]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    feps = np.float32(FLT_EPSILON)
    for x in range(w):
        gx = g[x]
        rho = rc[x] + (ix[x] * u1[x] + iy[x] * u2[x])
        if use_gamma:
            rho = rho + gamma * u3[x]
        lg = l_t * gx
        # OpenCV's if / else-if chain as selects (the cases exclude each other)
        fi = -rho / (gx if gx > feps else one)
        s = fi if gx > feps else zero
        s = -l_t if rho > lg else s
        s = l_t if rho < -lg else s
        l11 = p11[x - 1] if x > 0 else zero
        l21 = p21[x - 1] if x > 0 else zero
        a12 = zero if first_row else p12u[x]
        a22 = zero if first_row else p22u[x]
        n1 = (u1[x] + s * ix[x]) + theta * ((p11[x] - l11) + (p12[x] - a12))
        n2 = (u2[x] + s * iy[x]) + theta * ((p21[x] - l21) + (p22[x] - a22))
        d1 = n1 - u1[x]
        d2 = n2 - u2[x]
        c = d1 * d1 + d2 * d2
        if use_gamma:
            l31 = p31[x - 1] if x > 0 else zero
            a32 = zero if first_row else p32u[x]
            n3 = (u3[x] + s * gamma) + theta * ((p31[x] - l31) + (p32[x] - a32))
            d3 = n3 - u3[x]
            c = c + d3 * d3
            u3[x] = n3
        u1[x] = n1
        u2[x] = n2
        change[x] = c


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _dual_row(u, un, pa, pb, taut):
    """One row of the dual step of one flow component in place on (pa, pb): forward differences
    of ``u`` (``un``: the next row, or ``u`` itself on the last row, giving zero), zero on the
    last column."""
    w = u.shape[0]
    one = np.float32(1.0)
    for x in range(w - 1):
        gx = u[x + 1] - u[x]
        gy = un[x] - u[x]
        ng = one + taut * np.sqrt(gx * gx + gy * gy)
        pa[x] = (pa[x] + taut * gx) / ng
        pb[x] = (pb[x] + taut * gy) / ng
    x = w - 1
    gy = un[x] - u[x]
    ng = one + taut * np.sqrt(gy * gy)
    pa[x] = pa[x] / ng
    pb[x] = (pb[x] + taut * gy) / ng


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _solve_pair(ix, iy, grad, rho_c, u1, u2, u3, p11, p12, p21, p22, p31, p32, l_t, theta,
                taut, gamma, eps, inner, outer, median, lo, hi, win, tmp, change):
    """One warp of one pair, in place on u and p: OpenCV's procOneScale loop body."""
    h, w = u1.shape
    use_gamma = gamma != 0
    error = np.float32(np.inf)
    n_outer = 0
    while n_outer < outer and error > eps:
        if median > 1:
            _median(u1, median, lo, hi, win, tmp)
            _median(u2, median, lo, hi, win, tmp)
        n_inner = 0
        while n_inner < inner and error > eps:
            # primal step; the change is summed in float32 in row-major order, as OpenCV does
            error = np.float32(0.0)
            for y in range(h):
                yu = max(y - 1, 0)
                g3 = min(y, u3.shape[0] - 1)   # u3 / p3* are 1 x 1 placeholders without gamma
                _primal_row(ix[y], iy[y], grad[y], rho_c[y], u1[y], u2[y], u3[g3], p11[y],
                            p12[y], p21[y], p22[y], p31[g3], p32[g3], p12[yu], p22[yu],
                            p32[min(yu, g3)], y == 0, l_t, theta, gamma, use_gamma, change)
                for x in range(w):
                    error += change[x]
            # dual step from the new flow
            for y in range(h):
                yn = min(y + 1, h - 1)
                _dual_row(u1[y], u1[yn], p11[y], p12[y], taut)
                _dual_row(u2[y], u2[yn], p21[y], p22[y], taut)
                if use_gamma:
                    _dual_row(u3[y], u3[yn], p31[y], p32[y], taut)
            n_inner += 1
        n_outer += 1


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _cubic(t):
    """Keys' weights (a = -0.75) of the taps at -1, 0, 1, 2 for the fraction ``t``, in float32
    as :func:`models.tvl1.net.cubic_weights`."""
    a = np.float32(-0.75)
    one = np.float32(1.0)
    t1 = t + one
    c0 = ((a * t1 - np.float32(5.0) * a) * t1 + np.float32(8.0) * a) * t1 - np.float32(4.0) * a
    c1 = ((a + np.float32(2.0)) * t - (a + np.float32(3.0))) * t * t + one
    r = one - t
    c2 = ((a + np.float32(2.0)) * r - (a + np.float32(3.0))) * r * r + one
    return c0, c1, c2, one - c0 - c1 - c2


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _warp_pair(i0, i1, i1x, i1y, u1, u2, i1wx, i1wy, grad, rho_c):
    """The second image and its derivatives sampled at x + u (bicubic, zeros outside, as
    :func:`models.tvl1.net.warp_cubic`), then the squared gradient and the constant part of the
    residual (OpenCV's remap + calcGradRho)."""
    h, w = u1.shape
    zero = np.float32(0.0)
    wf = np.float32(w + 4)
    hf = np.float32(h + 4)
    lo = np.float32(-4.0)
    for y in range(h):
        for x in range(w):
            px = min(max(np.float32(x) + u1[y, x], lo), wf)
            py = min(max(np.float32(y) + u2[y, x], lo), hf)
            fx = np.floor(px)
            fy = np.floor(py)
            wx0, wx1, wx2, wx3 = _cubic(px - fx)
            wy0, wy1, wy2, wy3 = _cubic(py - fy)
            wxs = (wx0, wx1, wx2, wx3)
            wys = (wy0, wy1, wy2, wy3)
            x0 = int(fx) - 1
            y0 = int(fy) - 1
            a = zero
            b = zero
            c = zero
            for i in range(4):
                yi = y0 + i
                for j in range(4):
                    xj = x0 + j
                    if 0 <= yi < h and 0 <= xj < w:
                        wgt = wys[i] * wxs[j]
                        a += i1[yi, xj] * wgt
                        b += i1x[yi, xj] * wgt
                        c += i1y[yi, xj] * wgt
            i1wx[y, x] = b
            i1wy[y, x] = c
            grad[y, x] = b * b + c * c
            rho_c[y, x] = a - b * u1[y, x] - c * u2[y, x] - i0[y, x]


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _solve_level_pair(i0, i1, i1x, i1y, u1, u2, u3, p11, p12, p21, p22, p31, p32, warps, l_t,
                      theta, taut, gamma, eps, inner, outer, median, lo, hi, win, tmp, change,
                      i1wx, i1wy, grad, rho_c):
    """One pyramid level of one pair (OpenCV's procOneScale): dual variables from zero, then per
    warp the warping and the iterations, in place on u."""
    for p in (p11, p12, p21, p22, p31, p32):
        p[:, :] = 0
    for _ in range(warps):
        _warp_pair(i0, i1, i1x, i1y, u1, u2, i1wx, i1wy, grad, rho_c)
        _solve_pair(i1wx, i1wy, grad, rho_c, u1, u2, u3, p11, p12, p21, p22, p31, p32, l_t,
                    theta, taut, gamma, eps, inner, outer, median, lo, hi, win, tmp, change)


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


def _for_each_pair(b: int, one) -> None:
    if b == 1:
        one(0)
    else:
        list(_pool().map(one, range(b)))


def _scalars(p: TVL1Params, h: int, w: int) -> tuple:
    k = p.median_filtering if p.median_filtering > 1 else 1
    lo, hi = median_network(k * k) if k > 1 else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    eps = np.float32(_f32(p.epsilon * p.epsilon * h * w))
    return (np.float32(p.l_t), np.float32(_f32(p.theta)), np.float32(p.taut),
            np.float32(_f32(p.gamma)), eps, p.inner_iterations, p.outer_iterations, k, lo, hi)


def _scratch(k: int, h: int, w: int) -> tuple:
    return (np.empty((k * k, w), np.float32), np.empty((h, w), np.float32),
            np.empty(w, np.float32))


def _state(u: list, dual: list, p: TVL1Params):
    """numpy views of the callers' (B, H, W) tensors, and per pair the 13 u / p arguments
    (1 x 1 placeholders for u3 / p3* without gamma)."""
    if not all(t.is_contiguous() and t.dtype == torch.float32 for t in u + dual):
        raise ValueError("TV-L1 state tensors must be contiguous float32")
    state = [t.numpy() for t in u + dual]
    none = np.zeros((1, 1), np.float32)

    def of(i: int) -> list:
        u3 = [state[2][i]] if p.gamma else [none]
        duals = [s[i] for s in state[len(u):]] + ([] if p.gamma else [none, none])
        return [state[0][i], state[1][i], *u3, *duals]
    return of


def solve_warp(d: WarpData, u: list, dual: list, p: TVL1Params) -> None:
    """Same contract as :func:`models.tvl1.net.solve_warp_torch`, for CPU tensors."""
    b, h, w = d.grad.shape
    arrays = [t.contiguous().numpy() for t in (d.I1wx, d.I1wy, d.grad, d.rho_c)]
    of = _state(u, dual, p)
    scalars = _scalars(p, h, w)

    def one(i: int) -> None:
        _solve_pair(*(a[i] for a in arrays), *of(i), *scalars, *_scratch(scalars[7], h, w))

    _for_each_pair(b, one)


def solve_level(i0: torch.Tensor, i1: torch.Tensor, i1x: torch.Tensor, i1y: torch.Tensor,
                u: list, p: TVL1Params) -> None:
    """One pyramid level for CPU tensors (B, H, W), in place on ``u``: the warping as well as the
    iterations run in the compiled per-pair code, so between warps nothing waits on tensor ops
    (whose idle OpenMP threads would compete with the solver's threads for the cores)."""
    b, h, w = i0.shape
    images = [t.contiguous().numpy() for t in (i0, i1, i1x, i1y)]
    dual = [torch.empty_like(u[0]) for _ in range(2 * len(u))]
    of = _state(u, dual, p)
    scalars = _scalars(p, h, w)

    def one(i: int) -> None:
        state = of(i)
        _solve_level_pair(*(a[i] for a in images), *state, p.warps, *scalars,
                          *_scratch(scalars[7], h, w), *(np.empty((h, w), np.float32)
                                                         for _ in range(4)))

    _for_each_pair(b, one)
