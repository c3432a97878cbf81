"""Configuration on OmegaConf: typed schema <- YAML defaults <- ``--config`` <- command line.

Each feature type has a structured schema (a dataclass: the type, help text and allowed values
of every option, :class:`SharedOptions` plus its own fields); its values come from
``configs/defaults.yml`` and ``configs/<feature_type>.yml``. OmegaConf merges, in this order,
the schema, those defaults, a ``--config file.yml``, classic flags (``--device_ids 0 2``) and
``key=value`` words, converting each value to its option's type. Then every value is checked
(types, choices, ranges, combinations) before any model loads; a bad one raises
:class:`ConfigError` naming the option, and the command exits with 2.

Extractors receive a :class:`Config`: a read-only mapping of plain Python values with attribute
access, cheap to pickle into worker processes.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import sys
import typing
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from video_features.utils.errors import ConfigError, require

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

#: feature type -> canonical name
ALIASES = {"resnet50": "resnet", "r21d_rgb": "r21d"}


def option(help: str, *, choices: Sequence[Any] | None = None, at_least: float | None = None,
           above: float | None = None, changes_values: bool = False, default: Any = MISSING) -> Any:
    """A schema field. Its value normally comes from the YAML defaults (``default`` stays
    MISSING); ``choices`` / ``at_least`` / ``above`` are checked for every value (each element of
    a list); ``changes_values`` marks options whose value changes the features, so outputs made
    under another value are not reused (see utils/output.py)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "at_least": at_least,
            "above": above, "changes_values": changes_values}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class SharedOptions:
    """Options every feature type understands."""

    recipe: Optional[str] = option(
        "a named bundle of options reproducing a published feature set (--list_recipes); "
        "recorded as NAME@VERSION; other options still override it")
    feature_type: Optional[str] = option(
        "what to extract: resnet (alias resnet50), i3d, r21d (alias r21d_rgb), s3d, tv_video, "
        "videomae, hf_video, clip, timm, raft, pwc, tvl1, vggish, clap, null; several share one decode")
    video_paths: List[str] = option("input videos (or frame folders / audio files), space separated")
    file_with_video_paths: Optional[str] = option(
        "text file with one input path per line (blank lines and # comments ignored)")
    device: str = option("auto (cuda when a GPU is visible, else cpu), cuda or cpu",
                         choices=("auto", "cuda", "cpu"))
    device_ids: List[int] = option("GPU indices to use, one worker process per GPU (device=cuda)",
                                   at_least=0)
    cpu_workers: int = option("number of worker processes when device=cpu", at_least=1)
    on_extraction: str = option(
        "print | save_numpy | save_pickle | save_hdf5 (one <feature_type>.h5, an entry per input) "
        "| save_webdataset (tar shards of shard_size inputs) | save_parquet (<feature_type>.parquet/ "
        "folder of part files, a row per input; needs pyarrow)",
        choices=("print", "save_numpy", "save_pickle", "save_hdf5", "save_webdataset", "save_parquet"))
    output_path: str = option("root folder of saved features (see README: output layout)")
    shard_size: int = option("on_extraction=save_webdataset: inputs per tar shard", at_least=1)
    dtype: str = option("saved feature arrays: float32, or float16 (half the size; fps and "
                        "timestamps stay float64)", choices=("float32", "float16"),
                        changes_values=True)
    input_root: Optional[str] = option(
        "inputs are mirrored under output_path relative to this folder (default: the current "
        "folder; inputs outside it keep their absolute path)")
    batch_size: Union[int, str] = option(
        "frames (frame-wise models) or stacks (clip models) per forward pass, each with its "
        "crops; auto: the feature type's default for the device (small on CPU, where big batches "
        "run slower; large on GPU), divided by the number of crops")
    decoder: str = option(
        "cpu: PyAV in decoder processes; nvdec: the GPU's video decoder (PyNvVideoCodec, "
        "device=cuda), frames stay on the GPU; a video NVDEC cannot decode falls back to the CPU",
        choices=("cpu", "nvdec"), changes_values=True)
    decoders: Union[int, str] = option(
        "decoding processes per device, each on a different video at a time (auto: the CPU "
        "cores shared between the devices)")
    extraction_fps: Optional[float] = option(
        "resample the video to this frame rate by timestamp (no re-encoding); null keeps the "
        "native rate", above=0, changes_values=True)
    extraction_total: Optional[int] = option(
        "a fixed number of evenly spaced frames per video (its frame count as the container "
        "declares it, spread at total * fps / count, as the reference tool); mutually exclusive "
        "with extraction_fps", at_least=1, changes_values=True)
    frames_fps: float = option("frame rate assumed for folders of frames (timestamps); videos "
                               "ignore it", above=0, changes_values=True)
    video_stream: Optional[int] = option(
        "which video stream of a file with several: its index among the file's video streams "
        "(0: the first); null: the one FFmpeg picks by default (av_find_best_stream)",
        at_least=0, changes_values=True)
    audio_stream: Optional[int] = option(
        "which audio stream (audio feature types): its index among the file's audio streams; "
        "null: the one FFmpeg picks by default", at_least=0, changes_values=True)
    timestamps: str = option(
        "pts: each frame's presentation time from the container (right for variable frame "
        "rates); index: frame index / fps, the reference tool's form", choices=("pts", "index"),
        changes_values=True)
    rotation: str = option(
        "auto: frames upright as players show them (a video's display-matrix rotation, e.g. a "
        "phone's portrait video; a frame image's EXIF orientation); raw: frames as stored",
        choices=("auto", "raw"), changes_values=True)
    timestamps_form: str = option(
        "span: timestamps_ms is T x 2, the start and end (ms) of the frames or audio each row "
        "covers; reference: one column as the reference tool saves it (a frame's time, a "
        "stack's last frame; none for vggish)", choices=("span", "reference"),
        changes_values=True)
    checkpoint_path: Optional[str] = option(
        "explicit checkpoint file (always wins, also over allow_random_weights); otherwise the "
        "torch hub cache, then a verified download")
    allow_random_weights: bool = option(
        "RANDOM weights where no checkpoint_path is given: for benchmarks and smoke tests only, "
        "features are meaningless")
    tf32: bool = option(
        "TF32 tensor-core math for fp32 convolutions and matmuls on GPUs: faster, but features "
        "move by up to ~1e-3 relative (see README); false keeps IEEE fp32", changes_values=True)
    precision: str = option(
        "fp32, or bf16 / fp16 autocast for the networks (faster on GPUs; deviations in the README)",
        choices=("fp32", "bf16", "fp16"), changes_values=True)
    show_pred: bool = option("print the top-5 classes of the pretrained classifier")
    overwrite: bool = option("recompute inputs whose outputs already exist (default: skip them)")
    on_mismatch: str = option(
        "outputs that exist but were made with other options or weights: recompute them, or "
        "refuse (the input fails naming the differing options)", choices=("recompute", "refuse"))
    worker_timeout: float = option(
        "seconds a worker process may go without any progress on an input before it is "
        "declared hung, killed and replaced (0: never)", at_least=0)
    shard: Optional[str] = option(
        "i/N: only this run's share of the inputs (every N-th of the de-duplicated list, from "
        "position i), for job arrays on the same list; the N shards together are the full run")
    claim_timeout: float = option(
        "seconds without a heartbeat after which another run's claim on an input counts as "
        "abandoned and is taken over (a claim of a process gone from this host at once)", above=0)
    backend: str = option(
        "local: worker processes on this machine; ray: Ray actors, one per GPU of the cluster "
        "(or cpu_workers with device=cpu), outputs on storage every node sees",
        choices=("local", "ray"))
    ray_address: Optional[str] = option(
        "backend=ray: the cluster to join (auto: the running one; ray://host:10001); null: "
        "RAY_ADDRESS if set, else a local Ray started for this run")
    ray_actors: Optional[int] = option(
        "backend=ray: actors to start; null: one per GPU of the cluster (device=cuda) or "
        "cpu_workers (device=cpu)", at_least=1)
    log_level: str = option("debug | info | warning | error",
                            choices=("debug", "info", "warning", "error"))
    progress: Union[bool, str] = option("show a progress bar (auto: only on a terminal)",
                                        choices=("auto", True, False))


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


