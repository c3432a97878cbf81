"""R(2+1)D clip features: 16-frame stacks -> 512-d vectors, several stacks per forward pass.

Unlike the reference tool, which reads the whole video into memory, frames are decoded in
chunks, preprocessed on the device and windowed there, so memory is bounded by the batch.
"""
from __future__ import annotations

import numpy as np
import torch

from models.base import Extractor, StackOptions
from models.r21d.weights import CARD, labels, load_r21d
from utils.config import Config
from utils.errors import VideoError
from utils.transforms import center_crop, normalize, resize, to_device
from utils.video import open_frames
from utils.windows import stack_batches, windows_from

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


def preprocess(frames_u8: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 3, 112, 112): /255, bilinear (no antialias) to 128x171,
    normalise, centre crop with torchvision's rounding (the reference recipe)."""
    x = frames_u8.float() / 255.0
    x = resize(x, (128, 171), antialias=False, round_to_uint8=False)
    x = normalize(x, KINETICS_MEAN, KINETICS_STD)
    return center_crop(x, 112, offset="round")


class R21DExtractor(Extractor):
    output_keys = ("r21d", "fps", "timestamps_ms")
    auto_batch_size = {"cpu": 1, "cuda": 16}
    schema = StackOptions

    @classmethod
    def weights_for(cls, cfg: Config) -> dict:
        return {"r21d": (CARD, cfg.checkpoint_path)}

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.net = load_r21d(cfg, self.device)
        self.labels = labels() if cfg.show_pred else []

    @torch.inference_mode()
    def extract(self, path: str) -> dict[str, np.ndarray]:
        cfg = self.cfg
        feats, stamps = [], []
        with open_frames(path, cfg.extraction_fps, cfg.frames_fps, timestamps=cfg.timestamps) as src:
            def prepped():
                for chunk in src.chunks(max(cfg.step_size, 16)):
                    self.count_frames(len(chunk.timestamps_ms))
                    yield preprocess(to_device(chunk.frames, self.device)), chunk.timestamps_ms

            windows = windows_from(prepped(), cfg.stack_size, cfg.step_size, cfg.tail)
            for batch, ts in stack_batches(windows, cfg.batch_size):
                f = self.net(batch.permute(0, 2, 1, 3, 4))  # (B, T, C, H, W) -> (B, C, T, H, W)
                if cfg.show_pred:
                    self.print_predictions(f"{path} stack", torch.softmax(self.net.head(f), -1),
                                           self.labels, first=len(stamps) and sum(map(len, stamps)))
                feats.append(f.float().cpu())
                stamps.append(ts)
            fps = src.fps
        if not feats:
            raise VideoError(f"too short: fewer than stack_size={cfg.stack_size} frames "
                             f"({self.frames_read} at {fps:g} fps)")
        return {"r21d": torch.cat(feats).numpy(), "fps": np.array(fps, dtype=np.float64),
                "timestamps_ms": np.concatenate(stamps)}
