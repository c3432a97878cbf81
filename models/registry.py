"""Feature type name -> extractor class, imported lazily so that one family's dependencies
(e.g. tensorflow for converting VGGish checkpoints) never burden another.

Feature types of your own can be added without editing the package: set
``VIDEO_FEATURES_PLUGINS="name=package.module:ClassName,..."`` (worker processes inherit it). The
class subclasses :class:`models.base.Extractor`; its ``schema`` dataclass carries the defaults of
options that configs/ does not know.

``--help`` and the command line's usage checks need every feature type's options, and importing
an extractor imports torch (seconds). They read them instead from ``models/options_index.py``,
generated from the schemas (``python -m video_features.models.registry --write-index``) and
trusted per feature type only while the classes it was made from read the same (their source
text is compared by digest, no import); otherwise, and for plugins, the schema is imported.
tests/test_cli.py fails while the index is stale.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any

from video_features.utils.errors import ConfigError

_EXTRACTORS = {
    "resnet": "video_features.models.resnet.extractor:ResNetExtractor",
    "i3d": "video_features.models.i3d.extractor:I3DExtractor",
    "r21d": "video_features.models.r21d.extractor:R21DExtractor",
    "vggish": "video_features.models.vggish.extractor:VGGishExtractor",
    "null": "video_features.models.null.extractor:NullExtractor",
    "s3d": "video_features.models.s3d.extractor:S3DExtractor",
    "tv_video": "video_features.models.tv_video.extractor:TVVideoExtractor",
    "clip": "video_features.models.clip.extractor:CLIPExtractor",
    "timm": "video_features.models.timm_image.extractor:TimmExtractor",
    "videomae": "video_features.models.videomae.extractor:VideoMAEExtractor",
    "hf_video": "video_features.models.hf_video.extractor:HFVideoExtractor",
    "clap": "video_features.models.clap.extractor:CLAPExtractor",
    "raft": "video_features.models.flow_out.extractor:RAFTFlowExtractor",
    "pwc": "video_features.models.flow_out.extractor:PWCFlowExtractor",
    "tvl1": "video_features.models.flow_out.extractor:TVL1FlowExtractor",
}

PLUGINS_ENV = "VIDEO_FEATURES_PLUGINS"


def _all() -> dict[str, str]:
    out = dict(_EXTRACTORS)
    for item in os.environ.get(PLUGINS_ENV, "").split(","):
        if not item.strip():
            continue
        name, sep, target = item.strip().partition("=")
        if not sep or ":" not in target:
            raise ConfigError(f"{PLUGINS_ENV}: cannot read {item!r}; expected name=module:Class")
        out[name.strip()] = target.strip()
    return out


def feature_types() -> list[str]:
    return list(_all())


def get_extractor_class(feature_type: str) -> type:
    types = _all()
    try:
        target = types[feature_type]
    except KeyError:
        raise ConfigError(f"feature_type {feature_type!r} is unknown; choose one of "
                          f"{', '.join(types)}") from None
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        if feature_type in _EXTRACTORS:
            raise
        raise ConfigError(f"feature_type {feature_type}: cannot import {target} ({exc})") from None


# -- the option index: what --help and usage errors need, without importing torch -------------
#: models/options_index.py, written by ``python -m video_features.models.registry --write-index``
INDEX_VERSION = 1
_PACKAGE_DIRS = {"models": Path(__file__).resolve().parent,
                 "utils": Path(__file__).resolve().parent.parent / "utils"}
_texts: dict[Path, str] = {}


def indexed_options(feature_type: str) -> list[tuple[str, bool, str, Any, Any]] | None:
    """The own options of a built-in ``feature_type`` (beyond :class:`SharedOptions`) as
    ``(name, takes a list, help, schema default, choices)`` (utils/config.py schema_rows), read from the generated index without
    importing the extractor (and so torch); None where the type is not in the index or the
    sources it was made from changed since (their class texts are compared by digest): the
    caller then reads the schema itself."""
    try:
        from video_features.models.options_index import INDEX, VERSION
    except ImportError:
        return None
    entry = INDEX.get(feature_type)
    if entry is None or VERSION != INDEX_VERSION or _all().get(feature_type) != entry["target"]:
        return None
    for module, name, kind, digest in entry["sources"]:
        if _class_digest(module, name, kind) != digest:
            return None
    return [tuple(row) for row in entry["options"]]


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if len(parts) < 3 or parts[0] != "video_features" or parts[1] not in _PACKAGE_DIRS:
        return None
    return _PACKAGE_DIRS[parts[1]].joinpath(*parts[2:]).with_suffix(".py")


def _class_text(module: str, name: str) -> str | None:
    """The source of top-level class ``name`` of ``module``: its ``class`` line and every line
    up to the next one that starts in column 0 (checked against the AST by the index writer)."""
    path = _module_file(module)
    if path is None:
        return None
    if path not in _texts:
        try:
            _texts[path] = path.read_text(encoding="utf-8")
        except OSError:
            _texts[path] = ""
    match = re.search(rf"^class {re.escape(name)}\b.*$", _texts[path], re.M)
    if match is None:
        return None
    lines = [match.group(0)]
    for line in _texts[path][match.end() + 1:].splitlines():
        if line[:1] not in ("", " ", "\t", ")"):
            break
        lines.append(line)
    return "\n".join(lines).rstrip()


def _class_digest(module: str, name: str, kind: str) -> str | None:
    """A schema class counts whole; of an extractor class only what decides its schema: the
    ``class`` line (its bases) and the ``schema = ...`` line."""
    text = _class_text(module, name)
    if text is None:
        return None
    if kind == "extractor":
        lines = text.splitlines()
        text = "\n".join([lines[0], *(ln for ln in lines[1:] if re.match(r"    schema\b", ln))])
    return hashlib.sha1(text.encode()).hexdigest()


def build_index() -> dict[str, dict]:
    """The index of every built-in feature type, from the schemas themselves (imports them all)."""
    import ast
    import inspect

    from video_features.utils.config import SharedOptions, schema_rows

    index = {}
    for feature_type, target in _EXTRACTORS.items():
        cls = get_extractor_class(feature_type)
        chain = []
        for klass in cls.__mro__:  # up to the class that sets the schema
            chain.append((klass, "extractor"))
            if "schema" in vars(klass):
                break
        # SharedOptions is read live (its fields are never part of a type's rows)
        chain += [(k, "schema") for k in cls.schema.__mro__ if k not in (object, SharedOptions)]
        sources = []
        for klass, kind in chain:
            text = _class_text(klass.__module__, klass.__qualname__)
            tree = ast.parse(inspect.getsource(sys.modules[klass.__module__]))
            node = next((n for n in tree.body if isinstance(n, ast.ClassDef)
                         and n.name == klass.__qualname__), None)
            if text is None or node is None or text != "\n".join(
                    inspect.getsource(sys.modules[klass.__module__]).splitlines()
                    [node.lineno - 1:node.end_lineno]).rstrip():
                raise RuntimeError(f"{feature_type}: cannot index class {klass.__module__}."
                                   f"{klass.__qualname__} (not a top-level class of the package, "
                                   "or its text ends before its last line)")
            sources.append((klass.__module__, klass.__qualname__, kind,
                            _class_digest(klass.__module__, klass.__qualname__, kind)))
        rows = schema_rows(cls.schema)
        for row in rows:
            if ast.literal_eval(repr(row)) != row:
                raise RuntimeError(f"{feature_type}: option {row[0]} is not made of literals")
        index[feature_type] = {"target": target, "sources": sources, "options": rows}
    return index


def write_index(path: Path | None = None) -> Path:
    import pprint

    path = path or _PACKAGE_DIRS["models"] / "options_index.py"
    body = pprint.pformat(build_index(), width=100, sort_dicts=False)
    path.write_text(
        '"""Generated by ``python -m video_features.models.registry --write-index`` (do not edit):\n'
        "the options of each built-in feature type, read by --help and the command line's usage\n"
        "checks without importing torch. An entry whose classes changed since is ignored (see\n"
        'models/registry.py); tests/test_cli.py fails until the index is written again."""\n'
        f"VERSION = {INDEX_VERSION}\n\nINDEX = {body}\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-index"]:
        raise SystemExit("usage: python -m video_features.models.registry --write-index")
    print(f"wrote {write_index()}")
