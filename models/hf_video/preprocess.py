"""The model's own processor (transformers' video or image processor of the repo), run on the
frames where they already are (the device), chunk by chunk: resize, centre crop, rescale and
normalise are the processor's own code, so its output is the processor's output on the same
decoded frames. Multi-crop testing (``crops=5|10``) resizes with the processor, takes the views
of its crop size, then rescales and normalises them with the processor.
"""
from __future__ import annotations

from typing import Any

import torch

from video_features.utils.transforms import crop_views


class OnDevice:
    def __init__(self, processor: Any):
        from transformers.video_processing_utils import BaseVideoProcessor

        self.processor = processor
        self.video = isinstance(processor, BaseVideoProcessor)
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop",
                                                                False) else None
        self.crop = (int(crop["height"]), int(crop["width"])) if crop else None

    def _call(self, frames: torch.Tensor, **kw: Any) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> the processor's (N, 3, h, w)."""
        if self.video:
            out = self.processor(videos=[frames], return_tensors="pt", do_sample_frames=False, **kw)
        else:
            out = self.processor(images=list(frames), return_tensors="pt", **kw)
        x = next(v for k, v in out.items() if k.startswith("pixel_values"))
        return x[0] if x.dim() == 5 else x

    def __call__(self, frames: torch.Tensor, crops: str = "center") -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, 3, h, w) float32; 5 / 10 crops in place of the processor's
        centre crop: ``(N, V, 3, h, w)`` (utils.transforms.crop_views)."""
        frames = frames.contiguous()
        if crops == "center":
            return self._call(frames)
        resized = self._call(frames, do_center_crop=False, do_rescale=False, do_normalize=False)
        ch, cw = self.crop

        def center(x: torch.Tensor) -> torch.Tensor:   # the processor's own centre crop
            return self._call(x.flatten(0, -4), do_resize=False, do_rescale=False,
                              do_normalize=False).unflatten(0, x.shape[:-3])

        views = crop_views(resized, (ch, cw), crops, center)
        flat = self._call(views.flatten(0, 1), do_resize=False, do_center_crop=False)
        return flat.unflatten(0, views.shape[:2])

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """The processor's output size for (h, w) frames (run on one blank frame)."""
        return tuple(self._call(torch.zeros(1, 3, h, w, dtype=torch.uint8)).shape[-2:])