# -- schema helpers --------------------------------------------------------------------------
def schema_for(feature_type: str) -> type:
    from video_features.models.registry import get_extractor_class

    return get_extractor_class(feature_type).schema


def schema_fields(schema: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """option name -> (resolved type, dataclass field)."""
    hints = typing.get_type_hints(schema)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(schema)}


def schema_rows(schema: type, shared: bool = False) -> list[tuple[str, bool, str, Any, Any]]:
    """The options of ``schema`` beyond :class:`SharedOptions` (with ``shared``: also those), as
    the command line knows them: ``(name, takes a list, help, schema default or None, choices)``;
    choices only for text options, whose words are their values (checked before any import)."""
    rows = []
    for key, (tp, f) in schema_fields(schema).items():
        if key in SharedOptions.__dataclass_fields__ and not shared:
            continue
        default = f.default
        if default is MISSING or default is dataclasses.MISSING:
            default = (None if f.default_factory is dataclasses.MISSING  # type: ignore[misc]
                       else f.default_factory())  # type: ignore[misc]
        element = _list_element(tp)
        choices = f.metadata.get("choices")
        text = _is_text(element if element is not None else tp)
        rows.append((key, element is not None, f.metadata.get("help", ""), default,
                     tuple(choices) if choices and text else None))
    return rows


