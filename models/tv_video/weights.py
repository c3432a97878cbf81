"""torchvision's Kinetics-400 video checkpoints: one weight card and one model spec each.

A spec holds what the model's ``Weights`` entry (``KINETICS400_V1``, each model's ``DEFAULT``)
says: the file (URL; torchvision publishes the first 8 hex digits of its sha256 in the name,
and a download must match them), the ``VideoClassification`` transform (resize, crop, mean,
std), and the clip its accuracy is stated for (``clip_len`` frames at ``frame_rate``, from the
entry's docs and torchvision's video recipe). The values are written out here, so that a card
is plain data; the tests check every one against torchvision's own entry.

Clip lengths: 16 frames for the video ResNets and MViT, 32 for Swin3D (their documented
clip_len); S3D was trained on 64-frame clips (torchvision's recipe) and evaluated on 128, and
64 is taken (half the cost, its training length). Frame rates: 15 fps, MViT 7.5 fps.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from video_features.models.tv_video.net import TVVideoFeatures
from video_features.utils.weights import WeightCard, load_checkpoint_into, register_card, use_random_weights

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
MVIT_MEAN, MVIT_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_URL = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class ModelSpec:
    """One ``model_name``: its torchvision builder and weights entry, card, preprocessing and
    the clip it was made for."""

    name: str
    weights: str                  # torchvision.models.get_weight() name of the entry
    card: WeightCard
    resize: tuple[int, ...]       # (h, w), or (short side,) with the long side truncated
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    clip_len: int                 # default stack_size / step_size
    frame_rate: float             # default extraction_fps (model_fps=true)
    feature_dim: int
    head_attr: str                # the attribute holding the final classifier
    min_frames: int = 1           # fewest frames per clip the network accepts
    exact_frames: bool = False    # MViT: fixed positional embeddings take exactly clip_len


def _describe(resize: tuple, crop: tuple, mean: tuple, std: tuple, clip_len: int,
              frame_rate: float, **_) -> str:
    """The card's preprocessing text, from the spec's numbers."""
    size = (f"short side {resize[0]} (long side truncated)" if len(resize) == 1
            else f"{resize[0]}x{resize[1]}")
    return (f"uint8 RGB frames, bilinear resize without antialias to {size}, rounded to uint8, "
            f"centre crop {crop[0]}x{crop[1]} at round((H - h) / 2), / 255, mean {mean} / std "
            f"{std} (the Weights entry's VideoClassification transform); clips of {clip_len} "
            f"frames at {frame_rate:g} fps")


def _spec(name: str, weights: str, filename: str, layout: str, **kw) -> ModelSpec:
    card = register_card(WeightCard(
        name=f"torchvision_{name}_kinetics400_v1",
        url=_URL + filename,
        sha256=filename.rsplit("-", 1)[1].split(".")[0],  # the prefix in the file name
        filename=filename,
        layout=layout,
        preprocessing=_describe(**kw),
        num_classes=400,
        extra={"torchvision_weights": weights, "labels": "kinetics400 (torchvision's categories)",
               "clip_len": kw["clip_len"], "frame_rate": kw["frame_rate"]},
    ))
    return ModelSpec(name, weights, card, **kw)


_RESNET = dict(resize=(128, 171), crop=(112, 112), mean=KINETICS_MEAN, std=KINETICS_STD,
               clip_len=16, frame_rate=15.0, feature_dim=512, head_attr="fc")
_RESNET_LAYOUT = ("torchvision VideoResNet state dict (stem.0.weight, {conv}, ..., "
                  "fc.weight (400, 512), fc.bias)")
_SWIN = dict(resize=(256,), crop=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
             clip_len=32, frame_rate=15.0, head_attr="head")
_SWIN_LAYOUT = ("torchvision SwinTransformer3d state dict (patch_embed.proj.weight, "
                "features.0.0.attn.relative_position_bias_table, ..., norm.weight, head.weight "
                "(400, {dim}), head.bias)")
_MVIT = dict(resize=(256,), crop=(224, 224), mean=MVIT_MEAN, std=MVIT_STD, clip_len=16,
             frame_rate=7.5, feature_dim=768, head_attr="head", min_frames=16, exact_frames=True)
_MVIT_LAYOUT = ("torchvision MViT state dict (conv_proj.weight, pos_encoding.class_token, "
                "blocks.0.attn.qkv.weight, ..., norm.weight, head.1.weight (400, 768), head.1.bias)")

SPECS: dict[str, ModelSpec] = {s.name: s for s in (
    _spec("r3d_18", "R3D_18_Weights.KINETICS400_V1", "r3d_18-b3b3357e.pth",
          _RESNET_LAYOUT.format(conv="layer1.0.conv1.0.weight"),
          **_RESNET),
    _spec("mc3_18", "MC3_18_Weights.KINETICS400_V1", "mc3_18-a90a0ba3.pth",
          _RESNET_LAYOUT.format(conv="layer1.0.conv1.0.weight"),
          **_RESNET),
    _spec("r2plus1d_18", "R2Plus1D_18_Weights.KINETICS400_V1", "r2plus1d_18-91a641e6.pth",
          _RESNET_LAYOUT.format(conv="layer1.0.conv1.0.0.weight"), **_RESNET),
    _spec("s3d", "S3D_Weights.KINETICS400_V1", "s3d-d76dad2f.pth",
          "torchvision S3D state dict (features.0.0.0.weight, features.5.branch1.1.0.0.weight, "
          "..., classifier.1.weight (400, 1024, 1, 1, 1), classifier.1.bias)",
          resize=(256, 256), crop=(224, 224), mean=KINETICS_MEAN, std=KINETICS_STD, clip_len=64,
          frame_rate=15.0, feature_dim=1024, head_attr="classifier", min_frames=14),
    _spec("mvit_v1_b", "MViT_V1_B_Weights.KINETICS400_V1", "mvit_v1_b-dbeb1030.pth",
          _MVIT_LAYOUT, **_MVIT),
    _spec("mvit_v2_s", "MViT_V2_S_Weights.KINETICS400_V1", "mvit_v2_s-ae3be167.pth",
          _MVIT_LAYOUT.replace("blocks.0.attn.qkv.weight", "blocks.0.attn.rel_pos_h"), **_MVIT),
    _spec("swin3d_t", "Swin3D_T_Weights.KINETICS400_V1", "swin3d_t-7615ae03.pth",
          _SWIN_LAYOUT.format(dim=768), feature_dim=768, **_SWIN),
    _spec("swin3d_s", "Swin3D_S_Weights.KINETICS400_V1", "swin3d_s-da41c237.pth",
          _SWIN_LAYOUT.format(dim=768), feature_dim=768, **_SWIN),
    _spec("swin3d_b", "Swin3D_B_Weights.KINETICS400_V1", "swin3d_b_1k-24f7c7c6.pth",
          _SWIN_LAYOUT.format(dim=1024), feature_dim=1024, **_SWIN),
)}
MODEL_NAMES = tuple(SPECS)
DEFAULT_MODEL = "r2plus1d_18"


def spec_for(model_name: str) -> ModelSpec:
    try:
        return SPECS[model_name]
    except KeyError:
        raise ValueError(f"unknown tv_video model_name {model_name!r}; choose one of "
                         f"{', '.join(MODEL_NAMES)}") from None


def build_torchvision(model_name: str) -> torch.nn.Module:
    """torchvision's own network of ``model_name``, untrained (its layout, its init)."""
    import torchvision.models.video as tvv

    return getattr(tvv, model_name)(weights=None)


