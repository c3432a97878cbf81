"""R(2+1)D networks as torchvision's VideoResNet builds them, split into the pooled 512-d body
and the classifier.

Two families:
- R(2+1)D-18 exactly as torchvision's ``r2plus1d_18`` (its KINETICS400_V1 weights).
- R(2+1)D-34 as the IG-65M conversions of moabitcoin/ig65m-pytorch build it from Caffe2 (VMZ):
  VideoResNet(BasicBlock, Conv2Plus1D, [3, 4, 6, 3], R2Plus1dStem) with two Caffe2 details that
  torchvision's generic builder lacks. In torchvision the second (2+1)D conv of a stage's first
  block reuses the middle width computed for the first conv (whose input has half the
  channels); Caffe2 computes it from the block's own width, so those three convs are wider
  (288 / 576 / 1152 middle channels). BatchNorm uses Caffe2's epsilon 1e-3 instead of 1e-5;
  the epsilon is not stored in the checkpoint, so a wrong one silently changes every feature.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.video import r2plus1d_18
from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, R2Plus1dStem, VideoResNet

R2PLUS1D_18 = "r2plus1d_18_16_kinetics"
R2PLUS1D_34_32 = "r2plus1d_34_32_ig65m_ft_kinetics"
R2PLUS1D_34_8 = "r2plus1d_34_8_ig65m_ft_kinetics"
#: the ``model_name`` values, named as the reference tool names them; the first is the default
MODELS = (R2PLUS1D_18, R2PLUS1D_34_32, R2PLUS1D_34_8)

#: BatchNorm epsilon of the Caffe2 models the IG-65M weights come from
CAFFE2_BN_EPS = 1e-3


def build_r2plus1d_18(num_classes: int = 400) -> nn.Module:
    return r2plus1d_18(weights=None, num_classes=num_classes)


def _caffe2_midplanes(planes: int) -> int:
    """Middle width of a (2+1)D conv from ``planes`` to ``planes`` channels: as many
    parameters as the full 3x3x3 conv it factorises."""
    return (planes * planes * 27) // (planes * 9 + 3 * planes)


def build_r2plus1d_34_ig65m(num_classes: int = 400) -> nn.Module:
    """R(2+1)D-34 in the layout of the IG-65M checkpoints (see the module docstring)."""
    net = VideoResNet(block=BasicBlock, conv_makers=[Conv2Plus1D] * 4, layers=[3, 4, 6, 3],
                      stem=R2Plus1dStem, num_classes=num_classes)
    for layer, planes in ((net.layer2, 128), (net.layer3, 256), (net.layer4, 512)):
        layer[0].conv2[0] = Conv2Plus1D(planes, planes, _caffe2_midplanes(planes))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.eps = CAFFE2_BN_EPS
    return net


def build_r21d(model_name: str = R2PLUS1D_18, num_classes: int = 400) -> nn.Module:
    """The full classifier network of ``model_name`` (random weights)."""
    if model_name == R2PLUS1D_18:
        return build_r2plus1d_18(num_classes)
    if model_name in (R2PLUS1D_34_32, R2PLUS1D_34_8):
        return build_r2plus1d_34_ig65m(num_classes)
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
