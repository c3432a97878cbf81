"""R(2+1)D-18 as torchvision builds it, split into the pooled 512-d body and the classifier."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.video import r2plus1d_18


def build_r2plus1d_18(num_classes: int = 400) -> nn.Module:
    return r2plus1d_18(weights=None, num_classes=num_classes)


class R21DFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, 112, 112) -> (B, 512), the input of the classifier."""
        n = self.net
        x = n.layer4(n.layer3(n.layer2(n.layer1(n.stem(x)))))
        return n.avgpool(x).flatten(1)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net.fc(feats)
