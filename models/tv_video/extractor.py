"""torchvision video model zoo clip features: clips of frames -> the vector each model feeds its
Kinetics-400 classifier (512-d R3D/MC3/R(2+1)D-18, 1024-d S3D, 768-d MViT and Swin3D-T/S,
1024-d Swin3D-B).

Each ``model_name`` runs as torchvision's Weights entry prescribes (models/tv_video/weights.py):
its VideoClassification transform, and by default its clip (``stack_size`` / ``step_size``
null) and its frame rate (``model_fps``, when neither ``extraction_fps`` nor
``extraction_total`` is given): a clip model sees the stretch of time it was trained on only at
that rate (16 frames are 1.1 s at 15 fps, 0.5 s of a 30 fps video). ``model_fps=false`` keeps
the native rate. The transform is re-done in torch on the device on chunks of uint8 frames, with
the same operations in the same order (float bilinear resize without antialias, rounding back
to whole levels, centre crop, / 255, mean / std), so it equals torchvision's; frames are
preprocessed once, then windowed, so overlapping clips share them.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from video_features.models.base import Extractor, StackOptions
from video_features.models.tv_video.weights import (DEFAULT_MODEL, MODEL_NAMES, ModelSpec, labels, load_network,
                                     spec_for)
from video_features.utils.config import Config, option
from video_features.utils.errors import ConfigError, VideoError
from video_features.utils.pipeline import rows_of
from video_features.utils.transforms import center_crop, crop_views, normalize
from video_features.utils.windows import SlidingWindows, stack_windows

log = logging.getLogger(__name__)

#: frames converted to float at full size at a time: bounds preprocessing memory on large
#: videos (8 x 1080p x 3 x 4 bytes = 200 MB) whatever the chunk size
PREPROCESS_FRAMES = 8


def resized_size(h: int, w: int, resize: tuple[int, ...]) -> tuple[int, int]:
    """torchvision's output size: (h, w) as given, or the short side set and the long side
    truncated to int."""
    if len(resize) == 2:
        return int(resize[0]), int(resize[1])
    n = int(resize[0])
    return (n, int(n * w / h)) if h <= w else (int(n * h / w), n)


def preprocess(frames_u8: torch.Tensor, spec: ModelSpec, crops: str = "center") -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 3, crop, crop) float32, the Weights entry's transform (5 / 10
    crops: ``(N, V, 3, crop, crop)``, see :func:`utils.transforms.crop_views`)."""
    h, w = frames_u8.shape[-2:]
    size = resized_size(h, w, spec.resize)
    out = []
    for part in frames_u8.split(PREPROCESS_FRAMES):
        # torchvision resizes uint8 as float and rounds back to uint8 (its _cast_squeeze_out)
        x = F.interpolate(part.float(), size=size, mode="bilinear", align_corners=False,
                          antialias=False).round_()
        # every spec resizes to at least its crop, so torchvision's zero padding never applies
        x = crop_views(x, spec.crop, crops, lambda y: center_crop(y, spec.crop, offset="round"))
        x = x / 255.0
        out.append(normalize(x, spec.mean, spec.std))
    return out[0] if len(out) == 1 else torch.cat(out)


@dataclasses.dataclass
class TVVideoOptions(StackOptions):
    model_name: str = option(
        "torchvision Kinetics-400 video model: r3d_18 | mc3_18 | r2plus1d_18 (512-d) | s3d "
        "(1024-d) | mvit_v1_b | mvit_v2_s (768-d, 16-frame clips only) | swin3d_t | swin3d_s "
        "(768-d) | swin3d_b (1024-d)", choices=MODEL_NAMES, changes_values=True)
    stack_size: Optional[int] = option(
        "frames per clip; null: the model's own (16; s3d 64; swin3d 32); mvit takes exactly 16",
        at_least=1, changes_values=True)
    step_size: Optional[int] = option(
        "frames between the starts of consecutive clips; null: the stack size in use "
        "(back-to-back clips)", at_least=1, changes_values=True)
    model_fps: bool = option(
        "when extraction_fps and extraction_total are null: true picks frames at the rate the "
        "model's weights are documented for (15 fps; mvit 7.5 fps), false keeps the native rate")


