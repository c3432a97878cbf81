"""S3D as torchvision builds it, split into the pooled 1024-d body and the classifier.

Both published Kinetics-400 checkpoints (kylemin/S3D, which the reference tool ships, and
torchvision's ``S3D_Weights.KINETICS400_V1``) describe the same layer stack: separable
(1xkxk then kx1x1) convolutions, BatchNorm with eps 1e-3, the same nine inception blocks and
max-pools, and a biased 1x1x1 convolution over 400 classes. Only the key names differ
(see :mod:`models.s3d.weights`), so one network serves both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.video import s3d

FEATURE_DIM = 1024
#: fewest frames a stack can have: the body shrinks time by 8 (13 frames -> 2 steps) and the
#: final average pool spans 2 steps
MIN_FRAMES = 13


def build_s3d(num_classes: int = 400) -> nn.Module:
    return s3d(weights=None, num_classes=num_classes)


def temporal_length(frames: int) -> int:
    """Time steps the body leaves of ``frames`` input frames (conv k7 s2 p3, pool k3 s2 p1,
    pool k2 s2)."""
    t = (frames - 1) // 2 + 1
    t = (t - 1) // 2 + 1
    return t // 2


class S3DFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, 1024): the classifier's input averaged over time.

        The map is averaged over windows of 2 time steps and the whole plane (torchvision's
        ``avgpool`` at 224x224 input, where the plane is 7x7; here the window follows the map,
        as in the reference tool's forward, so a 223-row crop works too), then over the windows.
        The classifier is linear, so ``head`` of this vector equals the mean of the per-window
        logits that both upstream forwards return.
        """
        y = self.net.features(x)
        y = F.avg_pool3d(y, (2, y.shape[3], y.shape[4]), stride=1)
        return y.mean(dim=(2, 3, 4))

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, 1024) -> (B, num_classes) Kinetics logits."""
        conv = self.net.classifier[1]
        return F.linear(feats, conv.weight.flatten(1), conv.bias)
