"""S3D checkpoints: two weight cards, their key layouts, layout detection, loading, labels.

``kylemin``      kylemin/S3D ``S3D_kinetics400.pt`` as the reference tool ships it
                 (``models/s3d/checkpoint/S3D_kinetics400_torchified.pt``): keys such as
                 ``base.0.conv_s.weight``, ``base.0.bn_t.running_var``,
                 ``base.5.branch1.1.conv_s.weight``, ``base.15.branch3.1.bn.bias``, ``fc.0.bias``
                 (kylemin's own file may prefix every key with ``module.``).
``torchvision``  ``torchvision.models.video.S3D_Weights.KINETICS400_V1`` (``s3d-d76dad2f.pth``):
                 ``features.0.0.0.weight``, ``features.5.branch1.1.0.0.weight``,
                 ``classifier.1.bias``.

Both are the same network (see :mod:`models.s3d.net`); the kylemin keys are renamed onto
torchvision's module tree. Each family keeps its own preprocessing: the one it was used with.

Digests: the reference tool's file lives in its git tree (no release, no LFS) and no sha256 of
it is published; its git blob id at the pinned commit of the URL is recorded in
``extra["git_blob_sha1"]`` and :mod:`utils.weights` checks a fresh download against it.
torchvision publishes the first 8 hex digits of the sha256 in the file name.
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import torch

from video_features.models.s3d.net import S3DFeatures, build_s3d
from video_features.utils.errors import WeightsError
from video_features.utils.weights import (WeightCard, load_checkpoint_into, register_card, use_random_weights)

log = logging.getLogger(__name__)

#: ``weights`` option value -> key layout of its checkpoint
FAMILIES = {"reference": "kylemin", "torchvision": "torchvision"}

REFERENCE_PREPROCESSING = (
    "RGB frames / 255, bilinear resize (no antialias) by the factor 224 / short side "
    "(torch interpolate with that scale factor, as the reference tool calls it; the long side is "
    "floored), centre crop 224 with offset round((H - 224) / 2), values in [0, 1] "
    "(input_range=symmetric: [-1, 1], kylemin's training convention); no mean/std")
TORCHVISION_PREPROCESSING = (
    "RGB uint8 frames, bilinear resize (no antialias) to 256x256, rounded to uint8, centre crop "
    "224, / 255, Kinetics mean (0.43216, 0.394666, 0.37645) / std (0.22803, 0.22145, 0.216989) "
    "(the Weights entry's VideoClassification transform)")

# pinned commit, so that the recorded git blob id names the bytes behind the URL
_VIASHIN = ("https://raw.githubusercontent.com/v-iashin/video_features/"
            "a2f61b7a4cf0ca6a2d91dcc2182f57e7cfd12664/models/s3d/checkpoint/")

REFERENCE_CARD = register_card(WeightCard(
    name="s3d_kylemin_kinetics400",
    url=_VIASHIN + "S3D_kinetics400_torchified.pt",
    sha256="",  # none published; the git blob id below identifies the file
    filename="S3D_kinetics400_torchified.pt",
    layout="kylemin/S3D state dict (base.0.conv_s.weight, base.0.bn_s.running_mean, ..., "
           "base.15.branch3.1.bn.bias, fc.0.weight, fc.0.bias)",
    preprocessing=REFERENCE_PREPROCESSING,
    num_classes=400,
    extra={"git_blob_sha1": "65b27cbb412937b3dd705f4216cb822d679535df",
           "key_layout": "kylemin",
           "original": "https://drive.google.com/uc?export=download&id=1HJVDBOQpnTMDVUM3SsXLy0HUkf_wryGO",
           "labels": "kinetics400 (alphabetical, kylemin/S3D label_map.txt)"},
))

TORCHVISION_CARD = register_card(WeightCard(
    name="s3d_torchvision_kinetics400_v1",
    url="https://download.pytorch.org/models/s3d-d76dad2f.pth",
    sha256="d76dad2f",  # torchvision publishes this sha256 prefix in the file name
    filename="s3d-d76dad2f.pth",
    layout="torchvision S3D state dict (features.0.0.0.weight, features.5.branch1.1.0.0.weight, "
           "..., classifier.1.weight, classifier.1.bias)",
    preprocessing=TORCHVISION_PREPROCESSING,
    num_classes=400,
    extra={"key_layout": "torchvision", "labels": "kinetics400 (torchvision's categories)"},
))

CARDS = {"kylemin": REFERENCE_CARD, "torchvision": TORCHVISION_CARD}
LABELS_FILE = Path(__file__).resolve().parent.parent / "i3d" / "labels" / "kinetics400.txt"

# kylemin module names -> the index path of the same module in torchvision's tree
_KYLEMIN_UNITS = {"conv_s": "0.0", "bn_s": "0.1", "conv_t": "1.0", "bn_t": "1.1",
                  "conv": "0", "bn": "1"}


def _strip_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``kylemin`` or ``torchvision``, from the key names; WeightsError for anything else."""
    keys = set(_strip_module(state))
    if "features.0.0.0.weight" in keys and "classifier.1.weight" in keys:
        return "torchvision"
    if "base.0.conv_s.weight" in keys and "fc.0.weight" in keys:
        return "kylemin"
    example = next(iter(keys), "<no keys>")
    raise WeightsError(f"not an S3D checkpoint in a known layout (first key {example!r}); expected "
                       "kylemin/S3D keys (base.0.conv_s.weight, fc.0.weight) or torchvision keys "
                       "(features.0.0.0.weight, classifier.1.weight)")


