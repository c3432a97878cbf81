"""S3D in the layout of torchvision's ``s3d``, split into the pooled 1024-d body and the classifier.

Both published Kinetics-400 checkpoints (kylemin/S3D, which the reference tool ships, and
torchvision's ``S3D_Weights.KINETICS400_V1``) describe the same layer stack: separable
(1xkxk then kx1x1) convolutions, BatchNorm with eps 1e-3, the same nine inception blocks and
max-pools, and a biased 1x1x1 convolution over 400 classes. Only the key names differ
(see :mod:`models.s3d.weights`), so one network serves both.

The layers are written out here rather than taken from torchvision, whose import costs a run
about a second of start-up; tests/test_s3d.py holds the features equal to torchvision's ``s3d``
and to an independent statement of the reference's layer stack.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 1024
#: fewest frames a stack can have: the body shrinks time by 8 (13 frames -> 2 steps) and the
#: final average pool spans 2 steps
MIN_FRAMES = 13
#: BatchNorm epsilon of both checkpoints (torchvision's S3D and kylemin/S3D)
BN_EPS = 1e-3


def _unit(cin: int, cout: int, kernel=1, stride=1, padding=0) -> nn.Sequential:
    """Conv3d (no bias), BatchNorm3d, ReLU: keys 0 and 1 (torchvision's Conv3dNormActivation)."""
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride, padding, bias=False),
                         nn.BatchNorm3d(cout, eps=BN_EPS, momentum=0.001), nn.ReLU(inplace=True))


def _separable(cin: int, cout: int, k: int, stride: int, pad: int) -> nn.Sequential:
    """A 1xkxk spatial unit, then a kx1x1 temporal one (torchvision's TemporalSeparableConv)."""
    return nn.Sequential(_unit(cin, cout, (1, k, k), (1, stride, stride), (0, pad, pad)),
                         _unit(cout, cout, (k, 1, 1), (stride, 1, 1), (pad, 0, 0)))


class Inception(nn.Module):
    """Four branches concatenated on channels (torchvision's SepInceptionBlock3D)."""

    def __init__(self, cin: int, b0: int, b1_mid: int, b1: int, b2_mid: int, b2: int, b3: int):
        super().__init__()
        self.branch0 = _unit(cin, b0)
        self.branch1 = nn.Sequential(_unit(cin, b1_mid), _separable(b1_mid, b1, 3, 1, 1))
        self.branch2 = nn.Sequential(_unit(cin, b2_mid), _separable(b2_mid, b2, 3, 1, 1))
        self.branch3 = nn.Sequential(nn.MaxPool3d(3, 1, 1), _unit(cin, b3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class S3D(nn.Module):
    """S3D with the module tree (so the state-dict keys) of torchvision's ``s3d``."""

    def __init__(self, num_classes: int = 400) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _separable(3, 64, 7, 2, 3),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            _unit(64, 64),
            _separable(64, 192, 3, 1, 1),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            Inception(192, 64, 96, 128, 16, 32, 32),
            Inception(256, 128, 128, 192, 32, 96, 64),
            nn.MaxPool3d(3, 2, 1),
            Inception(480, 192, 96, 208, 16, 48, 64),
            Inception(512, 160, 112, 224, 24, 64, 64),
            Inception(512, 128, 128, 256, 24, 64, 64),
            Inception(512, 112, 144, 288, 32, 64, 64),
            Inception(528, 256, 160, 320, 32, 128, 128),
            nn.MaxPool3d(2, 2, 0),
            Inception(832, 256, 160, 320, 32, 128, 128),
            Inception(832, 384, 192, 384, 48, 128, 128),
        )
        self.avgpool = nn.AvgPool3d((2, 7, 7), stride=1)
        self.classifier = nn.Sequential(nn.Dropout(0.2),
                                        nn.Conv3d(1024, num_classes, 1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.classifier(self.avgpool(self.features(x)))
        return x.mean(dim=(2, 3, 4))


def build_s3d(num_classes: int = 400) -> nn.Module:
    return S3D(num_classes)


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
