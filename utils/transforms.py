"""Batched image preprocessing on the device.

The reference preprocessing runs PIL per frame: resize (bilinear with antialias), which yields
uint8, then crop and normalise. These functions do the same on whole batches of frames on the
GPU (or CPU): the resize uses an antialiased bilinear kernel like PIL's and rounds back to whole
levels (see :func:`resize` for how exact that is).
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_device(frames: np.ndarray, device: torch.device, pinned: bool = False) -> torch.Tensor:
    """(N, H, W, 3) uint8 numpy -> (N, 3, H, W) uint8 tensor on ``device``, copied
    asynchronously from page-locked memory: ``frames`` itself when ``pinned`` (the caller keeps
    it unchanged until the copy has run), else a pinned copy of it."""
    t = torch.from_numpy(np.ascontiguousarray(frames))
    device = torch.device(device)
    if device.type == "cuda":
        t = (t if pinned else t.pin_memory()).to(device, non_blocking=True)
    return t.permute(0, 3, 1, 2)


def pick_frames(held: torch.Tensor | None, frames: torch.Tensor,
                picks: np.ndarray) -> torch.Tensor:
    """The frames :class:`utils.video.SlotSelector` picked: ``picks`` index ``frames``, and -1
    means ``held`` (the ``(C, H, W)`` frame kept from the chunk before)."""
    if held is None or not (picks < 0).any():
        source, index = frames, picks
    else:
        source, index = torch.cat([held[None], frames]), picks + 1
    return source[torch.as_tensor(index, dtype=torch.long, device=source.device)]


def short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Output (h, w) when the shorter side becomes ``size``; the longer is truncated to int,
    as torchvision's Resize(int) and the reference tool compute it."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def resize(x: torch.Tensor, hw: tuple[int, int], antialias: bool = True,
           round_to_uint8: bool = True) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) to ``hw``; returns float32 in [0, 255].

    With ``round_to_uint8`` the result is the 8-bit image PIL returns: on the CPU a uint8 input
    takes torch's uint8 kernel, whose fixed-point rounding differs from PIL's in about 2e-5 of
    the values, by one level; elsewhere (GPU, float input) the resize runs as PIL does,
    horizontal pass then vertical pass, each rounded to 8 bits, which leaves about 1% of values
    one (rarely two) levels off.
    """
    hw = (int(hw[0]), int(hw[1]))
    if tuple(x.shape[-2:]) == hw:
        return x.float()
    if round_to_uint8 and x.dtype == torch.uint8 and x.device.type == "cpu":
        return F.interpolate(x, size=hw, mode="bilinear", align_corners=False,
                             antialias=antialias).float()
    x = x.float()
    if not round_to_uint8:
        return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=antialias)
    h, w = x.shape[-2:]
    if w != hw[1]:
        x = F.interpolate(x, size=(h, hw[1]), mode="bilinear", align_corners=False,
                          antialias=antialias).round_().clamp_(0, 255)
    if h != hw[0]:
        x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False,
                          antialias=antialias).round_().clamp_(0, 255)
    return x


def resize_short_side(x: torch.Tensor, size: int, antialias: bool = True,
                      round_to_uint8: bool = True) -> torch.Tensor:
    h, w = x.shape[-2:]
    return resize(x, short_side_size(h, w, size), antialias, round_to_uint8)


def center_crop(x: torch.Tensor, size: int | tuple[int, int], offset: str = "round") -> torch.Tensor:
    """Centre crop of the last two dims. ``offset='round'`` is torchvision's CenterCrop
    (``round((H - h) / 2)``), ``'floor'`` is ``(H - h) // 2`` as the reference I3D code uses."""
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = x.shape[-2:]
    if th > h or tw > w:
        raise ValueError(f"crop {th}x{tw} larger than frame {h}x{w}")
    if offset == "round":
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    elif offset == "floor":
        top, left = (h - th) // 2, (w - tw) // 2
    else:
        raise ValueError(f"offset must be round or floor, got {offset!r}")
    return x[..., top:top + th, left:left + tw]


def channel_constant(values: tuple[float, ...] | list[float], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a ``(C, 1, 1)`` tensor of ``like``'s dtype on its device, made once per
    (values, dtype, device): building it per call is a blocking host-to-device copy on a GPU,
    which empties the queue of work in front of it."""
    return _channel_constant(tuple(float(v) for v in values), like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _channel_constant(values: tuple[float, ...], dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):   # a normal tensor, usable in and out of inference mode
        return torch.tensor(values, dtype=dtype, device=device).view(-1, 1, 1)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std over the channel axis (dim -3)."""
    return (x - channel_constant(mean, x)) / channel_constant(std, x)


#: values of the ``crops`` option, and the views each yields per frame or stack
CROPS = {"center": 1, "5": 5, "10": 10}


def n_views(crops: str | None) -> int:
    """Views per frame or stack under ``crops`` (1 for types without the option)."""
    return CROPS[str(crops or "center")]


def crop_views(x: torch.Tensor, size: int | tuple[int, int], crops: str,
               center: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The ``crops`` of every image of ``x`` (..., C, H, W).

    ``center``: ``center(x)``, the feature type's own centre crop, shape unchanged. ``5`` and
    ``10``: ``(..., V, C, h, w)``, views stacked before the channels, in the order of
    torchvision's FiveCrop (top-left, top-right, bottom-left, bottom-right, centre) and TenCrop
    (those five, then the same five of the horizontally flipped image). The centre view is
    ``center``'s, so view 4 is exactly the ``center`` output. A side shorter than the crop is
    kept whole (as ``center`` keeps it, see s3d).
    """
    if crops == "center":
        return center(x)
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = x.shape[-2:]
    th, tw = min(th, h), min(tw, w)

    def five(img: torch.Tensor) -> list[torch.Tensor]:
        return [img[..., :th, :tw], img[..., :th, w - tw:], img[..., h - th:, :tw],
                img[..., h - th:, w - tw:], center(img)]

    views = five(x)
    if crops == "10":
        views += five(x.flip(-1))
    elif crops != "5":
        raise ValueError(f"crops must be one of {', '.join(CROPS)}, got {crops!r}")
    return torch.stack(views, dim=-4)
