"""Dual TV-L1 optical flow (Zach, Pock, Bischof 2007; Sánchez, Meinhardt-Llopis, Facciolo, IPOL
2013), batched over frame pairs, in tensor ops that run on the CPU and on GPUs.

The numerics follow OpenCV's ``cv::optflow::DualTVL1OpticalFlow`` (the CPU class; its defaults
are ours), so flow from here and from OpenCV agree to a small fraction of a pixel:

* input: 8-bit grayscale (RGB frames are converted as OpenCV 5's RGB2GRAY: 15-bit fixed-point
  weights, rounded), as float;
* pyramid: each level is the one above resized by ``scale_step`` (bilinear, half-pixel centres,
  size rounded to nearest, the sampling step exactly ``1 / scale_step``), down to ``nscales``
  levels or until a side would fall under 16 pixels; the flow starts at zero on the coarsest
  level and is carried to the next finer one by a bilinear resize to its size times
  ``1 / scale_step``;
* per level: centred differences of the second image (one-sided at the borders, halved); per warp
  the second image and its derivatives are resampled at ``x + u`` bicubically (Keys, a = -0.75,
  zeros outside, as ``cv::remap(INTER_CUBIC)`` does); then up
  to ``outer_iterations`` times: a median filter of the flow (``median_filtering`` x same size,
  replicated borders), and up to ``inner_iterations`` steps of the thresholding, the primal update
  (backward-difference divergence) and the dual update (forward differences);
* stopping: a pair stops its warp once the squared change of its flow over one step, summed over
  the image, is at most ``epsilon ** 2 * H * W``. Each pair stops on its own, so a pair's flow
  does not depend on the others in its batch.

The inner iterations dominate the cost. They run as fused kernels where one is available (a
Triton kernel on CUDA tensors, :mod:`models.tvl1.triton_step`; compiled loops on the CPU,
:mod:`models.tvl1.cpu_loop`) and as tensor ops otherwise (:func:`solve_warp_torch`, also the
reference the kernels are tested against).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: the smallest side a pyramid level may have (OpenCV stops adding levels below it)
MIN_LEVEL_SIDE = 16
#: std::numeric_limits<float>::epsilon(): below it the image gradient counts as zero
FLT_EPSILON = 1.1920929e-07


@dataclasses.dataclass(frozen=True)
class TVL1Params:
    """The solver's parameters; the defaults are OpenCV's ``DualTVL1OpticalFlow`` ones."""

    tau: float = 0.25
    lambda_: float = 0.15
    theta: float = 0.3
    nscales: int = 5
    warps: int = 5
    epsilon: float = 0.01
    inner_iterations: int = 30
    outer_iterations: int = 10
    scale_step: float = 0.8
    gamma: float = 0.0
    median_filtering: int = 5

    def __post_init__(self) -> None:
        for name in ("tau", "lambda_", "theta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TV-L1 {name.rstrip('_')} must be > 0, got {getattr(self, name)!r}")
        for name in ("nscales", "warps", "inner_iterations", "outer_iterations"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TV-L1 {name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 < self.scale_step < 1:
            raise ValueError(f"TV-L1 scale_step must be in (0, 1), got {self.scale_step!r}")
        if not self.epsilon >= 0 or not self.gamma >= 0:
            raise ValueError("TV-L1 epsilon and gamma must be >= 0")
        if self.median_filtering > 1 and self.median_filtering % 2 == 0:
            raise ValueError(f"TV-L1 median_filtering must be odd (or 0/1: off), got "
                             f"{self.median_filtering!r}")

    @classmethod
    def from_config(cls, cfg) -> "TVL1Params":
        """The ``tvl1_*`` options of a config (every one has a default)."""
        return cls(tau=cfg.tvl1_tau, lambda_=cfg.tvl1_lambda, theta=cfg.tvl1_theta,
                   nscales=cfg.tvl1_nscales, warps=cfg.tvl1_warps, epsilon=cfg.tvl1_epsilon,
                   inner_iterations=cfg.tvl1_inner_iterations,
                   outer_iterations=cfg.tvl1_outer_iterations, scale_step=cfg.tvl1_scale_step,
                   gamma=cfg.tvl1_gamma, median_filtering=cfg.tvl1_median_filtering)

    @property
    def l_t(self) -> float:
        return _f32(self.lambda_ * self.theta)

    @property
    def taut(self) -> float:
        return _f32(self.tau / self.theta)


def _f32(x: float) -> float:
    """A double rounded to float32, as OpenCV's ``static_cast<float>``."""
    return float(np.float32(x))