def option_rows(feature_type: str) -> list[tuple[str, bool, str, Any, Any]]:
    """:func:`schema_rows` of ``feature_type``: from the generated index while it matches the
    sources (no torch import: --help and usage errors stay fast), else from the schema."""
    from video_features.models.registry import indexed_options

    rows = indexed_options(feature_type)
    if rows is None:
        return schema_rows(schema_for(feature_type))
    return [r for r in rows if r[0] not in SharedOptions.__dataclass_fields__]


def value_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``cfg`` that change feature values (marked ``changes_values``)."""
    fields = schema_fields(schema_for(cfg["feature_type"]))
    return {k: cfg.get(k) for k, (_, f) in fields.items() if f.metadata.get("changes_values")}


def _list_element(tp: Any) -> Any | None:
    """Element type of a List[...] (also inside Optional), else None."""
    if typing.get_origin(tp) in (list, List):
        return typing.get_args(tp)[0]
    if typing.get_origin(tp) is Union:
        for arg in typing.get_args(tp):
            if typing.get_origin(arg) in (list, List):
                return typing.get_args(arg)[0]
    return None


def _is_text(tp: Any) -> bool:
    """str or Optional[str]: command-line text is taken as is (``0001`` stays ``0001``)."""
    if tp is str:
        return True
    return typing.get_origin(tp) is Union and set(typing.get_args(tp)) == {str, type(None)}


def _from_text(tp: Any, raw: Any) -> Any:
    """A command-line word (or words, for list options) -> a value for an option of type ``tp``.

    Text options keep the word verbatim (``null`` means None); other types read it as YAML
    (``8`` -> 8, ``true`` -> True, ``[rgb,flow]`` -> a list) and OmegaConf then checks the type.
    """
    element = _list_element(tp)
    if element is not None:
        if isinstance(raw, list):
            return [_from_text(element, r) for r in raw]
        if raw.strip().startswith("["):
            return _yaml_scalar(raw)
        return [_from_text(element, raw)]
    if _is_text(tp):
        return None if raw in ("null", "~") and tp is not str else raw
    return _yaml_scalar(raw)


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# -- sources ---------------------------------------------------------------------------------
def canonical_feature_type(name: Any) -> str:
    from video_features.models.registry import feature_types

    if not name:
        raise ConfigError(f"feature_type is required (--feature_type {'|'.join(feature_types())})")
    name = ALIASES.get(str(name), str(name))
    if name not in feature_types():
        known = sorted(feature_types()) + sorted(ALIASES)
        raise ConfigError(f"feature_type {name!r} is unknown{_did_you_mean(name, known)}; choose "
                          f"one of {', '.join(known)}")
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
    """The YAML defaults: shared ones, then the feature type's (a feature type added as a
    plugin may have no YAML and carry its defaults in its schema)."""
    values = read_yaml(CONFIG_DIR / "defaults.yml")
    if feature_type and (CONFIG_DIR / f"{feature_type}.yml").is_file():
        values.update(read_yaml(CONFIG_DIR / f"{feature_type}.yml"))
    return values


def _split_words(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separate ``key=value`` words from the flag words."""
    flags: list[str] = []
    words: dict[str, str] = {}
    for word in argv:
        if not word.startswith("-") and "=" in word:
            key, _, value = word.partition("=")
            if not all(part.isidentifier() for part in key.split(".", 1)):
                raise ConfigError(f"cannot read override {word!r}: expected key=value")
            words[key] = value
        else:
            flags.append(word)
    return flags, words


def typed_words(feature_type: str, words: Mapping[str, str]) -> dict[str, Any]:
    """``key=value`` words of the command line -> values typed for ``feature_type``'s options."""
    fields = schema_fields(schema_for(feature_type))
    out = {}
    for key, raw in words.items():
        if key not in fields:
            raise ConfigError(f"unknown option {key!r} for feature_type={feature_type}"
                              f"{_option_hint(key, fields, [feature_type])}")
        out[key] = _from_text(fields[key][0], raw)
    return out


# -- the command line ------------------------------------------------------------------------
#: the subcommands of ``main.py`` / ``video-features`` (video_features/cli.py), for --help
SUBCOMMANDS = (
    ("check OUTPUT_PATH", "flag broken or suspicious outputs (exit code 1: one is broken)"),
    ("report OUTPUT_PATH", "write one self-contained HTML report of an output folder"),
    ("finetune OPTIONS", "fine-tune I3D on labelled videos, then extract with the result"),
)