def load_network(cfg: object, device: torch.device) -> TVVideoFeatures:
    """The pretrained network of ``cfg.model_name`` on ``device`` in eval mode, loaded strictly
    through the card (explicit path -> hub cache -> verified download -> error); random only
    on explicit request."""
    spec = spec_for(getattr(cfg, "model_name", DEFAULT_MODEL))
    net = build_torchvision(spec.name)
    path = getattr(cfg, "checkpoint_path", None)
    if not use_random_weights(getattr(cfg, "allow_random_weights", False), path,
                              f"tv_video {spec.name}"):
        # files saved before BatchNorm stored num_batches_tracked (unused at inference) load too
        load_checkpoint_into(net, spec.card, path, fill_bn_counters=True)
    return TVVideoFeatures(net, spec.head_attr).to(device).eval()


def write_random_checkpoint(path: str | Path, model_name: str = DEFAULT_MODEL,
                            seed: int = 0) -> Path:
    """The state dict of torchvision's network built with ``weights=None`` under ``seed``:
    random weights in the exact published layout (tests, benchmarks)."""
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_torchvision(model_name).state_dict(), path)
    return path


def labels(model_name: str = DEFAULT_MODEL) -> list[str]:
    """Kinetics-400 class names in index order: the Weights entry's ``meta["categories"]``."""
    import torchvision

    return list(torchvision.models.get_weight(spec_for(model_name).weights).meta["categories"])
