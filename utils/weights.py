"""Checkpoint cards and resolution: explicit path -> local cache -> verified download -> error.

Every checkpoint the tool can load has a :class:`WeightCard`. Resolution never falls back to
random weights; the only way to run without a real checkpoint is the explicit
``allow_random_weights`` option, which every loader honours through :func:`use_random_weights`
(one rule: an explicit checkpoint path always wins) with a loud warning.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from video_features.utils.errors import WeightsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightCard:
    """What we know about one published checkpoint.

    ``sha256`` is the full hex digest where it is published; where the publisher only embeds a
    prefix in the file name (torchvision, torch.hub convention) it holds that prefix and the
    downloaded file's digest must start with it. Files published only in git trees carry their
    git blob id in ``extra["git_blob_sha1"]`` instead (see :func:`verify_download`).
    """

    name: str
    url: str
    sha256: str
    filename: str
    layout: str
    preprocessing: str = ""
    num_classes: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


CARDS: dict[str, WeightCard] = {}


def register_card(card: WeightCard) -> WeightCard:
    if card.name in CARDS and CARDS[card.name] != card:
        raise ValueError(f"weight card {card.name!r} registered twice with different contents")
    CARDS[card.name] = card
    return card


def get_card(name: str) -> WeightCard:
    try:
        return CARDS[name]
    except KeyError:
        raise WeightsError(f"unknown checkpoint {name!r}; known: {', '.join(sorted(CARDS))}") from None


def cache_dir() -> Path:
    """Where downloaded checkpoints live: torch hub's checkpoint folder (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_blob_sha1(path: str | os.PathLike) -> str:
    """Git's object id of a file's content: SHA-1 over ``b"blob <size>\\0" + content``."""
    h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_download(card: WeightCard, path: str | os.PathLike) -> None:
    """Check a downloaded file against the card's sha256 (or sha256 prefix) or, for files
    published only in git trees, its git blob id (``card.extra["git_blob_sha1"]``)."""
    if card.sha256:
        digest = sha256_of(path)
        if not digest.startswith(card.sha256.lower()):
            raise WeightsError(f"{card.name}: downloaded file from {card.url} has sha256 {digest}, "
                               f"expected {card.sha256}; refusing to use it")
    elif card.extra.get("git_blob_sha1"):
        got = git_blob_sha1(path)
        if got != card.extra["git_blob_sha1"]:
            raise WeightsError(f"{card.name}: downloaded file from {card.url} has git blob id {got}, "
                               f"expected {card.extra['git_blob_sha1']}; refusing to use it")
    else:
        log.warning("%s: no published digest to check the download against", card.name)


def _download(card: WeightCard, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        log.info("downloading %s from %s", card.name, card.url)
        with urllib.request.urlopen(card.url, timeout=60) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out, length=1 << 20)
        verify_download(card, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_checkpoint(card: WeightCard, checkpoint_path: str | None = None,
                       download: bool = True) -> Path:
    """Return a local file for ``card``.

    Order: ``checkpoint_path`` (must exist) -> ``<cache_dir>/<card.filename>`` -> download into
    the cache with a hash check -> :class:`WeightsError` naming the URL and the expected path.
    """
    if checkpoint_path:
        p = Path(checkpoint_path).expanduser()
        if not p.is_file():
            raise WeightsError(f"checkpoint_path {checkpoint_path!r} for {card.name} does not exist")
        return p
    cached = cache_dir() / card.filename
    if cached.is_file():
        return cached
    if download and os.environ.get("VIDEO_FEATURES_OFFLINE", "") not in ("1", "true", "yes"):
        try:
            _download(card, cached)
            return cached
        except WeightsError:
            raise
        except Exception as exc:  # network errors of every kind end in the same advice
            reason = f"{type(exc).__name__}: {exc}"
    else:
        reason = "downloads are disabled"
    raise WeightsError(
        f"weights for {card.name} are missing and could not be downloaded ({reason}); "
        f"fetch {card.url} and put it at {cached} (or pass checkpoint_path=FILE)"
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint file into a flat state dict on the CPU.

    Accepts plain state dicts and the common wrappers (``{'state_dict': ...}``,
    ``{'model': ...}``); the caller converts key layouts.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"checkpoint {path} does not hold a state dict")
    return obj


def load_checkpoint_into(model: torch.nn.Module, card: WeightCard,
                         checkpoint_path: str | None = None,
                         convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                         fill_bn_counters: bool = False) -> Path:
    """Resolve ``card`` (see :func:`resolve_checkpoint`), convert the published key layout with
    ``convert`` and load it strictly into ``model``; returns the file used.

    ``fill_bn_counters`` accepts files saved before PyTorch stored BatchNorm's
    ``num_batches_tracked`` (unused at inference) by taking the model's own counters.
    """
    path = resolve_checkpoint(card, checkpoint_path)
    state = load_state_dict(path)
    if convert is not None:
        state = convert(state)
    expected = model.state_dict()
    if fill_bn_counters:
        for key, value in expected.items():
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = value
    check_keys(state, expected, f"{card.name} ({path})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. dtype trouble that check_keys does not see
        raise WeightsError(f"{card.name}: cannot load {path}: {exc}") from exc
    return path


def use_random_weights(allow_random: Any, checkpoint_path: str | os.PathLike | None,
                       what: str) -> bool:
    """The one rule for every checkpoint: an explicit ``checkpoint_path`` always wins; random
    weights only when ``allow_random_weights`` is set and no path is given (logged loudly)."""
    if not allow_random:
        return False
    if checkpoint_path:
        log.info("%s: checkpoint_path %s given, so allow_random_weights does not apply to it",
                 what, checkpoint_path)
        return False
    log.warning("*** %s: RANDOM WEIGHTS (allow_random_weights=true) - features are "
                "meaningless, use only for benchmarks and smoke tests ***", what)
    return True


def check_keys(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
               what: str) -> None:
    """Fail with a short, readable diff when a state dict does not fit a network."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shape (e.g. {k}: {tuple(state[k].shape)} vs "
                         f"{tuple(expected[k].shape)})")
        raise WeightsError(f"{what}: checkpoint does not fit the network: " + "; ".join(parts))
