"""Weight cards of the R(2+1)D models: torchvision's r2plus1d_18 KINETICS400_V1 and the
IG-65M R(2+1)D-34 models fine-tuned on Kinetics-400 that moabitcoin/ig65m-pytorch publishes
(the checkpoints the reference tool loads for each ``model_name``).

Both publishers embed the first 8 hex digits of the file's sha256 in its name; a card keeps
that prefix and a download must match it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from video_features.models.r21d.net import (MODELS, R2PLUS1D_18, R2PLUS1D_34_8, R2PLUS1D_34_32, R21DFeatures,
                             build_r21d)
from video_features.utils.weights import (WeightCard, get_card, load_checkpoint_into, register_card,
                           use_random_weights)

#: the same recipe for every model, as the reference applies it (ig65m-pytorch's own tools use
#: the same Kinetics mean / std)
PREPROCESSING = ("frames / 255, bilinear resize to 128x171 without antialias, Kinetics mean "
                 "(0.43216, 0.394666, 0.37645) / std (0.22803, 0.22145, 0.216989), centre crop "
                 "112 with offset round((size - 112) / 2)")

CARD = register_card(WeightCard(
    name="r2plus1d_18_kinetics400_v1",
    url="https://download.pytorch.org/models/r2plus1d_18-91a641e6.pth",
    sha256="91a641e6",  # torchvision publishes this sha256 prefix in the file name
    filename="r2plus1d_18-91a641e6.pth",
    layout="torchvision VideoResNet state dict (stem.0.weight, layer1.0.conv1.0.0.weight, ..., fc.weight)",
    preprocessing=PREPROCESSING,
    num_classes=400,
))

_IG65M_RELEASE = "https://github.com/moabitcoin/ig65m-pytorch/releases/download/v1.0.0/"
_IG65M_LAYOUT = ("torchvision VideoResNet(BasicBlock, Conv2Plus1D, [3, 4, 6, 3], R2Plus1dStem) "
                 "state dict (stem.0.weight, layer1.0.conv1.0.0.weight, ..., fc.weight (400, 512)) "
                 "with Caffe2 middle widths in layer{2,3,4}.0.conv2.0 (288 / 576 / 1152 channels); "
                 "BatchNorm eps 1e-3 (not stored in the file)")


def _ig65m_card(name: str, filename: str, hub_entry: str, clip: int) -> WeightCard:
    return register_card(WeightCard(
        name=name,
        url=_IG65M_RELEASE + filename,
        sha256=filename.rsplit("-", 1)[1].split(".")[0],
        filename=filename,
        layout=_IG65M_LAYOUT,
        preprocessing=PREPROCESSING,
        num_classes=400,
        extra={"hub_entry": f"moabitcoin/ig65m-pytorch:{hub_entry}", "clip_frames": clip,
               "pretrained_on": "IG-65M, fine-tuned on Kinetics-400"},
    ))


CARD_34_32 = _ig65m_card("r2plus1d_34_clip32_ft_kinetics_from_ig65m",
                         "r2plus1d_34_clip32_ft_kinetics_from_ig65m-ade133f1.pth",
                         "r2plus1d_34_32_kinetics", 32)
CARD_34_8 = _ig65m_card("r2plus1d_34_clip8_ft_kinetics_from_ig65m",
                        "r2plus1d_34_clip8_ft_kinetics_from_ig65m-0aa0550b.pth",
                        "r2plus1d_34_8_kinetics", 8)


@dataclass(frozen=True)
class ModelSpec:
    """A ``model_name``: its checkpoint and the stack / step it was trained on (the
    reference's defaults when stack_size / step_size are null)."""

    card: WeightCard
    stack_size: int
    step_size: int


SPECS: dict[str, ModelSpec] = {
    R2PLUS1D_18: ModelSpec(CARD, 16, 16),
    R2PLUS1D_34_32: ModelSpec(CARD_34_32, 32, 32),
    R2PLUS1D_34_8: ModelSpec(CARD_34_8, 8, 8),
}
assert tuple(SPECS) == MODELS

LABELS_FILE = Path(__file__).resolve().parent.parent / "i3d" / "labels" / "kinetics400.txt"


def spec_for(model_name: str) -> ModelSpec:
    try:
        return SPECS[model_name]
    except KeyError:
        raise ValueError(f"unknown r21d model_name {model_name!r}; choose one of "
                         f"{', '.join(MODELS)}") from None


def card_for(model_name: str) -> WeightCard:
    return get_card(spec_for(model_name).card.name)


def load_r21d(cfg: object, device: torch.device) -> R21DFeatures:
    """The pretrained network of ``cfg.model_name`` (default R(2+1)D-18) on ``device`` in eval
    mode; random only on explicit request."""
    model_name = getattr(cfg, "model_name", R2PLUS1D_18)
    path = getattr(cfg, "checkpoint_path", None)
    if use_random_weights(getattr(cfg, "allow_random_weights", False), path, f"r21d {model_name}"):
        net = build_r21d(model_name)
    else:
        net = build_r21d(model_name, init=False)  # a strict load overwrites every tensor
        load_checkpoint_into(net, card_for(model_name), path,
                             fill_bn_counters=model_name != R2PLUS1D_18)
    return R21DFeatures(net).to(device).eval()


def random_state_dict(model_name: str = R2PLUS1D_18, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the exact layout of ``model_name``'s published file.

    For the IG-65M models the BatchNorm statistics and affine parameters are random as well
    (a fresh network has mean 0 / var 1 / weight 1 / bias 0 everywhere), so that BatchNorm's
    epsilon and every running statistic visibly matter in parity tests."""
    torch.manual_seed(seed)
    net = build_r21d(model_name)
    if model_name != R2PLUS1D_18:
        gen = torch.Generator().manual_seed(seed)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                n = m.num_features
                # ranges that keep activations O(1-10) through the 34 layers
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.05 + 1.45 * torch.rand(n, generator=gen))
                m.weight.data.copy_(0.3 + 0.7 * torch.rand(n, generator=gen))
                m.bias.data.copy_(0.1 * torch.randn(n, generator=gen))
                m.num_batches_tracked.fill_(0)
    return net.state_dict()


def write_random_checkpoint(path: str | Path, seed: int = 0,
                            model_name: str = R2PLUS1D_18) -> Path:
    """:func:`random_state_dict` saved at ``path`` (tests, benchmarks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_state_dict(model_name, seed), path)
    return path


def labels() -> list[str]:
    """Kinetics-400 class names in class-index order: the alphabetical list both torchvision's
    r2plus1d_18 and the IG-65M Kinetics heads use (the reference tool's K400 list)."""
    return LABELS_FILE.read_text().splitlines()