def kylemin_key(key: str) -> str:
    """One kylemin/S3D key -> torchvision's name for the same tensor.

    ``base.N`` is ``features.N``; a separable unit's ``conv_s/bn_s/conv_t/bn_t`` are the
    (spatial, temporal) x (conv, norm) children ``0.0/0.1/1.0/1.1``; a plain unit's ``conv/bn``
    are ``0/1``; torchvision's ``branch0`` is the unit itself, not a one-element Sequential;
    ``fc.0`` is ``classifier.1`` (after the dropout).
    """
    parts = key.split(".")
    if parts[:2] == ["fc", "0"] and len(parts) == 3:
        return "classifier.1." + parts[2]
    if parts[0] != "base" or len(parts) < 4 or parts[-2] not in _KYLEMIN_UNITS:
        raise WeightsError(f"unexpected key {key!r} in a kylemin/S3D checkpoint")
    path = ["features", *parts[1:-2]]
    if len(path) == 4 and path[2] == "branch0" and path[3] == "0":
        path = path[:3]
    return ".".join([*path, _KYLEMIN_UNITS[parts[-2]], parts[-1]])


def convert_kylemin(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kylemin/S3D state dict (``module.`` prefix or not) -> torchvision's keys."""
    return {kylemin_key(k): v for k, v in _strip_module(state).items()}


def to_torchvision(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in either layout -> torchvision's keys."""
    if detect_layout(state) == "kylemin":
        return convert_kylemin(state)
    return _strip_module(state)


@lru_cache(maxsize=16)
def _file_layout(path: str, size: int, mtime_ns: int) -> str:
    # mmap: only the key table is read, not 32 MB of weights; files in the legacy (pre-zip)
    # format cannot be mapped and are read whole
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"checkpoint {path} does not hold a state dict")
    return detect_layout(state)


def file_layout(path: str | os.PathLike) -> str:
    """Key layout of a checkpoint file (``kylemin`` or ``torchvision``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"checkpoint_path {str(path)!r} for s3d does not exist")
    st = p.stat()
    try:
        return _file_layout(str(p.resolve()), st.st_size, st.st_mtime_ns)
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"cannot read checkpoint {p}: {type(exc).__name__}: {exc}") from exc


def layout_for(weights: str, checkpoint_path: str | None) -> str:
    """The key layout (and so the preprocessing) a run uses: that of an explicit
    ``checkpoint_path`` as its keys say, else that of the ``weights`` family."""
    if checkpoint_path:
        return file_layout(checkpoint_path)
    return FAMILIES[weights]


def card_for(weights: str, checkpoint_path: str | None = None) -> WeightCard:
    """The card of the checkpoint a run loads (an explicit file may be of either layout)."""
    if checkpoint_path:
        try:
            return CARDS[file_layout(checkpoint_path)]
        except WeightsError:
            pass  # reported when the extractor loads it
    return CARDS[FAMILIES[weights]]


def load_s3d(cfg: object, device: torch.device) -> tuple[S3DFeatures, str]:
    """The network on ``device`` in eval mode and the key layout of its weights (which decides
    the preprocessing); random weights only on explicit request."""
    weights = getattr(cfg, "weights", "reference")
    path = getattr(cfg, "checkpoint_path", None)
    net = build_s3d()
    if use_random_weights(getattr(cfg, "allow_random_weights", False), path, "s3d"):
        layout = FAMILIES[weights]
    else:
        layout = layout_for(weights, path)
        if layout != FAMILIES[weights]:
            log.info("s3d: checkpoint_path %s has the %s key layout, so its preprocessing is "
                     "used (weights=%s names the other family)", path, layout, weights)
        load_checkpoint_into(net, CARDS[layout], path, convert=to_torchvision,
                             fill_bn_counters=True)
    return S3DFeatures(net).to(device).eval(), layout


def write_random_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Random weights in torchvision's exact layout (tests, benchmarks)."""
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_s3d().state_dict(), path)
    return path


def labels() -> list[str]:
    """Kinetics-400 class names in index order: alphabetical, the order of kylemin/S3D's
    label_map.txt, the reference tool's K400_label_map.txt and torchvision's categories."""
    return LABELS_FILE.read_text().splitlines()