def _prog() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name in ("main.py", "video-features") else "main.py"


class _Parser(argparse.ArgumentParser):
    """The extraction command's parser. argparse takes a flag once, so each feature type's
    options are registered once, hidden, for parsing; the help then shows under each feature
    type every option it takes, with that type's own text and default (an option whose text
    another type already showed reads "as under feature_type=...")."""

    def __init__(self, shown: list[tuple[str, list]], tail: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shown = shown  # (feature type, its option rows)
        self.tail = tail

    def format_help(self) -> str:
        text = super().format_help()
        first: dict[tuple[str, str], str] = {}
        for ft, rows in self.shown:
            defaults = defaults_for(ft)
            section = argparse.ArgumentParser(prog=self.prog, usage=argparse.SUPPRESS,
                                              add_help=False, allow_abbrev=False)
            group = section.add_argument_group(f"options of feature_type={ft}",
                                               None if rows else "none beyond the shared ones")
            for key, is_list, help_text, default, _ in rows:
                owner = first.setdefault((key, help_text), ft)
                _add_flag(group, key, is_list, help_text if owner == ft else
                          f"as under feature_type={owner}", defaults.get(key, default))
            text += "\n" + section.format_help()
        return text + self.tail


def build_parser(feature_type: str | Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of the extraction command for one feature type, several, or (None) every one.
    Their options come from :func:`option_rows`, which needs no torch while the option index is
    current, so that --help and usage errors answer at once."""
    from video_features.models.registry import feature_types

    types = ([feature_type] if isinstance(feature_type, str)
             else list(feature_type or sorted(feature_types())))
    prog = _prog()
    width = max(len(cmd) for cmd, _ in SUBCOMMANDS) + len(prog) + 1
    tail = ("\nsubcommands (each has its own --help):\n"
            + "".join(f"  {prog + ' ' + cmd:<{width}}  {what}\n" for cmd, what in SUBCOMMANDS)
            + "\nDefaults live in configs/<feature_type>.yml; --help --feature_type TYPE shows one "
              "type's options.\nExample: "
            + f"{prog} --feature_type resnet --video_paths a.mp4 --on_extraction save_numpy \\\n"
            + " " * (10 + len(prog)) + "model_name=resnet101\n")
    parser = _Parser(
        [(ft, option_rows(ft)) for ft in types], tail,
        prog=prog, allow_abbrev=False,
        usage=(f"%(prog)s --feature_type TYPE [TYPE ...] --video_paths PATH [PATH ...]\n"
               f"       {' ' * len(prog)} [--OPTION VALUE ...] [OPTION=VALUE ...]\n"
               "       %(prog)s --list_recipes\n"
               "       %(prog)s {check,report,finetune} ...   (subcommands, see below)"),
        description="Extract deep features from videos with pretrained networks. Options can be "
                    "given as --flag value(s), as key=value words, or in a YAML file (--config).",
    )
    parser.add_argument("--config", default=None, help="YAML file with option values")
    parser.add_argument("--list_recipes", action="store_true",
                        help="list the recipes (--recipe NAME) with their options and sources")
    shared = parser.add_argument_group("options shared by every feature type")
    defaults = defaults_for(types[0] if len(types) == 1 else None)
    for key, (tp, f) in schema_fields(SharedOptions).items():
        _add_flag(shared, key, _list_element(tp) is not None, f.metadata["help"], defaults.get(key))
    added: set[str] = set()
    for _, rows in parser.shown:
        for key, is_list, *_ in rows:
            if key not in added:  # shown per feature type by format_help
                added.add(key)
                parser.add_argument(f"--{key}", dest=key, metavar=key.upper(), help=argparse.SUPPRESS,
                                    default=argparse.SUPPRESS, nargs="+" if is_list else None)
    return parser


def _add_flag(group: Any, key: str, is_list: bool, text: str, default: Any) -> None:
    group.add_argument(f"--{key}", dest=key, metavar=key.upper(), default=argparse.SUPPRESS,
                       nargs="+" if is_list else None,
                       help=f"{text} (default: {default!r})".replace("%", "%%"))


def _add_option(group: Any, key: str, tp: Any, default: Any, text: str) -> None:
    _add_flag(group, key, _list_element(tp) is not None, text, default)


def _closest(name: str, known: Iterable[str]) -> str | None:
    """The known name ``name`` most likely stands for: the only one it begins (an abbreviation),
    else the closest spelling (difflib), else None."""
    known = sorted(set(known))
    starts = [k for k in known if k.startswith(name)]
    if len(name) >= 3 and len(starts) == 1:
        return starts[0]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
    match = _closest(name, known)
    return f" (did you mean {prefix}{match}?)" if match else ""


def _option_hint(name: str, known: Iterable[str], types: Sequence[str] | None,
                 prefix: str = "") -> str:
    """What to add to "unknown option NAME": the feature types that have it, when the run's
    types do not, else the closest known option."""
    from video_features.models.registry import feature_types

    if types:
        others = []
        for ft in feature_types():
            if ft in types:
                continue
            try:
                if any(row[0] == name for row in option_rows(ft)):
                    others.append(ft)
            except (ConfigError, ImportError):  # a plugin that cannot load: no hint from it
                continue
        if others:
            return f" (an option of feature_type {', '.join(others)})"
    return _did_you_mean(name, known, prefix) or " (see --help)"


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _unknown_flags(parser: argparse.ArgumentParser, unknown: list[str],
                   types: Sequence[str] | None) -> str:
    """One line naming every unknown flag (with the option it may stand for), or the first
    stray word when there is no unknown flag."""
    # argparse keeps the flags of a parser in _actions (also those of groups)
    known = [s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--")]
    names: list[str] = []
    strays: list[str] = []
    values_follow = False
    for word in unknown:
        if word.startswith("-") and not _is_number(word):
            name, eq, _ = word.partition("=")
            names.append(name)
            values_follow = not eq
        elif not values_follow:
            strays.append(word)
    of = f" for feature_type={types[0]}" if types and len(types) == 1 else (
        f" for feature types {', '.join(types)}" if types else "")
    if names:
        hints = [_option_hint(n.lstrip("-"), known, types, "--").replace(" (see --help)", "")
                 for n in names]
        see = "" if all(hints) else f" (see {parser.prog} --help)"
        if len(names) == 1:
            return f"unknown option {names[0]}{of}{hints[0]}{see}"
        return (f"unknown options{of}: {', '.join(n + h for n, h in zip(names, hints))}{see}")
    return (f"unexpected argument {strays[0]!r}: options are --name value(s) or name=value "
            f"(see {parser.prog} --help)")


def parse_flags(parser: argparse.ArgumentParser, flags: list[str],
                types: Sequence[str] | None = None) -> argparse.Namespace:
    """``--flag value`` words -> namespace; a bad or unknown flag is a ConfigError (exit 2
    without a traceback) naming the flag and the option it may stand for, not argparse's own
    exit; abbreviations are refused (``--video_path`` is a typo, not ``--video_paths``).
    ``--help`` still prints and exits."""
    parser.exit_on_error = False
    parser.allow_abbrev = False
    try:
        ns, unknown = parser.parse_known_args(flags)
    except argparse.ArgumentError as exc:
        raise ConfigError(str(exc)) from None
    if unknown:
        raise ConfigError(_unknown_flags(parser, unknown, types))
    return ns


#: options of the run as a whole: one value for every feature type of a run
RUN_OPTIONS = ("video_paths", "file_with_video_paths", "device", "device_ids", "cpu_workers",
               "on_extraction", "output_path", "input_root", "decoders", "overwrite",
               "on_mismatch", "worker_timeout", "log_level", "progress", "frames_fps", "timestamps",
               "decoder", "shard", "rotation", "backend", "ray_address", "ray_actors",
               "claim_timeout", "video_stream", "audio_stream")


def feature_types_of(raw: Any) -> list[str]:
    """``resnet``, ``resnet,i3d``, ``[resnet, i3d]`` or ``resnet i3d`` -> canonical names, in
    order, each once."""
    words = raw if isinstance(raw, (list, tuple)) else [raw] if raw else []
    names = [w for word in words for w in str(word).replace(",", " ").split()]
    out: list[str] = []
    for name in names or [None]:
        ft = canonical_feature_type(name)
        if ft not in out:
            out.append(ft)
    return out


def parse_args(argv: Iterable[str]) -> Config:
    """Command line of one feature type -> validated :class:`Config` (see :func:`parse_configs`)."""
    cfgs = parse_configs(argv)
    if len(cfgs) > 1:
        raise ConfigError("several feature types given where one is expected")
    return cfgs[0]


def _check_usage(types: list[str], words: Mapping[str, str], flag_values: Mapping[str, Any],
                 file_values: Mapping[str, Any]) -> None:
    """The mistakes found without the schemas themselves (option index only, no torch): unknown
    ``key=value`` words, a missing feature type, a word outside a text option's choices
    (``--device gpu``), a run without inputs."""
    from video_features.models.registry import feature_types

    shared = {row[0]: row for row in schema_rows(SharedOptions, shared=True)}
    run_types = types or feature_types()
    own = {t: {**shared, **{row[0]: row for row in option_rows(t)}} for t in run_types}
    known = set().union(*own.values())
    for key in words:
        t, dot, opt = key.partition(".")
        if dot and ALIASES.get(t, t) in own:
            t = ALIASES.get(t, t)
            if opt not in own[t]:
                raise ConfigError(f"unknown option {opt!r} for feature_type={t}"
                                  f"{_option_hint(opt, own[t], [t])}")
        elif not dot and key not in known:
            of = (f" for feature_type={types[0]}" if len(types) == 1 else
                  f" for feature types {', '.join(types)}" if types else "")
            raise ConfigError(f"unknown option {key!r}{of}{_option_hint(key, known, types)}")
    if not types:
        feature_types_of(None)  # raises: feature_type is required, naming every type
    for key, raw in [*flag_values.items(), *words.items()]:
        t, dot, opt = key.partition(".")
        for ft in ([ALIASES.get(t, t)] if dot else types):
            row = own.get(ft, {}).get(opt if dot else key)
            if row is not None:
                _check_choice(opt if dot else key, raw, row)
    sources = [words, flag_values, file_values,
               *(v for v in file_values.values() if isinstance(v, dict))]
    inputs = ("video_paths", "file_with_video_paths")
    if any(k.partition(".")[2] in inputs for k in words):
        return  # TYPE.video_paths=...: an error of its own, reported later
    if not any(src.get(k) not in (None, "", [], ()) for src in sources for k in inputs) and \
            not any(defaults_for(t).get(k) for t in types for k in inputs):
        raise ConfigError("no inputs: give --video_paths or --file_with_video_paths")


def _check_choice(key: str, raw: Any, row: tuple) -> None:
    """The word(s) of a text option with choices against them, as :func:`check_fields` does
    after typing (null is left to it)."""
    choices = row[4]
    if not choices:
        return
    values = raw if isinstance(raw, list) else [raw]
    if row[1] and isinstance(raw, str) and raw.strip().startswith("["):
        values = _yaml_scalar(raw)
    for v in values if isinstance(values, list) else []:
        if isinstance(v, str) and v not in ("null", "~") and v not in choices:
            raise ConfigError(f"option {key}: {v!r} is not one of {', '.join(choices)}")


def parse_configs(argv: Iterable[str]) -> list[Config]:
    """Command line -> one validated :class:`Config` per feature type. Raises ConfigError;
    ``--help`` exits.

    With several feature types (``--feature_type resnet i3d`` or ``feature_type=resnet,i3d``)
    an option applies to every type that has it (one no type has is an error), ``TYPE.option=
    value`` (or a ``TYPE:`` section of the ``--config`` file) to that type only; the options of
    the run as a whole (:data:`RUN_OPTIONS`) take one value for all.

    Unknown options, a missing feature type and a run without inputs are reported before any
    extractor (or torch) is imported."""
    flags, words = _split_words(list(argv))
    # first pass: only what decides which schemas and defaults apply
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--feature_type", default=None, nargs="+")
    pre.add_argument("--recipe", default=None)
    try:
        known, rest = pre.parse_known_args(flags)
    except argparse.ArgumentError as exc:
        raise ConfigError(str(exc)) from None
    file_values = read_yaml(known.config) if known.config else {}
    ft_raw = words.pop("feature_type", None) or known.feature_type or file_values.get("feature_type")
    recipe = words.pop("recipe", None) or known.recipe or file_values.pop("recipe", None)
    if recipe:  # a layer under --config: the file, flags and words override it
        from video_features.utils.recipes import recipe_layer

        layer = recipe_layer(recipe, feature_types_of(ft_raw) if ft_raw else None)
        ft_raw = ft_raw or layer["feature_type"]
        file_values = {**layer, **file_values}
    if any(w in ("-h", "--help") for w in flags):
        build_parser(feature_types_of(ft_raw) if ft_raw else None).parse_args(flags)  # exits
    types = feature_types_of(ft_raw) if ft_raw else []
    ns = parse_flags(build_parser(types or None), rest, types)
    flag_words = {k: v for k, v in vars(ns).items() if k not in ("config", "feature_type", "recipe", "list_recipes")}
    _check_usage(types, words, flag_words, file_values)
    plain = {k: v for k, v in words.items() if "." not in k}
    sections: dict[str, dict[str, Any]] = {t: {} for t in types}
    for key, value in words.items():
        if "." in key:
            t, _, opt = key.partition(".")
            t = ALIASES.get(t, t)
            if t not in sections:
                raise ConfigError(f"{key}: {t!r} is not a feature type of this run "
                                  f"({', '.join(types)})")
            sections[t][opt] = value
    file_plain = {k: v for k, v in file_values.items()
                  if k != "feature_type" and not (ALIASES.get(k, k) in sections and isinstance(v, dict))}
    fields = {t: schema_fields(schema_for(t)) for t in types}
    if len(types) > 1:
        _check_multi(types, fields, {**file_plain, **flag_words, **plain}, sections, file_values)
    cfgs = []
    for t in types:
        f = fields[t]
        file_layer = {k: v for k, v in file_plain.items() if k in f or len(types) == 1}
        section = file_values.get(t) or next((v for k, v in file_values.items()
                                              if ALIASES.get(k) == t and isinstance(v, dict)), {})
        file_layer.update(section if isinstance(section, dict) else {})
        flag_layer = {k: _from_text(f[k][0], v) for k, v in flag_words.items() if k in f}
        word_layer = typed_words(t, {k: v for k, v in plain.items()
                                     if k in f or len(types) == 1})
        cfgs.append(_merge(t, (file_layer, flag_layer, word_layer, typed_words(t, sections[t]))))
    if len(cfgs) > 1:
        for key in RUN_OPTIONS:
            values = {repr(c.get(key)) for c in cfgs}
            if len(values) > 1:
                raise ConfigError(f"option {key} differs between the feature types of this run "
                                  f"({', '.join(f'{c.feature_type}: {c.get(key)!r}' for c in cfgs)})")
    return cfgs


def _check_multi(types: list[str], fields: dict, unprefixed: Mapping[str, Any],
                 sections: Mapping[str, Mapping[str, Any]], file_values: Mapping[str, Any]) -> None:
    """Options of a run of several feature types: each known to some type; per-type values
    only for per-type options."""
    for key in unprefixed:
        if not any(key in fields[t] for t in types):
            known = set().union(*fields.values())
            raise ConfigError(f"unknown option {key!r} for feature types {', '.join(types)}"
                              f"{_option_hint(key, known, types)}")
    if "checkpoint_path" in unprefixed and unprefixed["checkpoint_path"] is not None:
        raise ConfigError("checkpoint_path is ambiguous with several feature types: give it per "
                          "type, e.g. resnet.checkpoint_path=FILE")
    for t in types:
        own = {**(file_values.get(t) if isinstance(file_values.get(t), dict) else {}), **sections[t]}
        for key in own:
            if key in RUN_OPTIONS:
                raise ConfigError(f"{t}.{key}: {key} is an option of the whole run; set it once "
                                  "for every feature type")
            if key not in fields[t]:
                raise ConfigError(f"unknown option {key!r} for feature_type={t}"
                                  f"{_option_hint(key, fields[t], [t])}")


def make_config(feature_type: str, **values: Any) -> Config:
    """Programmatic API: defaults of ``feature_type`` updated with ``values``, validated."""
    ft = canonical_feature_type(feature_type)
    return _merge(ft, (values,))


def _omegaconf_error(exc: OmegaConfBaseException, ft: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    if isinstance(exc, ConfigKeyError):
        try:
            known = set(SharedOptions.__dataclass_fields__) | {r[0] for r in option_rows(ft)}
            hint = _option_hint(str(key), known, [ft])
        except ConfigError:  # not a feature type (finetune)
            hint = " (see --help)"
        return ConfigError(f"unknown option {key!r} for feature_type={ft}{hint}")
    if isinstance(exc, MissingMandatoryValue):
        return ConfigError(f"option {key} has no value (configs/ lacks its default)")
    msg = str(getattr(exc, "msg", "") or exc).splitlines()[0]
    return ConfigError(f"option {key}: {msg}")


def _merge(ft: str, layers: Iterable[Mapping[str, Any]]) -> Config:
    """Schema <- YAML defaults <- ``layers`` in order, typed by OmegaConf, then validated."""
    schema = schema_for(ft)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), defaults_for(ft))
        for layer in layers:
            layer = {k: v for k, v in layer.items() if k != "feature_type"}
            merged = OmegaConf.merge(merged, layer)
        merged.feature_type = ft
        values = OmegaConf.to_container(merged, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, ft) from None
    return validate(Config(values))


# -- validation ------------------------------------------------------------------------------
def read_path_list(path: str) -> list[str]:
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f]
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"file_with_video_paths {path!r} cannot be read: {why}") from None
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


def check_fields(cfg: Mapping[str, Any], schema: type) -> None:
    """Choices and ranges declared in the schema, for every value (each element of a list)."""
    for key, (_, f) in schema_fields(schema).items():
        value = cfg.get(key)
        if value is None:
            continue
        meta = f.metadata
        for v in (value if isinstance(value, list) else [value]):
            if meta.get("choices") and not any(v == c and type(v) is type(c) for c in meta["choices"]):
                allowed = ", ".join(str(c).lower() if isinstance(c, bool) else str(c)
                                    for c in meta["choices"])
                raise ConfigError(f"option {key}: {v!r} is not one of {allowed}")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if meta.get("at_least") is not None and v < meta["at_least"]:
                    raise ConfigError(f"option {key} must be >= {meta['at_least']:g}, got {v!r}")
                if meta.get("above") is not None and v <= meta["above"]:
                    raise ConfigError(f"option {key} must be > {meta['above']:g}, got {v!r}")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``; ConfigError naming the option otherwise."""
    parts = str(text).split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        index, count = -1, 0
    if len(parts) != 2 or count < 1 or not 0 <= index < count:
        raise ConfigError(f"option shard {text!r} must be i/N with 0 <= i < N (e.g. 0/4 ... 3/4)")
    return index, count


def validate(cfg: Config) -> Config:
    """Shared checks, then the feature type's own ``validate``; returns cfg with inputs resolved."""
    from video_features.models.registry import get_extractor_class

    cls = get_extractor_class(cfg.feature_type)
    check_fields(cfg, cls.schema)
    paths = list(cfg.get("video_paths") or [])
    if cfg.get("file_with_video_paths"):
        paths += read_path_list(cfg.file_with_video_paths)
    if not paths:
        raise ConfigError("no inputs: give --video_paths or --file_with_video_paths")
    seen: set[str] = set()
    unique = [p for p in paths if not (p in seen or seen.add(p))]
    if cfg.get("shard") is not None:
        index, count = parse_shard(cfg.shard)
        unique = unique[index::count]
    if cfg.get("extraction_fps") and cfg.get("extraction_total"):
        raise ConfigError("extraction_fps and extraction_total are mutually exclusive: give one "
                          "(a rate, or a number of frames per video)")
    if cfg.on_extraction != "print" and not cfg.output_path:
        raise ConfigError("output_path is required when on_extraction saves files")
    if cfg.on_extraction == "save_hdf5":
        require("h5py", "on_extraction=save_hdf5")  # checked before any work, not after it
    if cfg.on_extraction == "save_parquet":
        from video_features.utils.consolidate import pyarrow_modules

        pyarrow_modules()  # checked before any work, not after it
    if cfg.input_root is not None and not Path(cfg.input_root).expanduser().is_dir():
        raise ConfigError(f"input_root {cfg.input_root!r} is not an existing folder")
    if cfg.device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            log.warning("no CUDA GPU visible: running on the CPU (device=auto; cpu_workers sets "
                        "the worker count)")
        cfg = cfg.replace(device=device)
    ids = cfg.device_ids
    if cfg.get("backend") == "ray":
        # the cluster's GPUs are Ray's to hand out, not this machine's device_ids
        from video_features.utils.ray_backend import import_ray

        import_ray()
    elif cfg.device == "cuda":
        if not ids:
            raise ConfigError("device_ids is empty: name at least one GPU")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"device_ids {ids!r} lists a GPU twice")
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError("device cuda: no CUDA GPU is available here; use --device cpu")
        bad = [i for i in ids if i >= n]
        if bad:
            raise ConfigError(f"device_ids {bad} do not exist: this machine has {n} GPU(s)")
    if cfg.decoder == "nvdec":
        if cfg.device != "cuda":
            raise ConfigError("decoder=nvdec decodes on a GPU: it needs device=cuda")
        from video_features.utils.nvdec import unavailable

        why = unavailable()
        if why:
            raise ConfigError(f"decoder=nvdec: {why}")
    # with backend=ray each actor resolves auto from its own node's CPUs (utils/ray_backend.py)
    per_actor = cfg.decoders == "auto" and cfg.get("backend", "local") == "ray"
    if cfg.decoders == "auto" and not per_actor:
        from video_features.utils.pipeline import default_decoders

        n_workers = cfg.cpu_workers if cfg.device == "cpu" else len(ids)
        cfg = cfg.replace(decoders=default_decoders(n_workers))
    if not per_actor and (isinstance(cfg.decoders, bool) or not isinstance(cfg.decoders, int)
                          or cfg.decoders < 1):
        raise ConfigError(f"option decoders must be auto or an integer >= 1, got {cfg.decoders!r}")
    if cfg.batch_size == "auto":
        # with crops, each frame or stack is several network inputs: keep the network's batch
        from video_features.utils.transforms import n_views

        auto = cls.auto_batch_size[cfg.device] // n_views(cfg.get("crops"))
        cfg = cfg.replace(batch_size=max(1, auto))
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ConfigError(f"option batch_size must be auto or an integer >= 1, got {cfg.batch_size!r}")
    cfg = cfg.replace(video_paths=unique)
    # a feature type may complete options whose default depends on others (e.g. a model's own
    # clip length), so that records and workers see the values actually used
    return cls.validate(cfg) or cfg
