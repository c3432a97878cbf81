"""Where a model in transformers' layout comes from: a Hugging Face repo (through the hub cache)
or a local folder in the same layout (``config.json`` + ``model.safetensors`` /
``pytorch_model.bin``, optionally ``preprocessor_config.json`` and other files a model needs).

One resolution order for every family that loads such models (videomae, clap): an explicit
``checkpoint_path`` (folder or weights file) -> ``model_name`` as a local folder -> the hub cache
-> a download into the hub cache (unless offline) -> a one-line :class:`WeightsError` naming the
repo and the ``hf download <repo>`` command that fetches it. The cache and offline rules here are
also those of families that fetch single files (timm), so that one environment governs them all.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Container

from video_features.utils.errors import WeightsError, require

log = logging.getLogger(__name__)

#: a folder's weights file, in order of preference (safetensors first, sharded indexes after)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
OFFLINE_WORDS = ("1", "true", "yes", "on")
#: first half of the offline error, by what the family reports (fields: label, repo, lacks)
NOT_CACHED = "{label}: weights of {repo} are not in the Hugging Face cache"
CACHE_LACKS = "{label}: the Hugging Face cache lacks {lacks} of {repo}"


def offline() -> bool:
    """True when downloads are disabled (VIDEO_FEATURES_OFFLINE or HF_HUB_OFFLINE set true)."""
    return any(os.environ.get(k, "").lower() in OFFLINE_WORDS
               for k in ("VIDEO_FEATURES_OFFLINE", "HF_HUB_OFFLINE"))


def hub_cache_dir() -> str:
    """The Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub),
    read when called so that a changed environment is honoured."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def fetch_hint(repo: str, revision: str | None) -> str:
    """The advice that ends every "cannot get this repo" error: the command and the way out."""
    return (f"fetch it where there is network with `hf download {repo}"
            f"{' --revision ' + revision if revision else ''}` (hub cache: {hub_cache_dir()}), "
            "or pass model_name=LOCAL_FOLDER")


@dataclass(frozen=True)
class Source:
    """What one configuration loads: the identity of the model and the files found for it."""

    model_id: str               # repo id, or the resolved local folder
    revision: str | None
    folder: Path | None         # config.json and the other files of the model (None: built in)
    weights: Path | None        # None: random weights


@dataclass(frozen=True)
class ExtraFiles:
    """Files beyond config + weights that a use of the model needs (e.g. a tokenizer): a cached
    snapshot counts only with ``marker``; a download fetches those of ``files`` the repo has."""

    files: tuple[str, ...]
    marker: str
    what: str                   # how errors name them when missing


def local_dir(name: str | None) -> Path | None:
    """``name`` as an existing local folder (resolved), else None (then it is a repo id)."""
    if not name:
        return None
    p = Path(name).expanduser()
    return p.resolve() if p.is_dir() else None


def model_ident(name: str, revision: str | None) -> tuple[str, str]:
    """(identity, url) of a model for its weight card: the resolved local folder and its file URL,
    or ``repo[@revision]`` and its hub page."""
    local = local_dir(name)
    if local:
        return str(local), local.as_uri()
    return (name + (f"@{revision}" if revision else ""),
            f"https://huggingface.co/{name}" + (f"/tree/{revision}" if revision else ""))


def weights_in(folder: Path) -> Path | None:
    """The weights file of a folder in Hugging Face layout (safetensors preferred)."""
    for fname in WEIGHT_FILES:
        if (folder / fname).is_file():
            return folder / fname
    return None


