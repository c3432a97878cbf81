"""CLIP's image preprocessing on batches of device tensors, equal to PIL's resampling.

OpenAI's (and open_clip's) preprocessing resizes each PIL image with bicubic resampling. PIL
resamples 8-bit images in fixed point: per output pixel it normalises the filter weights,
quantises them to 22 fractional bits, sums, rounds and clips to 0..255, first along the rows
(horizontal pass, stored as 8 bits), then along the columns. torch's bicubic kernels round
differently (up to two levels apart in about 0.5% of the values), which moves the features of a
network by more than 1e-4. So the passes are recomputed here exactly: the quantised weights of
every output pixel form a (out, in) matrix, applied with a float64 matrix product (integer sums
below 2**53 are exact), then rounded and clipped as PIL does. Only the output pixels that survive
the centre crop are computed. Pillow 13 runs the vertical pass first when the height shrinks by
more than twice as many pixels as the width; the order follows the installed Pillow.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from video_features.utils.transforms import crop_views, normalize, short_side_size

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
#: fractional bits of PIL's 8-bit resampling weights (Resample.c: 32 - 8 - 2)
_PRECISION_BITS = 22
#: frames per float64 step, to bound the memory of large frames
_SLICE = 8


def _bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5)."""
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


@lru_cache(maxsize=64)
def pil_weights(in_size: int, out_size: int, interpolation: str = "bicubic") -> np.ndarray:
    """(out_size, in_size) float64 matrix of PIL's quantised integer weights for resampling one
    axis from ``in_size`` to ``out_size`` pixels (Resample.c: precompute_coeffs and
    normalize_coeffs_8bpc)."""
    fn, support = _FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    out = np.zeros((out_size, in_size), np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        w = fn((np.arange(xmin, xmax) - center + 0.5) / filterscale)
        total = w.sum()
        if total != 0.0:
            w = w / total
        # C's (int) cast truncates towards zero: weights round half away from zero
        out[xx, xmin:xmax] = np.trunc(w * (1 << _PRECISION_BITS) + np.where(w < 0, -0.5, 0.5))
    return out


def _weights_on(in_size: int, out_size: int, interpolation: str, keep: slice,
                device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(
        pil_weights(in_size, out_size, interpolation)[keep])).to(device)


def _round_clip(x: torch.Tensor) -> torch.Tensor:
    """PIL's clip8: (sum + half) >> PRECISION_BITS, clipped to 0..255."""
    return torch.floor_((x + (1 << (_PRECISION_BITS - 1))) / (1 << _PRECISION_BITS)).clamp_(0, 255)


def _vertical_first_rule() -> bool:
    """Whether the installed Pillow resizes vertically first when the height shrinks by more
    than twice as many pixels as the width (Pillow >= 13; earlier ones always go horizontal
    first). Probed once on a tiny image, so the passes follow the Pillow next to us."""
    from PIL import Image

    img = (np.arange(8 * 5).reshape(8, 5) * 37 % 251).astype(np.uint8)
    ref = np.asarray(Image.fromarray(img).resize((3, 2), Image.BICUBIC)).astype(np.float64)
    x = torch.from_numpy(img).double()
    kw = torch.from_numpy(pil_weights(5, 3))
    kh = torch.from_numpy(pil_weights(8, 2))
    vertical = _round_clip(_round_clip(kh @ x) @ kw.T).numpy()
    horizontal = _round_clip(kh @ _round_clip(x @ kw.T)).numpy()
    return bool(np.array_equal(vertical, ref) and not np.array_equal(horizontal, ref))


@lru_cache(maxsize=1)
def vertical_first_rule() -> bool:
    return _vertical_first_rule()


def vertical_first(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """PIL's order of the two passes for resizing ``in_hw`` to ``out_hw`` (both needed)."""
    (h, w), (oh, ow) = in_hw, out_hw
    return vertical_first_rule() and oh < h and (h - oh) > 2 * (w - ow)


def pil_resize(x: torch.Tensor, hw: tuple[int, int], interpolation: str = "bicubic",
               rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
    """(N, C, H, W) uint8 (any device) -> float32 levels 0..255 of PIL's ``resize(hw)``,
    restricted to output ``rows`` x ``cols`` (a crop of the result, computed alone)."""
    n, c, h, w = x.shape
    out_h, out_w = int(hw[0]), int(hw[1])
    if (h, w) == (out_h, out_w):
        return x[..., rows, cols].float()
    kw = _weights_on(w, out_w, interpolation, cols, x.device) if w != out_w else None
    kh = _weights_on(h, out_h, interpolation, rows, x.device) if h != out_h else None
    v_first = kw is not None and kh is not None and vertical_first((h, w), (out_h, out_w))

    def horizontal(y: torch.Tensor) -> torch.Tensor:
        return _round_clip(y @ kw.T) if kw is not None else y[..., cols]

    def vertical(y: torch.Tensor) -> torch.Tensor:
        return _round_clip(torch.matmul(kh, y)) if kh is not None else y[..., rows, :]

    parts = []
    for s in range(0, n, _SLICE):
        y = x[s:s + _SLICE].double()     # each pass is stored as 8-bit levels, as in PIL
        y = horizontal(vertical(y)) if v_first else vertical(horizontal(y))
        parts.append(y.float())
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class ImageRecipe:
    """One model's eval preprocessing (open_clip's PreprocessCfg, the fields that matter)."""

    size: tuple[int, int]
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def describe(self) -> str:
        how = (f"{self.interpolation} resize of the shorter side to {self.size[0]}, centre crop "
               f"{self.size[0]}x{self.size[1]}" if self.resize_mode == "shortest" else
               f"{self.interpolation} resize to {self.size[0]}x{self.size[1]} (aspect not kept)")
        return f"RGB frame, PIL-exact {how}, /255, mean {self.mean} / std {self.std}"


def recipe_from_cfg(cfg: dict) -> ImageRecipe:
    """open_clip's preprocess config dict -> :class:`ImageRecipe`."""
    size = cfg["size"]
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mean, std = cfg.get("mean") or OPENAI_MEAN, cfg.get("std") or OPENAI_STD
    mean = tuple(mean) * 3 if len(tuple(mean)) == 1 else tuple(mean)
    std = tuple(std) * 3 if len(tuple(std)) == 1 else tuple(std)
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation == "random":      # open_clip uses bicubic at inference for it
        interpolation = "bicubic"
    return ImageRecipe(size, tuple(float(v) for v in mean), tuple(float(v) for v in std),
                       interpolation, cfg.get("resize_mode") or "shortest")


def preprocess(frames_u8: torch.Tensor, recipe: ImageRecipe, crops: str = "center") -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 3, size) float32 network input, equal to torchvision's
    ``Resize`` + ``CenterCrop`` + ``ToTensor`` + ``Normalize`` on each frame as a PIL image;
    with 5 / 10 crops, its FiveCrop / TenCrop in place of the centre crop: ``(N, V, 3, size)``
    (only the ``shortest`` resize leaves anything to crop)."""
    h, w = frames_u8.shape[-2:]
    th, tw = recipe.size
    if recipe.resize_mode == "squash":
        x = pil_resize(frames_u8, (th, tw), recipe.interpolation)
    elif recipe.resize_mode == "shortest":
        if th == tw:
            hw = short_side_size(h, w, th)      # torchvision Resize(int)
        else:                                   # open_clip's ResizeKeepRatio (non-square)
            ratio = min(h / th, w / tw)
            hw = (round(h / ratio), round(w / ratio))
        top = int(round((hw[0] - th) / 2.0))    # torchvision CenterCrop offsets
        left = int(round((hw[1] - tw) / 2.0))
        if top < 0 or left < 0:
            raise ValueError(f"resized frame {hw} smaller than the crop {recipe.size}")
        # (open_clip's ResizeKeepRatio is always bicubic)
        interpolation = recipe.interpolation if th == tw else "bicubic"
        if crops == "center":  # only the crop's pixels are computed
            x = pil_resize(frames_u8, hw, interpolation, slice(top, top + th), slice(left, left + tw))
        else:
            x = crop_views(pil_resize(frames_u8, hw, interpolation), (th, tw), crops,
                           lambda y: y[..., top:top + th, left:left + tw])
    else:
        raise ValueError(f"resize_mode {recipe.resize_mode!r} is not supported")
    x = x / 255.0
    return normalize(x, recipe.mean, recipe.std)


__all__ = ["OPENAI_MEAN", "OPENAI_STD", "ImageRecipe", "pil_resize", "pil_weights", "preprocess",
           "recipe_from_cfg"]
