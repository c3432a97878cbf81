"""Frame-wise ResNet features: every frame (at the chosen fps) -> one pooled vector."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from models.base import Extractor
from models.resnet.net import NAMES, feature_dim
from models.resnet.weights import card_for, labels, load_resnet
from utils.config import Config, SharedOptions, option
from utils.errors import VideoError
from utils.transforms import IMAGENET_MEAN, IMAGENET_STD, center_crop, normalize, resize_short_side, to_device
from utils.video import open_frames


def preprocess(frames_u8: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> network input, equal to torchvision's ImageNet transform per PIL frame."""
    x = resize_short_side(frames_u8, 256, antialias=True)
    x = center_crop(x, 224, offset="round")
    return normalize(x / 255.0, IMAGENET_MEAN, IMAGENET_STD)


@dataclasses.dataclass
class ResNetOptions(SharedOptions):
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

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.net = load_resnet(cfg.model_name, cfg, self.device)
        self.labels = labels() if cfg.show_pred else []

    @torch.inference_mode()
    def extract(self, path: str) -> dict[str, np.ndarray]:
        feats, stamps = [], []
        with open_frames(path, self.cfg.extraction_fps, self.cfg.frames_fps,
                         timestamps=self.cfg.timestamps) as src:
            for chunk in src.chunks(self.cfg.batch_size):
                x = preprocess(to_device(chunk.frames, self.device)).contiguous(
                    memory_format=torch.channels_last)
                f = self.net(x)
                if self.cfg.show_pred:
                    probs = torch.softmax(self.net.head(f), dim=-1)
                    self.print_predictions(f"{path} frame", probs, self.labels,
                                          first=chunk.first_index)
                feats.append(f.float().cpu())
                stamps.append(chunk.timestamps_ms)
                self.count_frames(len(chunk.timestamps_ms))
            fps = src.fps
        if not feats:
            raise VideoError("no frames to extract features from")
        out = torch.cat(feats).numpy()
        assert out.shape[1] == feature_dim(self.cfg.model_name)
        return {"resnet": out, "fps": np.array(fps, dtype=np.float64),
                "timestamps_ms": np.concatenate(stamps)}