def resolve(cfg: Config) -> Config:
    """``cfg`` with the model's defaults filled in: stack_size, step_size, extraction_fps."""
    spec = spec_for(cfg.model_name)
    stack = spec.clip_len if cfg.stack_size is None else cfg.stack_size
    fps = cfg.extraction_fps
    if fps is None and cfg.get("extraction_total") is None and cfg.model_fps:
        fps = spec.frame_rate
    return cfg.replace(stack_size=stack, step_size=stack if cfg.step_size is None else cfg.step_size,
                       extraction_fps=fps)


class TVVideoExtractor(Extractor):
    output_keys = ("tv_video", "fps", "timestamps_ms")
    auto_batch_size = {"cpu": 1, "cuda": 8}
    schema = TVVideoOptions
    frame_seam = True

    @classmethod
    def validate(cls, cfg: Config) -> Config:
        cfg = resolve(cfg)
        spec = spec_for(cfg.model_name)
        if spec.exact_frames and cfg.stack_size != spec.clip_len:
            raise ConfigError(f"option stack_size={cfg.stack_size}: {spec.name} takes clips of "
                              f"exactly {spec.clip_len} frames (fixed positional embeddings)")
        if cfg.stack_size < spec.min_frames:
            raise ConfigError(f"option stack_size={cfg.stack_size}: {spec.name} needs at least "
                              f"{spec.min_frames} frames per clip")
        return cfg

    @classmethod
    def weights_for(cls, cfg: Config) -> dict:
        return {"tv_video": (spec_for(cfg.model_name).card, cfg.checkpoint_path)}

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(self.validate(cfg), device)
        self.spec = spec_for(self.cfg.model_name)
        self.net = load_network(self.cfg, self.device)
        self.labels = labels(self.spec.name) if self.cfg.show_pred else []
        log.info("tv_video %s: clips of %d frames, step %d, at %s, %d-d features",
                 self.spec.name, self.cfg.stack_size, self.cfg.step_size,
                 f"{self.cfg.extraction_fps:g} fps" if self.cfg.extraction_fps else "the native rate",
                 self.spec.feature_dim)

    def chunk_frames(self) -> int:
        return 16

    def begin(self, work: Any) -> None:
        work.state = SlidingWindows(self.cfg.stack_size, self.cfg.step_size, self.cfg.tail)

    @staticmethod
    def _stacks(windows: list) -> list:
        stacked = stack_windows(windows)
        return [("tv_video", *stacked)] if stacked else []

    def add_frames(self, work: Any, frames: torch.Tensor, stamps: np.ndarray) -> list:
        return self._stacks(work.state.push(preprocess(frames, self.spec, self.cfg.crops), stamps))

    def end_frames(self, work: Any, end_s: float | None = None) -> list:
        return self._stacks(work.state.finish())

    @torch.inference_mode()
    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch.permute(0, 2, 1, 3, 4))  # (B, T, C, H, W) -> (B, C, T, H, W)

    @torch.inference_mode()
    def finish(self, work: Any) -> dict[str, np.ndarray]:
        feats, stamps = rows_of(work, "tv_video")
        if feats is None:
            fps = f" at {work.fps:g} fps" if work.fps else ""
            raise VideoError(f"too short: fewer than stack_size={self.cfg.stack_size} frames "
                             f"({work.frames}{fps})")
        if self.cfg.show_pred:
            probs = self.over_views(lambda f: torch.softmax(self.net.head(f), -1), feats)
            self.print_predictions(f"{work.path} {self.spec.name} clip", probs, self.labels)
        out = feats.float().cpu().numpy()
        assert out.shape[-1] == self.spec.feature_dim
        return {"tv_video": out, "fps": np.array(work.fps, dtype=np.float64),
                "timestamps_ms": self.row_times(work, stamps)}
