"""What produced an output: the record saved beside it, and the check that decides reuse.

A record holds everything that changes the numbers of a feature type's outputs: the options
marked ``changes_values`` in its schema, the identity of every checkpoint it loads (card name and
the sha256 of the file actually used, or "random"), and the feature type's ``revision``. It also
notes the tool's version, for information. An existing output is reused only when its record
matches the current run's; :func:`differences` names what differs otherwise.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from video_features.utils import __version__
from video_features.utils.config import Config, value_options


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    from video_features.utils.weights import sha256_of

    return sha256_of(path)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint file (computed once per file version), or of the parts of a
    TensorFlow checkpoint named by its prefix (``model.ckpt`` -> ``.index`` and ``.data-*``)."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return _digest(str(p.resolve()), st.st_size, st.st_mtime_ns)
    parts = sorted(p.parent.glob(glob.escape(p.name) + ".*"))
    h = hashlib.sha256()
    for part in parts:
        h.update(file_digest(part).encode())
    return h.hexdigest()


def _is_tf_prefix(path: Path) -> bool:
    return not path.is_file() and (path.parent / (path.name + ".index")).is_file()


def checkpoint_identities(cfg: Config) -> dict[str, dict[str, Any]]:
    """role -> identity of every checkpoint ``cfg`` loads. Resolving may download (with a hash
    check) or raise WeightsError naming what is missing, so this runs once, before workers."""
    from video_features.models.registry import get_extractor_class
    from video_features.utils.weights import resolve_checkpoint

    out: dict[str, dict[str, Any]] = {}
    for role, (card, explicit) in get_extractor_class(cfg.feature_type).weights_for(cfg).items():
        if cfg.allow_random_weights and not explicit:  # the rule of utils.weights.use_random_weights
            out[role] = {"card": card.name, "random": True}
            continue
        path = Path(explicit).expanduser() if explicit else None
        if not (path is not None and _is_tf_prefix(path)):
            path = resolve_checkpoint(card, explicit)
        out[role] = {"card": card.name, "file": path.name, "sha256": file_digest(path)}
    return out


def run_record(cfg: Config) -> dict[str, Any]:
    """The record every output of this run carries (the part that must match for reuse)."""
    from video_features.models.registry import get_extractor_class

    record = {"feature_type": cfg.feature_type,
              "revision": get_extractor_class(cfg.feature_type).revision,
              "options": value_options(cfg),
              "checkpoints": checkpoint_identities(cfg),
              "tool_version": __version__}
    return json.loads(json.dumps(record))  # as it will read back from disk


def differences(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """What differs between an output's record and this run's, one phrase each ([] = reusable)."""
    diffs = []
    for key in ("feature_type", "revision"):
        if stored.get(key) != expected.get(key):
            diffs.append(f"{key} {stored.get(key)!r} -> {expected.get(key)!r}")
    old, new = stored.get("options") or {}, expected.get("options") or {}
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            diffs.append(f"{key} {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}")
    old, new = stored.get("checkpoints") or {}, expected.get("checkpoints") or {}
    for role in sorted(set(old) | set(new)):
        a, b = old.get(role) or {}, new.get(role) or {}
        if (a.get("card"), a.get("random"), a.get("sha256")) != (b.get("card"), b.get("random"), b.get("sha256")):
            diffs.append(f"checkpoint {role} {_describe(a)} -> {_describe(b)}")
    return diffs


def _describe(identity: Mapping[str, Any]) -> str:
    if not identity:
        return "none"
    if identity.get("random"):
        return f"{identity.get('card')} (random weights)"
    return f"{identity.get('card')} ({identity.get('file')}, sha256 {str(identity.get('sha256'))[:12]})"
