"""S3D clip features: stacks of frames (64 at 25 fps by default) -> 1024-d vectors.

Two weight families (option ``weights``), each with the preprocessing it belongs to:

``reference``    the reference tool's kylemin/S3D checkpoint and its recipe: frames / 255,
                 bilinear resize (no antialias) by the factor 224 / short side, centre crop 224,
                 values in [0, 1] (no mean/std). kylemin trained on [-1, 1] (I3D convention);
                 ``input_range=symmetric`` gives that, ``unit`` (default) the reference's numbers.
``torchvision``  ``S3D_Weights.KINETICS400_V1`` with its Weights entry's transform: resize to
                 256x256 (aspect not kept, no antialias, rounded to uint8), centre crop 224,
                 Kinetics mean/std.

An explicit ``checkpoint_path`` is recognised by its keys; the layout found decides the
preprocessing. Frames are decoded in chunks and preprocessed on the device; memory is bounded
by the batch, not by the video's length (the reference reads whole videos into memory).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from video_features.models.base import Extractor, StackOptions
from video_features.models.fold_bn import fold_batchnorm
from video_features.models.s3d.net import FEATURE_DIM, MIN_FRAMES
from video_features.models.s3d.weights import FAMILIES, card_for, labels, load_s3d
from video_features.utils.config import Config, option
from video_features.utils.errors import ConfigError, VideoError
from video_features.utils.pipeline import rows_of
from video_features.utils.transforms import crop_views, normalize
from video_features.utils.windows import SlidingWindows, stack_windows

log = logging.getLogger(__name__)

CROP = 224
TV_RESIZE = (256, 256)
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
INPUT_RANGES = ("unit", "symmetric")


def _center(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop with torchvision's ``round((H - size) / 2)`` offset. A side shorter than
    ``size`` is kept whole (the reference's slicing does the same): the reference's resize by
    a scale factor floors, so some short sides (55, 71, 110, ... pixels) come out at 223."""
    h, w = x.shape[-2:]
    top, left = max(int(round((h - size) / 2.0)), 0), max(int(round((w - size) / 2.0)), 0)
    return x[..., top:top + size, left:left + size]


def preprocess_reference(frames_u8: torch.Tensor, symmetric: bool = False,
                         crops: str = "center") -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 3, 224, 224) in [0, 1] ([-1, 1] with ``symmetric``), the
    reference recipe: divide first, then resize with the scale factor itself (not the ratio of
    the rounded sizes) mapping output to input pixels."""
    x = frames_u8.float() / 255.0
    scale = float(CROP) / min(x.shape[-2:])
    x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False,
                      recompute_scale_factor=False)
    x = crop_views(x, CROP, crops, lambda y: _center(y, CROP))
    return x * 2.0 - 1.0 if symmetric else x


def preprocess_torchvision(frames_u8: torch.Tensor, crops: str = "center") -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 3, 224, 224), as torchvision's VideoClassification transform:
    resize the uint8 frames to 256x256 (float bilinear, rounded back to whole levels), crop,
    / 255, normalise."""
    x = F.interpolate(frames_u8.float(), size=TV_RESIZE, mode="bilinear", align_corners=False,
                      antialias=False).round_().clamp_(0, 255)
    x = crop_views(x, CROP, crops, lambda y: _center(y, CROP)) / 255.0
    return normalize(x, KINETICS_MEAN, KINETICS_STD)


@dataclasses.dataclass
class S3DOptions(StackOptions):
    weights: str = option(
        "reference: the reference tool's kylemin/S3D Kinetics-400 checkpoint and preprocessing; "
        "torchvision: S3D_Weights.KINETICS400_V1 with its own preprocessing (an explicit "
        "checkpoint_path is recognised by its keys and its layout's preprocessing is used)",
        choices=tuple(FAMILIES), changes_values=True)
    input_range: str = option(
        "pixel range of the reference weights' input: unit ([0, 1], the reference tool) or "
        "symmetric ([-1, 1], as kylemin/S3D was trained); torchvision weights normalise with "
        "mean/std instead", choices=INPUT_RANGES, changes_values=True)


@dataclasses.dataclass
class _S3DVideo:
    windows: SlidingWindows
    #: batch key of this video's stacks: their crop size is part of it, so a rare 223-row crop
    #: is never batched with 224-row ones
    key: str | None = None


