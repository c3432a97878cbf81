"""BatchNorm folding (models/fold_bn.py): the folded network computes what the network with its
BatchNorm passes computes, for the layouts the CPU paths fold (ResNet blocks' convN / bnN
attributes, convolution + BatchNorm neighbours in a Sequential, a Sequential ending in a
convolution)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from video_features.models.fold_bn import fold_batchnorm


def _random_stats(net: nn.Module) -> nn.Module:
    """Running statistics and affine terms away from the identity, so folding has work to do."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
    return net.eval()


def _bns(net: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_a_folded_torchvision_resnet_gives_the_same_features(name):
    from video_features.models.resnet.net import ResNetFeatures, build_resnet

    torch.manual_seed(0)
    net = ResNetFeatures(_random_stats(build_resnet(name)))
    folded = fold_batchnorm(copy.deepcopy(net))
    assert _bns(net) > 0 and _bns(folded) == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        want, got = net(x), folded(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_sequential_neighbours_and_a_nested_convolution_are_folded():
    torch.manual_seed(0)
    net = _random_stats(nn.Sequential(
        nn.Conv3d(3, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU(),
        nn.Sequential(nn.Conv3d(4, 5, (1, 3, 3), padding=(0, 1, 1)), nn.Conv3d(5, 6, (3, 1, 1))),
        nn.BatchNorm3d(6), nn.ReLU(),
        nn.BatchNorm3d(6)))   # after a ReLU: not foldable, kept
    folded = fold_batchnorm(copy.deepcopy(net))
    assert _bns(folded) == 1 and isinstance(folded[-1], nn.BatchNorm3d)
    x = torch.randn(2, 3, 4, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_a_batchnorm_in_training_mode_is_not_folded():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert _bns(fold_batchnorm(net)) == 1
