"""A torchvision video classifier split at its final classifier layer.

Features are what that layer reads (512-d for the video ResNets, 1024-d for S3D, 768-d for
MViT and Swin3D-T/S, 1024-d for Swin3D-B); the layer itself is kept as ``head`` so that
``show_pred`` gives torchvision's own logits. The split swaps the layer for an identity inside
torchvision's module, so the body runs torchvision's forward unchanged, pooling included.
"""
from __future__ import annotations

import torch
from torch import nn


class TVVideoFeatures(nn.Module):
    def __init__(self, net: nn.Module, head_attr: str):
        super().__init__()
        self.classifier = getattr(net, head_attr)
        setattr(net, head_attr, nn.Identity())
        self.body = net
        # S3D classifies with a 1x1x1 convolution before its mean over time and space; on the
        # pooled vector that is the same affine map (the mean commutes with it)
        self.conv_head = any(isinstance(m, nn.Conv3d) for m in self.classifier.modules())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) normalised clips -> (B, D) pre-classifier features."""
        return self.body(x)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, D) features -> (B, 400) Kinetics logits, as the full torchvision model gives."""
        if self.conv_head:
            return self.classifier(feats[:, :, None, None, None]).flatten(1)
        return self.classifier(feats)
