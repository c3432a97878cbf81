"""timm's eval transform on batches of device tensors, equal to it on PIL images.

``timm.data.create_transform(**resolve_model_data_config(model), is_training=False)`` is a
torchvision pipeline on PIL images: a resize whose size depends on ``crop_mode`` and
``crop_pct``, a centre crop (padding where the resized image is smaller), ``ToTensor`` and
``Normalize``. The resize is PIL's fixed-point resampling, recomputed exactly by
:func:`models.clip.preprocess.pil_resize` (bicubic and bilinear: the only interpolations timm's
pretrained configs use); the sizes and offsets below follow timm 1.0's
``transforms_imagenet_eval``:

* ``center``: scale = floor(img_size / crop_pct) per side; a square scale resizes the shorter
  side to it (torchvision ``Resize(int)``: the longer side truncated), a non-square one scales
  by ``min`` of the two ratios (timm ``ResizeKeepRatio``: both sides rounded); then
  ``CenterCrop(img_size)``.
* ``squash``: resize to exactly the scale (aspect not kept), then ``CenterCrop(img_size)``.
* ``border``: scale by the ``max`` of the two ratios (the whole frame fits), then
  ``CenterCropOrPad`` with the fill ``round(255 * mean)`` per channel.

Only the output pixels that survive the crop are computed when nothing is padded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from video_features.models.clip.preprocess import pil_resize
from video_features.utils.transforms import channel_constant, crop_views, normalize

#: interpolations models.clip.preprocess resamples exactly as PIL does
INTERPOLATIONS = ("bicubic", "bilinear")
CROP_MODES = ("center", "squash", "border")
#: timm's default when a config gives no crop_pct (timm.data.constants.DEFAULT_CROP_PCT)
DEFAULT_CROP_PCT = 0.875


@dataclass(frozen=True)
class TimmRecipe:
    """The fields of timm's data config that its eval transform reads."""

    size: tuple[int, int]                 # network input (h, w)
    interpolation: str = "bicubic"
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = "center"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def scale(self) -> tuple[int, int]:
        return (math.floor(self.size[0] / self.crop_pct), math.floor(self.size[1] / self.crop_pct))

    def describe(self) -> str:
        (h, w), (sh, sw) = self.size, self.scale
        how = {"center": f"resize of the shorter side to {sh}" if sh == sw else
                         f"resize keeping the aspect to cover {sh}x{sw}",
               "squash": f"resize to {sh}x{sw} (aspect not kept)",
               "border": f"resize keeping the aspect to fit {sh}x{sw}, padded with the mean"}
        return (f"RGB frame, PIL-exact {self.interpolation} {how[self.crop_mode]}, centre crop "
                f"{h}x{w} (timm crop_mode={self.crop_mode}, crop_pct={self.crop_pct:g}), /255, "
                f"mean {self.mean} / std {self.std}")

    def plan(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int, int, int], int, int]:
        """For an ``h`` x ``w`` frame: the resized (h, w), the padding (left, top, right,
        bottom) added around it, and the crop's top and left in the padded image."""
        th, tw = self.size
        sh, sw = self.scale
        if self.crop_mode == "squash":
            hw = (sh, sw)
        elif self.crop_mode == "center" and sh == sw:
            hw = (sh, int(sh * w / h)) if h <= w else (int(sh * h / w), sh)
        else:   # timm ResizeKeepRatio: longest=0 (center) covers, longest=1 (border) fits
            rh, rw = h / sh, w / sw
            ratio = max(rh, rw) if self.crop_mode == "border" else min(rh, rw)
            hw = (round(h / ratio), round(w / ratio))
        pad_w, pad_h = max(tw - hw[1], 0), max(th - hw[0], 0)
        pad = (pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2)
        ph, pw = hw[0] + pad_h, hw[1] + pad_w
        return hw, pad, int(round((ph - th) / 2.0)), int(round((pw - tw) / 2.0))

    def fill(self) -> tuple[float, ...]:
        """Levels of the padded pixels: border mode pads with the mean, CenterCrop with 0."""
        return tuple(float(round(255 * m)) for m in self.mean) if self.crop_mode == "border" \
            else (0.0,) * len(self.mean)


def _triple(v: Any) -> tuple[float, float, float]:
    v = tuple(float(x) for x in (v if isinstance(v, (tuple, list)) else (v,)))
    return v * 3 if len(v) == 1 else v


def recipe_from_data_config(cfg: Mapping[str, Any]) -> TimmRecipe:
    """``timm.data.resolve_model_data_config``'s dict -> :class:`TimmRecipe`; ValueError for
    what cannot be reproduced exactly."""
    size = cfg["input_size"]
    if len(size) != 3 or int(size[0]) != 3:
        raise ValueError(f"input_size {tuple(size)}: only 3-channel (RGB) inputs are supported")
    interpolation = str(cfg.get("interpolation") or "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r} is not supported "
                         f"({', '.join(INTERPOLATIONS)})")
    crop_mode = str(cfg.get("crop_mode") or "center")
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode {crop_mode!r} is not one of {', '.join(CROP_MODES)}")
    return TimmRecipe((int(size[1]), int(size[2])), interpolation,
                      float(cfg.get("crop_pct") or DEFAULT_CROP_PCT), crop_mode,
                      _triple(cfg["mean"]), _triple(cfg["std"]))


def preprocess(frames_u8: torch.Tensor, recipe: TimmRecipe, crops: str = "center") -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 3, h, w) float32 network input, equal to timm's eval transform
    on each frame as a PIL image; with 5 / 10 crops, torchvision's FiveCrop / TenCrop of the
    resized (padded) frame in place of the centre crop: ``(N, V, 3, h, w)``."""
    h, w = frames_u8.shape[-2:]
    th, tw = recipe.size
    hw, pad, top, left = recipe.plan(h, w)
    if crops != "center":
        x = _padded(pil_resize(frames_u8, hw, recipe.interpolation), recipe, pad)
        x = crop_views(x, (th, tw), crops, lambda y: y[..., top:top + th, left:left + tw])
    elif not any(pad):  # only the crop's pixels are computed
        x = pil_resize(frames_u8, hw, recipe.interpolation, slice(top, top + th),
                       slice(left, left + tw))
    else:   # rare (an upscaled border / tiny frame): pad the whole resized frame, then crop
        x = _padded(pil_resize(frames_u8, hw, recipe.interpolation), recipe, pad)
        x = x[..., top:top + th, left:left + tw]
    x = x / 255.0                          # ToTensor
    return normalize(x, recipe.mean, recipe.std).contiguous()  # Normalize


def _padded(x: torch.Tensor, recipe: TimmRecipe, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """The resized frames ``x`` with ``pad`` (left, top, right, bottom) of the recipe's fill."""
    if not any(pad):
        return x
    fill = channel_constant(recipe.fill(), x)[None]
    h, w = x.shape[-2:]
    out = fill.expand(x.shape[0], -1, h + pad[1] + pad[3], w + pad[0] + pad[2]).clone()
    out[..., pad[1]:pad[1] + h, pad[0]:pad[0] + w] = x
    return out


__all__ = ["CROP_MODES", "INTERPOLATIONS", "TimmRecipe", "preprocess", "recipe_from_data_config"]
