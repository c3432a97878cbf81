"""Weight cards of torchvision's IMAGENET1K_V1 ResNets (the weights the reference tool uses).

torchvision publishes the first 8 hex digits of each file's sha256 in its name; the card keeps
that prefix and a download must match it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from video_features.models.resnet.net import NAMES, ResNetFeatures, build_resnet
from video_features.utils.weights import (WeightCard, get_card, load_checkpoint_into, use_random_weights,
                           register_card)

_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
    "resnet152": "resnet152-394f9c45.pth",
}
PREPROCESSING = ("RGB frame, bilinear antialiased resize of the shorter side to 256, centre crop 224, "
                 "/255, ImageNet mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225)")

for _name, _file in _FILES.items():
    register_card(WeightCard(
        name=f"{_name}_imagenet1k_v1",
        url=f"https://download.pytorch.org/models/{_file}",
        sha256=_file.rsplit("-", 1)[1].split(".")[0],
        filename=_file,
        layout="torchvision ResNet state dict (conv1.weight, bn1.*, layer1.0.conv1.weight, ..., fc.weight)",
        preprocessing=PREPROCESSING,
        num_classes=1000,
    ))

LABELS_FILE = Path(__file__).resolve().parent / "labels" / "imagenet1k.txt"


def card_for(model_name: str) -> WeightCard:
    return get_card(f"{model_name}_imagenet1k_v1")


def load_resnet(model_name: str, cfg: object, device: torch.device) -> ResNetFeatures:
    """The pretrained network on ``device`` in eval mode; random only on explicit request."""
    net = build_resnet(model_name)
    path = getattr(cfg, "checkpoint_path", None)
    if not use_random_weights(getattr(cfg, "allow_random_weights", False), path, model_name):
        load_checkpoint_into(net, card_for(model_name), path)
    # channels-last runs the convolutions 10-20% faster on CPUs (oneDNN) and on tensor-core GPUs
    return ResNetFeatures(net).to(device, memory_format=torch.channels_last).eval()


def write_random_checkpoint(path: str | Path, model_name: str, seed: int = 0) -> Path:
    """Random weights in torchvision's exact layout (tests, benchmarks)."""
    torch.manual_seed(seed)
    net = build_resnet(model_name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def labels() -> list[str]:
    return LABELS_FILE.read_text().splitlines()


__all__ = ["NAMES", "card_for", "load_resnet", "write_random_checkpoint", "labels"]