# -- images ------------------------------------------------------------------------------------
def rgb_to_gray(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in whole levels 0..255 -> (B, H, W) 8-bit gray as float, bit-exact to
    OpenCV 5's ``cvtColor(..., COLOR_RGB2GRAY)`` (15-bit fixed-point weights, rounded)."""
    q = rgb.round().clamp(0, 255).to(torch.int32)
    y = q[:, 0] * 9798 + q[:, 1] * 19235 + q[:, 2] * 3735
    return ((y + (1 << 14)) >> 15).to(torch.float32)


def level_sizes(h: int, w: int, p: TVL1Params) -> list[tuple[int, int]]:
    """The pyramid's (h, w) from the finest level down: each ``round(side * scale_step)`` of the
    one above, stopping before a level with a side under :data:`MIN_LEVEL_SIDE`."""
    sizes = [(h, w)]
    while len(sizes) < p.nscales:
        ph, pw = sizes[-1]
        nh, nw = round(ph * p.scale_step), round(pw * p.scale_step)   # half to even, as cvRound
        if nh < MIN_LEVEL_SIDE or nw < MIN_LEVEL_SIDE:
            break
        sizes.append((nh, nw))
    return sizes


def downscale(x: torch.Tensor, size: tuple[int, int], step: float) -> torch.Tensor:
    """(B, H, W) -> (B, h, w) bilinear with the sampling step exactly ``1 / step`` (cv::resize
    with fx = fy = step), not the ratio of the rounded sizes."""
    return torch.ops.aten.upsample_bilinear2d(x[:, None], list(size), False, step, step)[:, 0]


def upscale_flow(u: torch.Tensor, size: tuple[int, int], factor: float | None) -> torch.Tensor:
    """(B, h, w) flow component -> (B, H, W) bilinear to ``size``, times ``factor`` (None: a
    component that is not a displacement, as gamma's u3)."""
    out = F.interpolate(u[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return out * factor if factor is not None else out


def centred_gradient(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the centred differences; at the borders half the one-sided difference."""
    p = F.pad(img[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    return (0.5 * (p[:, 1:-1, 2:] - p[:, 1:-1, :-2]),
            0.5 * (p[:, 2:, 1:-1] - p[:, :-2, 1:-1]))


def forward_gradient(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences, zero on the last column (x) and the last row (y)."""
    return F.pad(u[:, :, 1:] - u[:, :, :-1], (0, 1)), F.pad(u[:, 1:] - u[:, :-1], (0, 0, 0, 1))


def divergence(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """Backward differences with zeros before the first column / row (the adjoint of
    :func:`forward_gradient`)."""
    return (v1 - F.pad(v1[:, :, :-1], (1, 0))) + (v2 - F.pad(v2[:, :-1], (0, 0, 1, 0)))


def median_filter(u: torch.Tensor, k: int) -> torch.Tensor:
    """k x k median with replicated borders (cv::medianBlur on float images)."""
    r = k // 2
    p = F.pad(u[:, None], (r, r, r, r), mode="replicate")[:, 0]
    windows = p.unfold(1, k, 1).unfold(2, k, 1)          # (B, H, W, k, k)
    return windows.reshape(*u.shape, k * k).median(dim=-1).values


def cubic_weights(t: torch.Tensor) -> list[torch.Tensor]:
    """Keys' cubic convolution weights (a = -0.75, OpenCV's interpolateCubic) of the four taps
    at offsets -1, 0, 1, 2 for the fractional positions ``t`` in [0, 1)."""
    a = -0.75
    t1 = t + 1
    c0 = ((a * t1 - 5 * a) * t1 + 8 * a) * t1 - 4 * a
    c1 = ((a + 2) * t - (a + 3)) * t * t + 1
    r = 1 - t
    c2 = ((a + 2) * r - (a + 3)) * r * r + 1
    return [c0, c1, c2, 1 - c0 - c1 - c2]


def warp_cubic(images: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """``images`` (B, C, H, W) sampled at ``(x + u1, y + u2)`` as ``cv::remap(INTER_CUBIC,
    BORDER_CONSTANT 0)`` of OpenCV 5 does: the 4 x 4 taps around each position weighted by Keys'
    cubic, taps outside the image counting as zero."""
    b, c, h, w = images.shape
    dev = images.device
    xs = torch.arange(w, device=dev, dtype=torch.float32)
    ys = torch.arange(h, device=dev, dtype=torch.float32)[:, None]
    # far outside, every tap is outside: clamped there, the indices stay small
    px = (xs + u1).clamp_(-4.0, w + 4.0)
    py = (ys + u2).clamp_(-4.0, h + 4.0)
    fx, fy = px.floor(), py.floor()
    wx, wy = cubic_weights(px - fx), cubic_weights(py - fy)
    x0, y0 = fx.to(torch.int64) - 1, fy.to(torch.int64) - 1
    flat = images.reshape(b, c, h * w)
    out = images.new_zeros((b, c, h, w))
    for i in range(4):
        yi = y0 + i
        row_ok = (yi >= 0) & (yi < h)
        row = yi.clamp(0, h - 1) * w
        for j in range(4):
            xj = x0 + j
            ok = row_ok & (xj >= 0) & (xj < w)
            idx = (row + xj.clamp(0, w - 1)).reshape(b, 1, h * w).expand(b, c, h * w)
            taps = flat.gather(2, idx).view(b, c, h, w)
            out += taps * torch.where(ok, wy[i] * wx[j], 0.0)[:, None]
    return out


# -- one warp of one level: the inner iterations -----------------------------------------------
@dataclasses.dataclass
class WarpData:
    """What one warp's iterations read: the warped derivatives of the second image, its squared
    gradient magnitude and the constant part of the linearised residual, all (B, H, W)."""

    I1wx: torch.Tensor
    I1wy: torch.Tensor
    grad: torch.Tensor
    rho_c: torch.Tensor


def threshold_step(d: WarpData, u1, u2, u3, p: TVL1Params):
    """The thresholding operator TH: v from u (OpenCV's estimateV)."""
    l_t = p.l_t
    rho = d.rho_c + (d.I1wx * u1 + d.I1wy * u2)
    if p.gamma:
        rho = rho + _f32(p.gamma) * u3
    lg = l_t * d.grad
    low, high = rho < -lg, rho > lg
    fi = torch.where(d.grad > FLT_EPSILON, -rho / torch.where(d.grad > FLT_EPSILON, d.grad, 1.0),
                     0.0)
    scale = torch.where(low, l_t, torch.where(high, -l_t, fi))
    v1, v2 = u1 + scale * d.I1wx, u2 + scale * d.I1wy
    v3 = u3 + scale * _f32(p.gamma) if p.gamma else None
    return v1, v2, v3


def inner_step_torch(d: WarpData, u: list, dual: list, p: TVL1Params) -> torch.Tensor:
    """One inner iteration in place on ``u`` ([u1, u2(, u3)]) and ``dual`` ([p11, p12, p21, p22
    (, p31, p32)]); returns each pair's summed squared change of the flow (B,)."""
    theta, taut = _f32(p.theta), p.taut
    v = threshold_step(d, u[0], u[1], u[2] if p.gamma else None, p)
    err = None
    for k in range(len(u)):
        new = v[k] + theta * divergence(dual[2 * k], dual[2 * k + 1])
        change = (new - u[k]).square().sum(dim=(1, 2), dtype=torch.float64)
        err = change if err is None else err + change
        u[k] = new
    for k in range(len(u)):
        gx, gy = forward_gradient(u[k])
        ng = 1.0 + taut * torch.hypot(gx, gy)
        dual[2 * k] = (dual[2 * k] + taut * gx) / ng
        dual[2 * k + 1] = (dual[2 * k + 1] + taut * gy) / ng
    return err


def solve_warp_torch(d: WarpData, u: list, dual: list, p: TVL1Params) -> None:
    """The outer and inner iterations of one warp for a batch of pairs, in tensor ops, in place
    on ``u`` and ``dual``. Pairs that have converged are taken out of the working batch, so each
    pair iterates exactly as long as it would alone."""
    eps = _f32(p.epsilon * p.epsilon * d.grad.shape[1] * d.grad.shape[2])
    index = torch.arange(d.grad.shape[0], device=d.grad.device)   # pairs still iterating
    wd, wu, wp = d, list(u), list(dual)

    def store(rows: torch.Tensor, sel) -> None:
        for full, part in zip(u + dual, wu + wp):
            full[rows] = part[sel]

    for _ in range(p.outer_iterations):
        if p.median_filtering > 1:
            wu[0] = median_filter(wu[0], p.median_filtering)
            wu[1] = median_filter(wu[1], p.median_filtering)
        for _ in range(p.inner_iterations):
            err = inner_step_torch(wd, wu, wp, p)
            going = err > eps
            if not bool(going.all()):
                store(index[~going], ~going)
                index = index[going]
                if len(index) == 0:
                    return
                wd = WarpData(*(t[going] for t in (wd.I1wx, wd.I1wy, wd.grad, wd.rho_c)))
                wu, wp = [t[going] for t in wu], [t[going] for t in wp]
    store(index, slice(None))


# -- the whole solver --------------------------------------------------------------------------
class TVL1(nn.Module):
    """Dual TV-L1 flow for batches of frame pairs; no weights, the same interface as the flow
    networks (:meth:`estimate`)."""

    def __init__(self, params: TVL1Params | None = None, kernel: str = "auto") -> None:
        super().__init__()
        self.params = params or TVL1Params()
        if kernel not in ("auto", "torch"):
            raise ValueError(f"kernel must be auto or torch, got {kernel!r}")
        self.kernel = kernel
        # a device to follow .to(): no parameters, so a buffer tells where the module lives
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @torch.no_grad()
    def estimate(self, frames1: torch.Tensor, frames2: torch.Tensor) -> torch.Tensor:
        """Flow from ``frames1`` to ``frames2``: (B, 2, H, W) float32 in pixels. ``frames*``:
        (B, 3, H, W) RGB in [0, 255] (whole levels; converted to 8-bit gray) or (B, H, W) gray.
        Each pair's flow does not depend on the others in the batch."""
        if frames1.shape != frames2.shape or frames1.dim() not in (3, 4):
            raise ValueError(f"estimate needs two equal (B, 3, H, W) or (B, H, W) tensors, got "
                             f"{tuple(frames1.shape)} and {tuple(frames2.shape)}")
        with torch.autocast(frames1.device.type, enabled=False):
            if frames1.dim() == 4:
                i0, i1 = rgb_to_gray(frames1), rgb_to_gray(frames2)
            else:
                i0, i1 = frames1.float(), frames2.float()
            return self.flow(i0, i1)

    def flow(self, i0: torch.Tensor, i1: torch.Tensor) -> torch.Tensor:
        """(B, H, W) float gray levels 0..255 x 2 -> (B, 2, H, W) flow."""
        p = self.params
        b, h, w = i0.shape
        if min(h, w) < 3:
            raise ValueError(f"TV-L1 needs frames of at least 3 x 3 pixels, got {w}x{h}")
        sizes = level_sizes(h, w, p)
        i0s, i1s = [i0.contiguous()], [i1.contiguous()]
        for size in sizes[1:]:
            i0s.append(downscale(i0s[-1], size, p.scale_step))
            i1s.append(downscale(i1s[-1], size, p.scale_step))
        lh, lw = sizes[-1]
        u = [i0.new_zeros((b, lh, lw)) for _ in range(3 if p.gamma else 2)]
        for s in range(len(sizes) - 1, -1, -1):
            u = self._level(i0s[s], i1s[s], u)
            if s:
                factor = _f32(1.0 / p.scale_step)
                u = [upscale_flow(c, sizes[s - 1], factor if k < 2 else None)
                     for k, c in enumerate(u)]
        return torch.stack(u[:2], 1)

    def _level(self, i0: torch.Tensor, i1: torch.Tensor, u: list) -> list:
        p = self.params
        i1x, i1y = centred_gradient(i1)
        level = None if self.kernel == "torch" else getattr(_fused(i0), "solve_level", None)
        if level is not None:   # the whole level in one fused call (the CPU loops)
            try:
                level(i0, i1, i1x, i1y, u, p)
                return u
            except Exception as exc:
                _disable_fused(level, exc)
        images = torch.stack([i1, i1x, i1y], 1)
        dual = [torch.zeros_like(i0) for _ in range(2 * len(u))]
        for _ in range(p.warps):
            warped = warp_cubic(images, u[0], u[1])
            i1w, i1wx, i1wy = warped.unbind(1)
            d = WarpData(i1wx.contiguous(), i1wy.contiguous(), i1wx * i1wx + i1wy * i1wy,
                         i1w - i1wx * u[0] - i1wy * u[1] - i0)
            solve_warp(self.kernel, d, u, dual, p)
        return u


def solve_warp(kernel: str, d: WarpData, u: list, dual: list, p: TVL1Params) -> None:
    """One warp's iterations: the fused kernel for the tensors' device where one can run
    (``kernel="auto"``), tensor ops otherwise. A fused kernel that fails to compile or launch
    (no C compiler, no ``libcuda``; it fails before writing anything) is turned off for the rest
    of the process with one warning, and tensor ops do this warp and every later one."""
    fused = None if kernel == "torch" else getattr(_fused(d.grad), "solve_warp", None)
    if fused is not None:
        try:
            fused(d, u, dual, p)
            return
        except torch.cuda.OutOfMemoryError:
            raise   # the callers split batches on OOM; tensor ops would need more memory
        except Exception as exc:
            _disable_fused(fused, exc)
    solve_warp_torch(d, u, dual, p)


_FUSED: dict = {}
_FUSED_LOCK = threading.Lock()


def _kind(like: torch.Tensor) -> str:
    return "cuda" if like.is_cuda else "cpu"


def _fused(like: torch.Tensor):
    """The fused solver module for ``like``'s device type (``solve_level`` and / or
    ``solve_warp``), or None (turned off with ``VIDEO_FEATURES_TVL1=torch``, or its library is
    missing); one log line each."""
    kind = _kind(like)
    with _FUSED_LOCK:
        if kind not in _FUSED:
            solver = None
            if os.environ.get("VIDEO_FEATURES_TVL1", "auto") != "torch":
                try:
                    if kind == "cuda":
                        from video_features.models.tvl1 import triton_step as solver
                    else:
                        from video_features.models.tvl1 import cpu_loop as solver
                except Exception as exc:
                    log.info("TV-L1 on %s: tensor ops (fused kernel unavailable: %s)", kind,
                             str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            _FUSED[kind] = solver
        return _FUSED[kind]


def _disable_fused(function, exc: Exception) -> None:
    """Turn off the fused module that ``function`` belongs to, for the rest of the process."""
    with _FUSED_LOCK:
        for kind, current in _FUSED.items():
            if current is not None and function in (getattr(current, "solve_level", None),
                                                    getattr(current, "solve_warp", None)):
                _FUSED[kind] = None
                lines = str(exc).strip().splitlines()
                log.warning("TV-L1 on %s: the fused kernel failed (%s: %s); tensor ops for the "
                            "rest of this process", kind, type(exc).__name__,
                            lines[0] if lines else "")
