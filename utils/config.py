"""Configuration: YAML defaults <- ``--config file.yml`` <- command-line flags.

Both classic flags (``--feature_type i3d --device_ids 0 2``) and ``key=value`` overrides
(``model_name=resnet101 batch_size=64``) are accepted. Every value is validated up front, so an
invalid combination fails before any model is loaded, naming the option at fault.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml

from utils.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

#: help text of the options every feature type shares (their defaults live in configs/defaults.yml)
SHARED_HELP: dict[str, str] = {
    "feature_type": "what to extract: resnet (alias resnet50), i3d, r21d (alias r21d_rgb), vggish",
    "video_paths": "input videos (or frame folders / audio files), space separated",
    "file_with_video_paths": "text file with one input path per line (blank lines and # comments ignored)",
    "device": "auto (cuda when a GPU is visible, else cpu), cuda or cpu",
    "device_ids": "GPU indices to use, one worker process per GPU (device=cuda)",
    "cpu_workers": "number of worker processes when device=cpu",
    "on_extraction": "print | save_numpy | save_pickle",
    "output_path": "root folder of saved features (see README: output layout)",
    "input_root": "inputs are mirrored under output_path relative to this folder "
                  "(default: the current folder; inputs outside it keep their absolute path)",
    "batch_size": "frames (frame-wise models) or stacks (clip models) per forward pass; auto: "
                  "the feature type's default for the device (small on CPU, where big batches "
                  "run slower; large on GPU)",
    "extraction_fps": "resample the video to this frame rate by timestamp (no re-encoding); "
                      "null keeps the native rate",
    "frames_fps": "frame rate assumed for folders of frames (timestamps); videos ignore it",
    "checkpoint_path": "explicit checkpoint file; otherwise the torch hub cache, then a verified download",
    "allow_random_weights": "RANDOM weights instead of a checkpoint: for benchmarks and smoke "
                            "tests only, features are meaningless",
    "show_pred": "print the top-5 classes of the pretrained classifier",
    "overwrite": "recompute videos whose outputs already exist (default: skip them)",
    "log_level": "debug | info | warning | error",
    "progress": "show a progress bar (auto: only on a terminal)",
}

#: feature type -> canonical name
ALIASES = {"resnet50": "resnet", "r21d_rgb": "r21d"}


class Config(Mapping[str, Any]):
    """Read-only mapping with attribute access (``cfg.batch_size``)."""

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only; use .replace(...)")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def replace(self, **changes: Any) -> "Config":
        return Config({**self._values, **changes})

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"Config({self._values!r})"

    def __reduce__(self):  # picklable for spawned workers
        return (Config, (self._values,))


def canonical_feature_type(name: str | None) -> str:
    if not name:
        raise ConfigError("feature_type is required (--feature_type resnet|i3d|r21d|vggish)")
    from models.registry import feature_types

    name = ALIASES.get(name, name)
    if name not in feature_types():
        raise ConfigError(f"feature_type {name!r} is unknown; choose one of "
                          f"{', '.join(sorted(feature_types()) + sorted(ALIASES))}")
    return name


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of option: value")
    return data


def defaults_for(feature_type: str | None) -> dict[str, Any]:
    values = read_yaml(CONFIG_DIR / "defaults.yml")
    if feature_type:
        values.update(read_yaml(CONFIG_DIR / f"{feature_type}.yml"))
    return values


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Bring a command-line/YAML value to the type of its default, naming the option on failure."""
    if value is None or default is None:
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(default, list):
            if isinstance(value, (list, tuple)):
                return list(value)
            return [value]
        if isinstance(default, str):
            if default == "auto" and isinstance(value, (int, float)) and not isinstance(value, bool):
                return int(value) if float(value).is_integer() else value  # auto-or-number options
            # tri-state options (progress: auto|true|false) keep booleans
            return value if isinstance(value, bool) else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option {key}: {value!r} is not a valid {type(default).__name__}") from None
    return value