class S3DExtractor(Extractor):
    output_keys = ("s3d", "fps", "timestamps_ms")
    auto_batch_size = {"cpu": 1, "cuda": 8}
    schema = S3DOptions
    frame_seam = True

    @classmethod
    def validate(cls, cfg: Config) -> None:
        if cfg.stack_size < MIN_FRAMES:
            raise ConfigError(f"option stack_size must be at least {MIN_FRAMES} for s3d (its body "
                              f"shrinks time by 8 and pools over 2 steps), got {cfg.stack_size}")
        if cfg.weights == "torchvision" and cfg.input_range != "unit":
            raise ConfigError("option input_range applies to weights=reference only; "
                              "torchvision weights normalise with their own mean/std")

    @classmethod
    def weights_for(cls, cfg: Config) -> dict:
        return {"s3d": (card_for(cfg.weights, cfg.checkpoint_path), cfg.checkpoint_path)}

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.net, self.layout = load_s3d(cfg, self.device)
        # CPUs: channels-last layout, oneDNN's fast path for 3D convolutions, with BatchNorm
        # folded into the convolutions: one 64-frame stack on 2 cores took 2.3 s in the default
        # layout, 1.35 s channels-last, 1.2 s channels-last and folded (features within 1e-7
        # relative). GPUs run the network as loaded.
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.net = fold_batchnorm(self.net).to(memory_format=torch.channels_last_3d)
        if self.layout == "torchvision" and cfg.input_range != "unit":
            log.warning("s3d: input_range=%s is ignored for a checkpoint in the torchvision "
                        "layout (it normalises with mean/std)", cfg.input_range)
        self.labels = labels() if cfg.show_pred else []

    def preprocess(self, frames_u8: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, 3, 224, 224) network input of this run's weight family."""
        if self.layout == "torchvision":
            return preprocess_torchvision(frames_u8, self.cfg.crops)
        return preprocess_reference(frames_u8, symmetric=self.cfg.input_range == "symmetric",
                                    crops=self.cfg.crops)

    def chunk_frames(self) -> int:
        # frames are converted to float at full size before the resize (the reference's
        # order): small chunks bound that memory (16 x 1080p x 3 x 4 bytes = 0.4 GB)
        return 16

    def begin(self, work: Any) -> None:
        work.state = _S3DVideo(SlidingWindows(self.cfg.stack_size, self.cfg.step_size,
                                              self.cfg.tail))

    def _stacks(self, state: _S3DVideo, windows: list) -> list:
        stacked = stack_windows(windows)
        if not stacked:
            return []
        if state.key is None:
            h, w = stacked[0].shape[-2:]
            state.key = "s3d" if (h, w) == (CROP, CROP) else f"s3d_{h}x{w}"
        return [(state.key, *stacked)]

    def add_frames(self, work: Any, frames: torch.Tensor, stamps: np.ndarray) -> list:
        return self._stacks(work.state, work.state.windows.push(self.preprocess(frames), stamps))

    def end_frames(self, work: Any, end_s: float | None = None) -> list:
        return self._stacks(work.state, work.state.windows.finish())

    @torch.inference_mode()
    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        x = batch.permute(0, 2, 1, 3, 4)  # (B, T, C, H, W) -> (B, C, T, H, W)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.net(x)

    @torch.inference_mode()
    def finish(self, work: Any) -> dict[str, np.ndarray]:
        cfg = self.cfg
        feats, stamps = (None, None) if work.state.key is None else rows_of(work, work.state.key)
        if feats is None:
            fps = f" at {work.fps:g} fps" if work.fps else ""
            raise VideoError(f"too short: fewer than stack_size={cfg.stack_size} frames "
                             f"({work.frames}{fps})")
        if cfg.show_pred:
            probs = self.over_views(lambda f: torch.softmax(self.net.head(f), -1), feats)
            self.print_predictions(f"{work.path} stack", probs, self.labels)
        out = feats.float().cpu().numpy()
        assert out.shape[-1] == FEATURE_DIM
        return {"s3d": out, "fps": np.array(work.fps, dtype=np.float64), "timestamps_ms": self.row_times(work, stamps)}
