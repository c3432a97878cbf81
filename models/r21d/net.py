"""R(2+1)D networks in the layout of torchvision's VideoResNet, split into the pooled 512-d body
and the classifier.

Two families, with the state-dict keys of their published files:
- R(2+1)D-18 as torchvision's ``r2plus1d_18`` (its KINETICS400_V1 weights).
- R(2+1)D-34 as the IG-65M conversions of moabitcoin/ig65m-pytorch build it from Caffe2 (VMZ):
  torchvision's VideoResNet(BasicBlock, Conv2Plus1D, [3, 4, 6, 3], R2Plus1dStem) with two Caffe2
  details that torchvision's generic builder lacks. In torchvision the second (2+1)D conv of a
  stage's first block reuses the middle width computed for the first conv (whose input has half
  the channels); Caffe2 computes it from the block's own width, so those three convs are wider
  (288 / 576 / 1152 middle channels). BatchNorm uses Caffe2's epsilon 1e-3 instead of 1e-5; the
  epsilon is not stored in the checkpoint, so a wrong one silently changes every feature.

The layers are written out here rather than taken from torchvision: importing torchvision costs
a run about a second of start-up (it imports torch._dynamo), and nothing else of it is needed.
tests/test_r21d.py holds the features equal to torchvision's own ``r2plus1d_18`` and to an
R(2+1)D-34 assembled from torchvision's parts.

The CPU path folds every BatchNorm into the convolution before it and runs the network in
channels-last layout (see the extractor).
"""
from __future__ import annotations

import torch
from torch import nn

R2PLUS1D_18 = "r2plus1d_18_16_kinetics"
R2PLUS1D_34_32 = "r2plus1d_34_32_ig65m_ft_kinetics"
R2PLUS1D_34_8 = "r2plus1d_34_8_ig65m_ft_kinetics"
#: the ``model_name`` values, named as the reference tool names them; the first is the default
MODELS = (R2PLUS1D_18, R2PLUS1D_34_32, R2PLUS1D_34_8)

#: BatchNorm epsilon of the Caffe2 models the IG-65M weights come from
CAFFE2_BN_EPS = 1e-3
TORCH_BN_EPS = 1e-5


def _midplanes(inplanes: int, planes: int) -> int:
    """Middle width of a (2+1)D conv from ``inplanes`` to ``planes`` channels: as many
    parameters as the full 3x3x3 conv it factorises."""
    return (inplanes * planes * 27) // (inplanes * 9 + 3 * planes)


def _conv2plus1d(inplanes: int, planes: int, midplanes: int, stride: int, eps: float) -> nn.Sequential:
    """1x3x3 spatial conv, BatchNorm, ReLU, 3x1x1 temporal conv (keys 0, 1, 3)."""
    return nn.Sequential(
        nn.Conv3d(inplanes, midplanes, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
        nn.BatchNorm3d(midplanes, eps=eps),
        nn.ReLU(inplace=True),
        nn.Conv3d(midplanes, planes, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False))


class Block(nn.Module):
    """Two (2+1)D convs with a residual connection (torchvision's BasicBlock)."""

    def __init__(self, inplanes: int, planes: int, stride: int, mid1: int, mid2: int,
                 eps: float) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(_conv2plus1d(inplanes, planes, mid1, stride, eps),
                                   nn.BatchNorm3d(planes, eps=eps), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(_conv2plus1d(planes, planes, mid2, 1, eps),
                                   nn.BatchNorm3d(planes, eps=eps))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv3d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm3d(planes, eps=eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class R2Plus1D(nn.Module):
    """VideoResNet with the R(2+1)D stem and (2+1)D blocks; ``caffe2``: the IG-65M widths.
    ``init=False`` skips torchvision's initialisation (0.14 s of start-up on a CPU) for weights
    that are loaded next."""

    def __init__(self, layers: tuple[int, ...], num_classes: int = 400, caffe2: bool = False,
                 init: bool = True) -> None:
        super().__init__()
        eps = CAFFE2_BN_EPS if caffe2 else TORCH_BN_EPS
        self.stem = nn.Sequential(
            nn.Conv3d(3, 45, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
            nn.BatchNorm3d(45, eps=eps), nn.ReLU(inplace=True),
            nn.Conv3d(45, 64, (3, 1, 1), 1, (1, 0, 0), bias=False),
            nn.BatchNorm3d(64, eps=eps), nn.ReLU(inplace=True))
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for b in range(n):
                stride = 2 if (i > 0 and b == 0) else 1
                mid1 = _midplanes(inplanes, planes)
                mid2 = _midplanes(planes, planes) if caffe2 else mid1
                blocks.append(Block(inplanes, planes, stride, mid1, mid2, eps))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules() if init else ():   # torchvision's initialisation
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.avgpool(x).flatten(1))


def build_r2plus1d_18(num_classes: int = 400, init: bool = True) -> nn.Module:
    return R2Plus1D((2, 2, 2, 2), num_classes, init=init)


def build_r2plus1d_34_ig65m(num_classes: int = 400, init: bool = True) -> nn.Module:
    """R(2+1)D-34 in the layout of the IG-65M checkpoints (see the module docstring)."""
    return R2Plus1D((3, 4, 6, 3), num_classes, caffe2=True, init=init)


def build_r21d(model_name: str = R2PLUS1D_18, num_classes: int = 400, init: bool = True) -> nn.Module:
    """The full classifier network of ``model_name`` (random weights; ``init=False``: not
    initialised as torchvision does, for weights loaded next)."""
    if model_name == R2PLUS1D_18:
        return build_r2plus1d_18(num_classes, init)
    if model_name in (R2PLUS1D_34_32, R2PLUS1D_34_8):
        return build_r2plus1d_34_ig65m(num_classes, init)
    raise ValueError(f"unknown r21d model_name {model_name!r}; choose one of {', '.join(MODELS)}")



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