def _split_overrides(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Separate ``key=value`` words from the flag words."""
    flags: list[str] = []
    overrides: dict[str, Any] = {}
    for word in argv:
        if not word.startswith("-") and "=" in word:
            key, _, value = word.partition("=")
            if not key.isidentifier():
                raise ConfigError(f"cannot read override {word!r}: expected key=value")
            overrides[key] = _parse_scalar(value)
        else:
            flags.append(word)
    return flags, overrides


def build_parser(feature_type: str | None, defaults: Mapping[str, Any]) -> argparse.ArgumentParser:
    from models.registry import feature_types, get_extractor_class

    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Extract deep features from videos with pretrained networks. Options can be "
                    "given as --flag value(s), as key=value words, or in a YAML file (--config).",
        epilog="Defaults live in configs/<feature_type>.yml. Example: python main.py "
               "--feature_type resnet --video_paths a.mp4 --on_extraction save_numpy model_name=resnet101",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file with option values")
    shared = parser.add_argument_group("options shared by every feature type")
    for key, text in SHARED_HELP.items():
        _add_option(shared, key, defaults.get(key), text)
    types = [feature_type] if feature_type else sorted(feature_types())
    for ft in types:
        cls = get_extractor_class(ft)
        ft_defaults = defaults if feature_type else defaults_for(ft)
        group = parser.add_argument_group(f"options of feature_type={ft}")
        for key, text in cls.options.items():
            if key in SHARED_HELP:
                continue
            try:
                _add_option(group, key, ft_defaults.get(key), text)
            except argparse.ArgumentError:
                pass  # same option documented by an earlier feature type
    return parser


def _add_option(group: Any, key: str, default: Any, text: str) -> None:
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{text} (default: {default!r})"}
    if isinstance(default, list) or key in ("video_paths", "device_ids"):
        kwargs["nargs"] = "+"
    group.add_argument(f"--{key}", dest=key, metavar=key.upper(), **kwargs)


def parse_args(argv: Iterable[str]) -> Config:
    """Command line -> validated :class:`Config`. Raises ConfigError; ``--help`` exits."""
    flags, overrides = _split_overrides(list(argv))
    # first pass: only what decides which defaults apply
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--feature_type", default=None)
    known, _ = pre.parse_known_args(flags)
    file_values = read_yaml(known.config) if known.config else {}
    ft_raw = overrides.get("feature_type") or known.feature_type or file_values.get("feature_type")
    wants_help = any(w in ("-h", "--help") for w in flags)
    if wants_help:
        ft = canonical_feature_type(ft_raw) if ft_raw else None
        build_parser(ft, defaults_for(ft)).parse_args(flags)  # prints help and exits
    ft = canonical_feature_type(ft_raw)
    defaults = defaults_for(ft)
    parser = build_parser(ft, defaults)
    parser.exit_on_error = False
    try:
        ns, unknown = parser.parse_known_args(flags)
    except argparse.ArgumentError as exc:
        raise ConfigError(str(exc)) from None
    if unknown:
        raise ConfigError(f"unknown option(s): {' '.join(unknown)} (see --help)")
    cli_values = {k: v for k, v in vars(ns).items() if k != "config"}
    if "device_ids" in cli_values:
        cli_values["device_ids"] = [_parse_scalar(v) for v in cli_values["device_ids"]]
    for key, value in list(cli_values.items()):
        if not isinstance(value, list):
            cli_values[key] = _parse_scalar(value)
    return _merge(ft, defaults, (file_values, cli_values, overrides))


def make_config(feature_type: str, **values: Any) -> Config:
    """Programmatic API: defaults of ``feature_type`` updated with ``values``, validated."""
    ft = canonical_feature_type(feature_type)
    return _merge(ft, defaults_for(ft), (values,))


def _merge(ft: str, defaults: Mapping[str, Any], layers: Iterable[Mapping[str, Any]]) -> Config:
    """Apply ``layers`` over ``defaults`` in order (each value typed like its default), validate."""
    merged = dict(defaults)
    for layer in layers:
        for key, value in layer.items():
            if key not in defaults:
                raise ConfigError(f"unknown option {key!r} for feature_type={ft} (see --help)")
            merged[key] = _coerce(key, value, defaults[key])
    merged["feature_type"] = ft
    return validate(Config(merged))


def read_path_list(path: str) -> list[str]:
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f]
    except OSError as exc:
        raise ConfigError(f"file_with_video_paths {path!r} cannot be read: {exc.strerror}") from None
    base = Path(path).resolve().parent
    out = []
    for ln in lines:
        if not ln or ln.startswith("#"):
            continue
        p = Path(ln).expanduser()
        # relative entries are taken relative to the current folder when they exist there,
        # else relative to the list file (lists shipped next to their videos keep working)
        if not p.is_absolute() and not p.exists() and (base / p).exists():
            p = base / p
        out.append(str(p))
    return out


def validate(cfg: Config) -> Config:
    """Shared checks, then the feature type's own ``validate``; returns cfg with inputs resolved."""
    from models.registry import get_extractor_class

    paths = list(cfg.get("video_paths") or [])
    if cfg.get("file_with_video_paths"):
        paths += read_path_list(cfg.file_with_video_paths)
    if not paths:
        raise ConfigError("no inputs: give --video_paths or --file_with_video_paths")
    seen: set[str] = set()
    unique = [p for p in paths if not (p in seen or seen.add(p))]
    if cfg.on_extraction not in ("print", "save_numpy", "save_pickle"):
        raise ConfigError(f"on_extraction {cfg.on_extraction!r} must be print, save_numpy or save_pickle")
    if cfg.on_extraction != "print" and not cfg.output_path:
        raise ConfigError("output_path is required when on_extraction saves files")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"device {cfg.device!r} must be auto, cuda or cpu")
    if cfg.device == "auto":
        import logging

        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            logging.getLogger(__name__).warning("no CUDA GPU visible: running on the CPU "
                                                "(device=auto; cpu_workers sets the worker count)")
        cfg = cfg.replace(device=device)
    ids = cfg.device_ids
    if cfg.device == "cuda":
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConfigError(f"device_ids {ids!r} must be non-negative GPU indices")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"device_ids {ids!r} lists a GPU twice")
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError("device cuda: no CUDA GPU is available here; use --device cpu")
        bad = [i for i in ids if i >= n]
        if bad:
            raise ConfigError(f"device_ids {bad} do not exist: this machine has {n} GPU(s)")
    if cfg.cpu_workers < 1:
        raise ConfigError(f"cpu_workers must be >= 1, got {cfg.cpu_workers}")
    if cfg.batch_size == "auto":
        cfg = cfg.replace(batch_size=get_extractor_class(cfg.feature_type).auto_batch_size[cfg.device])
    if not isinstance(cfg.batch_size, int) or isinstance(cfg.batch_size, bool) or cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be auto or an integer >= 1, got {cfg.batch_size!r}")
    for key in ("extraction_fps", "frames_fps"):
        v = cfg.get(key)
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            raise ConfigError(f"{key} must be a positive number, got {v!r}")
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level {cfg.log_level!r} must be debug, info, warning or error")
    if cfg.progress not in ("auto", True, False):
        raise ConfigError(f"progress {cfg.progress!r} must be auto, true or false")
    fps = {k: float(cfg[k]) if cfg.get(k) is not None else None
           for k in ("extraction_fps", "frames_fps")}
    cfg = cfg.replace(video_paths=unique, **fps)
    get_extractor_class(cfg.feature_type).validate(cfg)
    return cfg
