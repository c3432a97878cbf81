"""Weight card of torchvision's r2plus1d_18 KINETICS400_V1 (the weights the reference tool uses)."""
from __future__ import annotations

from pathlib import Path

import torch

from models.r21d.net import R21DFeatures, build_r2plus1d_18
from utils.weights import WeightCard, load_checkpoint_into, use_random_weights, register_card

CARD = register_card(WeightCard(
    name="r2plus1d_18_kinetics400_v1",
    url="https://download.pytorch.org/models/r2plus1d_18-91a641e6.pth",
    sha256="91a641e6",  # torchvision publishes this sha256 prefix in the file name
    filename="r2plus1d_18-91a641e6.pth",
    layout="torchvision VideoResNet state dict (stem.0.weight, layer1.0.conv1.0.0.weight, ..., fc.weight)",
    preprocessing="frames / 255, bilinear resize to 128x171 without antialias, Kinetics mean "
                  "(0.43216, 0.394666, 0.37645) / std (0.22803, 0.22145, 0.216989), centre crop 112",
    num_classes=400,
))

LABELS_FILE = Path(__file__).resolve().parent.parent / "i3d" / "labels" / "kinetics400.txt"


def load_r21d(cfg: object, device: torch.device) -> R21DFeatures:
    net = build_r2plus1d_18()
    path = getattr(cfg, "checkpoint_path", None)
    if not use_random_weights(getattr(cfg, "allow_random_weights", False), path, "r21d"):
        load_checkpoint_into(net, CARD, path)
    return R21DFeatures(net).to(device).eval()


def write_random_checkpoint(path: str | Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_r2plus1d_18().state_dict(), path)
    return path


def labels() -> list[str]:
    return LABELS_FILE.read_text().splitlines()
