"""ResNet-18/34/50/101/152 as torchvision builds them, split into body (features) and head."""
from __future__ import annotations

import torch
from torch import nn

NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def feature_dim(model_name: str) -> int:
    return 512 if model_name in ("resnet18", "resnet34") else 2048


def build_resnet(model_name: str) -> nn.Module:
    """Untrained network with torchvision's module names (so its checkpoints load strictly)."""
    if model_name not in NAMES:
        raise ValueError(f"unknown ResNet {model_name!r}")
    # imported here: torchvision's model zoo costs a second of start-up, which a run that finds
    # every input done (or fails validation) should not pay
    import torchvision

    return getattr(torchvision.models, model_name)(weights=None)


class ResNetFeatures(nn.Module):
    """``forward`` gives the pooled penultimate features; ``head`` the 1000 ImageNet logits."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.resnet = resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        x = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        return torch.flatten(r.avgpool(x), 1)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.resnet.fc(feats)
