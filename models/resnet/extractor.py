"""Frame-wise ResNet features: every frame (at the chosen fps) -> one pooled vector."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from video_features.models.base import CropOptions, Extractor
from video_features.models.fold_bn import fold_batchnorm
from video_features.models.resnet.net import NAMES, feature_dim
from video_features.models.resnet.weights import card_for, labels, load_resnet
from video_features.utils.config import Config, option
from video_features.utils.errors import VideoError
from video_features.utils.pipeline import rows_of
from video_features.utils.transforms import (IMAGENET_MEAN, IMAGENET_STD, center_crop, crop_views,
                                             normalize, resize_short_side)


def preprocess(frames_u8: torch.Tensor, crops: str = "center") -> torch.Tensor:
    """(N, 3, H, W) uint8 -> network input, equal to torchvision's ImageNet transform per PIL
    frame; with 5 / 10 crops ``(N, V, 3, 224, 224)``, its FiveCrop / TenCrop in place of the
    centre crop."""
    x = resize_short_side(frames_u8, 256, antialias=True)
    x = crop_views(x, 224, crops, lambda y: center_crop(y, 224, offset="round"))
    return normalize(x / 255.0, IMAGENET_MEAN, IMAGENET_STD)


@dataclasses.dataclass
class ResNetOptions(CropOptions):
    model_name: str = option("resnet18 | resnet34 | resnet50 | resnet101 | resnet152 "
                             "(ImageNet-1k IMAGENET1K_V1 weights)", choices=NAMES,
                             changes_values=True)


class ResNetExtractor(Extractor):
    output_keys = ("resnet", "fps", "timestamps_ms")
    auto_batch_size = {"cpu": 8, "cuda": 64}
    schema = ResNetOptions

    @classmethod
    def weights_for(cls, cfg: Config) -> dict:
        return {"resnet": (card_for(cfg.model_name), cfg.checkpoint_path)}

    frame_seam = True

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.net = load_resnet(cfg.model_name, cfg, self.device)
        if self.device.type == "cpu":
            # BatchNorm folded into the convolutions: ResNet-50 on 2 cores, 8 frames took
            # 0.53 s instead of 0.61 s (features within 1e-6 relative). GPUs run it as loaded.
            fold_batchnorm(self.net)
        self.labels = labels() if cfg.show_pred else []

    def chunk_frames(self) -> int:
        return self.cfg.batch_size

    def add_frames(self, work, frames: torch.Tensor, stamps: np.ndarray) -> list:
        return [("resnet", preprocess(frames, self.cfg.crops), stamps)]

    @torch.inference_mode()
    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch.contiguous(memory_format=torch.channels_last))

    @torch.inference_mode()
    def finish(self, work) -> dict[str, np.ndarray]:
        feats, stamps = rows_of(work, "resnet")
        if feats is None:
            raise VideoError("no frames to extract features from")
        if self.cfg.show_pred:
            probs = self.over_views(lambda f: torch.softmax(self.net.head(f), -1), feats)
            self.print_predictions(f"{work.path} frame", probs, self.labels)
        out = feats.float().cpu().numpy()
        assert out.shape[-1] == feature_dim(self.cfg.model_name)
        return {"resnet": out, "fps": np.array(work.fps, dtype=np.float64),
                "timestamps_ms": self.row_times(work, stamps)}
