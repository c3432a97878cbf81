"""R(2+1)D clip features: stacks of frames -> 512-d vectors, several stacks per forward pass.

``model_name`` picks R(2+1)D-18 (Kinetics-400, 16-frame stacks) or one of the IG-65M
R(2+1)D-34 models fine-tuned on Kinetics-400 (32- or 8-frame stacks); stack_size / step_size
left null take the model's own, as the reference tool does. All share one preprocessing.

Unlike the reference tool, which reads the whole video into memory, frames are decoded in
chunks, preprocessed on the device and windowed there, so memory is bounded by the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from video_features.models.base import Extractor, StackOptions
from video_features.models.fold_bn import fold_batchnorm
from video_features.models.r21d.net import MODELS
from video_features.models.r21d.weights import card_for, labels, load_r21d, spec_for
from video_features.utils.config import Config, option
from video_features.utils.errors import VideoError
from video_features.utils.pipeline import rows_of
from video_features.utils.transforms import center_crop, crop_views, normalize, resize
from video_features.utils.windows import SlidingWindows, stack_windows

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


def preprocess(frames_u8: torch.Tensor, crops: str = "center") -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 3, 112, 112): /255, bilinear (no antialias) to 128x171,
    normalise, centre crop with torchvision's rounding (the reference recipe); 5 / 10 crops:
    ``(N, V, 3, 112, 112)``, see :func:`utils.transforms.crop_views`. The crop is taken before
    normalising (per-pixel, so the numbers are the same) to normalise fewer pixels."""
    x = frames_u8.float() / 255.0
    x = resize(x, (128, 171), antialias=False, round_to_uint8=False)
    x = crop_views(x, 112, crops, lambda y: center_crop(y, 112, offset="round"))
    return normalize(x, KINETICS_MEAN, KINETICS_STD)


@dataclasses.dataclass
class R21DOptions(StackOptions):
    model_name: str = option(
        "r2plus1d_18_16_kinetics (R(2+1)D-18, Kinetics-400) | r2plus1d_34_32_ig65m_ft_kinetics | "
        "r2plus1d_34_8_ig65m_ft_kinetics (R(2+1)D-34 pre-trained on IG-65M, fine-tuned on "
        "Kinetics-400, for 32- / 8-frame clips)", choices=MODELS, changes_values=True)
    stack_size: Optional[int] = option(
        "frames per stack (clip); null: the model's own (16 for r2plus1d_18, 32 / 8 for the "
        "IG-65M models)", at_least=1, changes_values=True)
    step_size: Optional[int] = option(
        "frames between the starts of consecutive stacks; null: the model's own (= its stack "
        "size)", at_least=1, changes_values=True)


def resolve_stacks(cfg: Config) -> Config:
    """``cfg`` with null stack_size / step_size replaced by ``model_name``'s own."""
    spec = spec_for(cfg.model_name)
    return cfg.replace(
        stack_size=spec.stack_size if cfg.stack_size is None else cfg.stack_size,
        step_size=spec.step_size if cfg.step_size is None else cfg.step_size)


class R21DExtractor(Extractor):
    output_keys = ("r21d", "fps", "timestamps_ms")
    auto_batch_size = {"cpu": 1, "cuda": 16}
    schema = R21DOptions

    @classmethod
    def validate(cls, cfg: Config) -> Config:
        return resolve_stacks(cfg)

    @classmethod
    def weights_for(cls, cfg: Config) -> dict:
        return {"r21d": (card_for(cfg.model_name), cfg.checkpoint_path)}

    frame_seam = True

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(resolve_stacks(cfg), device)
        cfg = self.cfg
        self.net = load_r21d(cfg, self.device)
        # CPUs: BatchNorm folded into the convolutions and channels-last layout, oneDNN's fast
        # path for 3D convolutions (R(2+1)D-18 on 2 cores: 0.32 s per 16-frame clip instead of
        # 0.46 s; features within 3e-7 relative). GPUs run the network as loaded.
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.net = fold_batchnorm(self.net).to(memory_format=torch.channels_last_3d)
        self.labels = labels() if cfg.show_pred else []

    def chunk_frames(self) -> int:
        return max(self.cfg.step_size, 16)

    def begin(self, work) -> None:
        work.state = SlidingWindows(self.cfg.stack_size, self.cfg.step_size, self.cfg.tail)

    @staticmethod
    def _stacks(windows: list) -> list:
        stacked = stack_windows(windows)
        return [("r21d", *stacked)] if stacked else []

    def add_frames(self, work, frames: torch.Tensor, stamps: np.ndarray) -> list:
        return self._stacks(work.state.push(preprocess(frames, self.cfg.crops), stamps))

    def end_frames(self, work, end_s: float | None = None) -> list:
        return self._stacks(work.state.finish())

    @torch.inference_mode()
    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        x = batch.permute(0, 2, 1, 3, 4)  # (B, T, C, H, W) -> (B, C, T, H, W)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.net(x)

    @torch.inference_mode()
    def finish(self, work) -> dict[str, np.ndarray]:
        cfg = self.cfg
        feats, stamps = rows_of(work, "r21d")
        if feats is None:
            raise VideoError(f"too short: fewer than stack_size={cfg.stack_size} frames "
                             f"({work.frames} at {work.fps:g} fps)")
        if cfg.show_pred:
            probs = self.over_views(lambda f: torch.softmax(self.net.head(f), -1), feats)
            self.print_predictions(f"{work.path} stack", probs, self.labels)
        return {"r21d": feats.float().cpu().numpy(), "fps": np.array(work.fps, dtype=np.float64),
                "timestamps_ms": self.row_times(work, stamps)}
