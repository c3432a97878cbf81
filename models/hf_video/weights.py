"""Where an ``hf_video`` model comes from and how it is built: a Hugging Face repo (through the
hub cache) or a local folder in transformers' layout (``config.json`` + weights +
``video_preprocessor_config.json`` / ``preprocessor_config.json``), resolved as every
transformers family here resolves it (:mod:`video_features.utils.hf_hub`).

The network is built by transformers itself (``from_pretrained`` of the class the checkpoint
names, loaded in float32), so key conversions of older checkpoints are transformers' own; a
checkpoint that leaves any weight of the network unset is refused. A repo that ships its network
as code (``auto_map`` in config.json, or a ``model_type`` this transformers does not know) runs
only with ``trust_remote_code=true``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from video_features.utils import hf_hub
from video_features.utils.errors import ConfigError, WeightsError, require
from video_features.utils.hf_hub import Source, model_ident, read_state_dict
from video_features.utils.weights import WeightCard, register_card

log = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/vjepa2-vitl-fpc64-256"
PROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


def import_transformers(label: str = "hf_video") -> Any:
    """transformers (new enough for video processors), or a ConfigError naming the package."""
    transformers = require("transformers", f"feature_type {label}")
    if not hasattr(transformers, "AutoVideoProcessor"):
        raise ConfigError(f"feature_type {label} needs transformers >= 4.53 (video processors); "
                          f"this is {transformers.__version__}: pip install -U transformers")
    return transformers


def resolve(cfg: Any, random_weights: bool, label: str = "hf_video",
            built_in: Any = ()) -> Source:
    return hf_hub.resolve(cfg, random_weights, label=label, built_in=built_in)


def read_raw_config(src: Source) -> dict:
    path = src.folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{path} does not hold a JSON object")
    return raw


def remote_code_reason(raw: dict) -> str:
    """Why the model needs code from its repo ("" when transformers has it built in)."""
    from transformers import CONFIG_MAPPING

    mtype = str(raw.get("model_type", ""))
    if raw.get("auto_map"):
        return f"its config.json maps to code in the repo (auto_map: {', '.join(raw['auto_map'])})"
    if mtype not in CONFIG_MAPPING:
        return f"model_type {mtype!r} is not built into transformers"
    return ""


def check_remote_code(raw: dict, model_id: str, trust: bool) -> bool:
    """True when the model runs code from its repo; a ConfigError when that is not allowed."""
    reason = remote_code_reason(raw)
    if reason and not trust:
        raise ConfigError(f"{model_id} ships its network as code ({reason}); running it executes "
                          "that code: give trust_remote_code=true if you trust the repo")
    if reason:
        log.warning("%s: running the model code of the repo (trust_remote_code=true)", model_id)
    return bool(reason)


def build_config(src: Source, trust: bool) -> Any:
    tf = import_transformers()
    return tf.AutoConfig.from_pretrained(str(src.folder), local_files_only=True,
                                         trust_remote_code=trust)


def processor_for(src: Source, trust: bool) -> Any:
    """The model's own processor: its video processor, else its image processor (X-CLIP's
    repos configure frames through an image processor); a ConfigError where the folder has
    neither configuration."""
    tf = import_transformers()
    if src.folder is None or not any((src.folder / f).is_file() for f in PROCESSOR_FILES):
        raise ConfigError(f"{src.model_id} has no {' or '.join(PROCESSOR_FILES)}: its "
                          "preprocessing is unknown")
    folder = str(src.folder)
    try:
        return tf.AutoVideoProcessor.from_pretrained(folder, local_files_only=True,
                                                     trust_remote_code=trust)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        video_error = exc
    try:
        return tf.AutoImageProcessor.from_pretrained(folder, local_files_only=True,
                                                     trust_remote_code=trust)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise ConfigError(f"{src.model_id}: cannot build its processor ({video_error}; {exc})") \
            from None


def load_network(cls: Any, config: Any, src: Source, state: dict | None, trust: bool) -> Any:
    """``cls`` with the source's weights (``state``: an explicit weights file's tensors; None and
    no weights file: random), in float32 and eval mode; every weight of the network must come
    from the checkpoint."""
    import torch

    if state is None and src.weights is None:
        torch.manual_seed(0)
        return cls._from_config(config, torch_dtype=torch.float32).eval() \
            if hasattr(cls, "_from_config") else cls(config).eval()
    kwargs: dict[str, Any] = dict(config=config, local_files_only=True, output_loading_info=True,
                                  trust_remote_code=trust, dtype=torch.float32)
    try:
        if state is not None:   # transformers takes tensors only without a folder to read
            net, info = cls.from_pretrained(None, state_dict=state, **kwargs)
        else:
            net, info = cls.from_pretrained(str(src.folder), **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"cannot load {src.model_id}: {str(exc).splitlines()[0][:300]}") from None
    missing = sorted(info.get("missing_keys") or []) + sorted(
        k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or [])
    if missing:
        raise WeightsError(f"{src.model_id}: the checkpoint does not fit {cls.__name__}: "
                           f"{len(missing)} weight(s) missing or of another shape "
                           f"(e.g. {missing[0]})")
    return net.eval()


def explicit_state(src: Source, cfg: Any) -> dict | None:
    """The tensors of an explicit ``checkpoint_path`` file (None: the folder's own weights)."""
    path = cfg.get("checkpoint_path")
    if not path or Path(path).expanduser().is_dir() or src.weights is None:
        return None
    return read_state_dict(src.weights)


def card_for(cfg: Any, label: str = "hf_video") -> WeightCard:
    """The card identifying the model (repo id + revision, or the local folder); the record beside
    each output adds the sha256 of the weights file actually used."""
    ident, url = model_ident(cfg.model_name, cfg.get("revision"))
    return register_card(WeightCard(
        name=f"{label}:{ident}",
        url=url,
        sha256="",  # the hub checks its own downloads; the record holds the file's sha256
        filename="config.json + model.safetensors (or pytorch_model.bin), Hugging Face layout",
        layout="transformers model of the repo's config.json (model_type, architectures)",
        preprocessing="the repo's own video (or image) processor, run on the device",
        extra={"model_id": ident},
    ))


def weights_file_for(cfg: Any, label: str = "hf_video", built_in: Any = ()) -> str | None:
    """The weights file ``cfg`` loads (resolving / downloading it), or None for random weights."""
    if cfg.allow_random_weights and not cfg.get("checkpoint_path"):
        return None  # the rule of use_random_weights, without its log line (logged at load)
    src = resolve(cfg, random_weights=False, label=label, built_in=built_in)
    return str(src.weights) if src.weights else None