def hub_folder(repo: str, revision: str | None, *, label: str, need_weights: bool = True,
               extra: ExtraFiles | None = None, offline_text: str = NOT_CACHED) -> Path:
    """The hub cache's snapshot folder of ``repo`` with its config (and weights / ``extra``,
    where needed), downloading what is missing unless offline; a one-line WeightsError
    otherwise (its offline form opens with ``offline_text``), ConfigError without
    huggingface_hub."""
    snapshot_download = require("huggingface_hub", f"feature_type {label}").snapshot_download
    cache = hub_cache_dir()

    def missing(folder: Path) -> str:
        if not (folder / "config.json").is_file():
            return "config.json"
        if need_weights and weights_in(folder) is None:
            return "the weights (model.safetensors)"
        if extra and not (folder / extra.marker).is_file():
            return extra.what
        return ""

    lacks = "the repo"
    try:
        folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache,
                                        local_files_only=True))
        lacks = missing(folder)
        if not lacks:
            return folder
    except Exception:  # not cached (or partly): download below
        pass
    if offline():
        raise WeightsError(offline_text.format(label=label, repo=repo, lacks=lacks)
                           + " and downloads are disabled (VIDEO_FEATURES_OFFLINE / "
                           "HF_HUB_OFFLINE); " + fetch_hint(repo, revision))
    try:
        from huggingface_hub import HfApi

        files = set(HfApi().list_repo_files(repo, revision=revision))
        weights = next((f for f in WEIGHT_FILES if f in files), None)
        if "config.json" not in files or (need_weights and weights is None):
            raise WeightsError(f"{label}: {repo} has no config.json with model.safetensors or "
                               "pytorch_model.bin (not transformers' layout)")
        wanted = [f for f in ("config.json", "preprocessor_config.json") if f in files]
        if extra:
            wanted += [f for f in extra.files if f in files]
        if need_weights:
            wanted.append(weights)
            if weights.endswith(".index.json"):
                wanted.append(weights.split(".")[0] + "-*")
        log.info("downloading %s into the Hugging Face cache %s", repo, cache)
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache,
                                      allow_patterns=wanted))
    except WeightsError:
        raise
    except Exception as exc:  # no network, unknown repo, gated, ...: the same advice
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise WeightsError(f"{label}: cannot download {repo} from the Hugging Face hub "
                           f"({reason}); {fetch_hint(repo, revision)}") from None


def resolve(cfg: Any, random_weights: bool, *, label: str, built_in: Container[str] = (),
            extra: ExtraFiles | None = None, offline_text: str = NOT_CACHED) -> Source:
    """Find the files ``cfg`` (``model_name``, ``revision``, ``checkpoint_path``) loads, in the
    order of the module docstring. ``built_in``: repo ids whose config the family builds itself,
    so that random weights, or an explicit weights file, need nothing from the hub; with
    ``random_weights`` no weights file is needed, only a config."""
    name = cfg.model_name
    revision = cfg.get("revision")
    explicit = cfg.get("checkpoint_path")
    if explicit:
        p = Path(explicit).expanduser()
        if p.is_dir():
            w = weights_in(p)
            if w is None:
                raise WeightsError(f"checkpoint_path {explicit!r} holds no model.safetensors or "
                                   "pytorch_model.bin")
            return Source(str(p.resolve()), None, p.resolve(), w)
        if not p.is_file():
            raise WeightsError(f"checkpoint_path {explicit!r} for {label} does not exist")
        folder = local_dir(name)
        if folder is None and name not in built_in:
            folder = hub_folder(name, revision, label=label, need_weights=False, extra=extra,
                                offline_text=offline_text)
        return Source(str(folder) if folder else name, revision, folder, p.resolve())
    folder = local_dir(name)
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise WeightsError(f"model_name {name!r} is a folder without config.json (expected "
                               "transformers' layout: config.json + model.safetensors)")
        w = None if random_weights else weights_in(folder)
        if w is None and not random_weights:
            raise WeightsError(f"model_name folder {name!r} holds no model.safetensors or "
                               "pytorch_model.bin")
        return Source(str(folder), None, folder, w)
    if random_weights and name in built_in:
        return Source(name, revision, None, None)
    folder = hub_folder(name, revision, label=label, need_weights=not random_weights, extra=extra,
                        offline_text=offline_text)
    return Source(name, revision, folder, None if random_weights else weights_in(folder))


def read_state_dict(path: Path) -> dict:
    """A safetensors / torch file, or a sharded index of them, as one CPU state dict."""
    import torch

    path = Path(path)
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        state: dict = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            state.update(read_state_dict(path.parent / shard))
        return state
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return obj


__all__ = ["CACHE_LACKS", "NOT_CACHED", "OFFLINE_WORDS", "WEIGHT_FILES", "ExtraFiles", "Source",
           "fetch_hint", "hub_cache_dir", "hub_folder", "local_dir", "model_ident", "offline", "read_state_dict",
           "resolve", "weights_in"]
