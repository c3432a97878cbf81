"""``video-features check OUTPUT_PATH``: flags of every saved output, as text; the exit code is 1
when any output is broken (a file that does not load, NaN or Inf values, a row count that
disagrees with its timestamps), so pipelines can gate on it.

It reads every output format the tool writes (``.npy`` / ``.pkl`` beside ``<stem>_meta.json``,
``<feature_type>.h5``, WebDataset shards, ``<feature_type>.parquet/``), one input at a time, so
memory stays that of the largest single output. Warnings (exit code unchanged):

* ``constant``: every row is the same (a black or frozen video, silent audio);
* ``near-duplicates``: a run of at least ``RUN_ROWS`` rows (and a tenth of the video) whose
  consecutive rows differ by less than ``DUPLICATE_REL`` of their norm (a black or frozen
  stretch, or decoding that repeated a frame);
* ``past the end``: rows whose timestamps lie beyond the input's duration.
"""
from __future__ import annotations

import io
import json
import logging
import pickle
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from video_features.utils.consolidate import INDEX_ATTR

log = logging.getLogger(__name__)

#: rows whose difference is below this share of their norm count as the same
DUPLICATE_REL = 1e-3
#: the shortest run of near-duplicate rows worth a warning
RUN_ROWS = 8
#: outputs whose rows are optical flow between frames: one more timestamp than rows (reference form)
FLOW_TYPES = ("raft", "pwc", "tvl1")
AUDIO_TYPES = ("vggish", "clap")
NOT_FEATURES = ("fps", "timestamps_ms")


@dataclass
class Output:
    feature_type: str
    name: str                                   # where it is (file or container and name)
    meta: dict
    load: Callable[[], Mapping[str, np.ndarray]]


@dataclass
class Finding:
    output: str
    flag: str
    detail: str
    error: bool


@dataclass
class Report:
    outputs: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.error]


# -- reading every format ------------------------------------------------------------------------
def iter_outputs(root: Path) -> Iterator[Output]:
    for meta_path in sorted(root.rglob("*_meta.json")):
        if ".staging" in meta_path.parts:
            continue
        yield _file_output(meta_path)
    for h5 in sorted(root.rglob("*.h5")):
        yield from _hdf5_outputs(h5)
    for tar in sorted(root.rglob("shard-*.tar")):
        yield from _tar_outputs(tar)
    for folder in sorted(p for p in root.rglob("*.parquet") if p.is_dir()):
        for part in sorted(folder.glob("part-*.parquet")):
            yield from _parquet_outputs(part)


def _file_output(meta_path: Path) -> Output:
    try:
        meta = _slim(json.loads(meta_path.read_text()))
    except (OSError, ValueError) as exc:
        meta = {"_error": f"record {meta_path.name} does not load ({exc})"}

    def load() -> dict[str, np.ndarray]:
        if "_error" in meta:
            raise ValueError(meta["_error"])
        out = {}
        for key, info in (meta.get("outputs") or {}).items():
            path = meta_path.parent / info["file"]
            if path.suffix == ".pkl":
                with open(path, "rb") as f:
                    out[key] = np.asarray(pickle.load(f))
            else:
                out[key] = np.load(path, allow_pickle=False)
        return out

    ft = (meta.get("record") or {}).get("feature_type", meta_path.parent.name)
    return Output(ft, str(meta_path.with_name(meta_path.name[:-len("_meta.json")])), meta, load)


def _hdf5_outputs(path: Path) -> Iterator[Output]:
    import h5py

    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as exc:
        yield Output(path.stem, str(path), {}, _raiser(f"{path.name} does not open ({exc})"))
        return
    with f:
        ft = path.stem
        groups: list[str] = []
        if INDEX_ATTR in f.attrs:   # each input a link into a part file
            groups = list(f.keys())
        elif path.name.startswith("part-") and path.parent.with_suffix(".h5").is_file():
            return                  # read through its index
        else:                       # an HDF5 file of an earlier version: groups in the file
            f.visititems(lambda name, obj: groups.append(name)
                         if isinstance(obj, h5py.Group) and "meta" in obj.attrs else None)
        for name in groups:
            meta = _slim(json.loads(f[name].attrs["meta"]))

            def load(name: str = name) -> dict[str, np.ndarray]:
                with h5py.File(path, "r", locking=False) as g:
                    return {k: v[()] for k, v in g[name].items()}

            yield Output(ft, f"{path}:{f[name].attrs.get('name', name)}", meta, load)


def _tar_outputs(path: Path) -> Iterator[Output]:
    try:
        tar = tarfile.open(path)
        members = tar.getmembers()
    except (OSError, tarfile.TarError) as exc:
        yield Output(path.parent.name, str(path), {}, _raiser(f"{path.name} does not open ({exc})"))
        return
    with tar:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in members:
            sample, _, rest = m.name.partition(".")
            samples.setdefault(sample, {})[rest] = m
        for sample, files in samples.items():
            meta = _slim(json.loads(tar.extractfile(files["json"]).read())) if "json" in files else {}

            def load(files: dict = files) -> dict[str, np.ndarray]:
                with tarfile.open(path) as t:
                    return {k[:-len(".npy")]: np.load(io.BytesIO(t.extractfile(m).read()))
                            for k, m in files.items() if k.endswith(".npy")}

            yield Output(path.parent.name, f"{path}:{sample}", meta, load)


def _parquet_outputs(part: Path) -> Iterator[Output]:
    from video_features.utils.consolidate import read_parquet

    try:
        rows = read_parquet(part)
        import pyarrow.parquet as pq

        metas = dict(zip(*(pq.read_table(part, columns=["name", "meta"])[c].to_pylist()
                           for c in ("name", "meta"))))
    except Exception as exc:  # noqa: BLE001 - any unreadable part is a finding, not a crash
        yield Output(part.parent.stem, str(part), {}, _raiser(f"{part.name} does not load ({exc})"))
        return
    for name, arrays in rows.items():
        yield Output(part.parent.stem, f"{part.parent}:{name}", _slim(json.loads(metas[name])),
                     lambda arrays=arrays: arrays)


def _slim(meta: dict) -> dict:
    """The parts of a record the checks and the report read (every option of the run is left
    out: kept for 100,000 outputs it would be most of the memory)."""
    return {k: meta[k] for k in ("input", "media", "record", "outputs", "extraction", "damaged") if k in meta}


def _raiser(why: str) -> Callable[[], Any]:
    def load() -> Any:
        raise ValueError(why)
    return load


# -- the flags ---------------------------------------------------------------------------------
def near_duplicate_runs(rows: np.ndarray, min_run: int) -> list[tuple[int, int]]:
    """``(first, last)`` row indices of runs of at least ``min_run`` rows whose consecutive rows
    differ by less than DUPLICATE_REL of their norm."""
    x = rows.reshape(len(rows), -1).astype(np.float64)
    if len(x) < 2:
        return []
    diff = np.linalg.norm(np.diff(x, axis=0), axis=1)
    scale = np.maximum(np.linalg.norm(x[:-1], axis=1), np.linalg.norm(x[1:], axis=1))
    same = diff <= DUPLICATE_REL * np.maximum(scale, 1e-12)
    runs, start = [], None
    for i, s in enumerate(np.r_[same, False]):
        if s and start is None:
            start = i
        elif not s and start is not None:
            if i - start + 1 >= min_run:
                runs.append((start, i))
            start = None
    return runs


def check_output(out: Output) -> list[Finding]:
    where = out.name
    try:
        arrays = out.load()
    except Exception as exc:  # noqa: BLE001
        return [Finding(where, "unreadable", str(exc).splitlines()[0][:300], True)]
    found: list[Finding] = []
    feats = {k: np.asarray(v) for k, v in arrays.items() if k not in NOT_FEATURES}
    stamps = arrays.get("timestamps_ms")
    fps = float(np.asarray(arrays["fps"])) if "fps" in arrays else None
    for key, x in feats.items():
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).reshape(len(x), -1).any(1).sum()) if x.ndim else 1
            found.append(Finding(where, "nan", f"{key}: {bad} row(s) hold NaN or Inf", True))
        if x.ndim == 0 or len(x) == 0:
            continue
        if stamps is not None:
            n, rows = len(np.asarray(stamps)), len(x)
            if n != rows and not (out.feature_type in FLOW_TYPES and n == rows + 1):
                found.append(Finding(where, "rows-vs-timestamps",
                                     f"{key}: {rows} rows but {n} timestamps", True))
        if len(x) >= 2 and np.all(x == x[0]):
            what = "silent audio?" if out.feature_type in AUDIO_TYPES else "a black or frozen video?"
            found.append(Finding(where, "constant", f"{key}: all {len(x)} rows are the same ({what})",
                                 False))
            continue
        for a, b in near_duplicate_runs(x, max(RUN_ROWS, int(np.ceil(0.1 * len(x))))):
            found.append(Finding(where, "near-duplicates",
                                 f"{key}: rows {a}-{b} ({b - a + 1} rows{_span(stamps, a, b)}) "
                                 "are near-identical (black or frozen stretch?)", False))
    duration = (out.meta.get("media") or {}).get("duration_s")
    if stamps is not None and duration and len(np.asarray(stamps)):
        ts = np.asarray(stamps, np.float64)
        starts = ts[:, 0] if ts.ndim == 2 else ts
        frame = 1000.0 / fps if fps else 0.0
        past = int((starts > duration * 1000.0 + frame + 1.0).sum())
        if past:
            found.append(Finding(where, "past-the-end", f"{past} row(s) start after the input's "
                                 f"{duration:g} s", False))
    return found


def _span(stamps: Any, a: int, b: int) -> str:
    if stamps is None:
        return ""
    ts = np.asarray(stamps, np.float64)
    first = ts[a, 0] if ts.ndim == 2 else ts[a]
    last = ts[b, -1] if ts.ndim == 2 else ts[b]
    return f", {first / 1000:.2f}-{last / 1000:.2f} s"


def check(root: str | Path) -> Report:
    report = Report()
    for out in iter_outputs(Path(root)):
        report.outputs += 1
        report.findings += check_output(out)
    return report


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="video-features check", allow_abbrev=False,
                                     description="Flag broken or suspicious outputs under OUTPUT_PATH "
                                                 "(exit code 1 when any output is broken).")
    parser.add_argument("output_path")
    args = parser.parse_args(argv)
    root = Path(args.output_path)
    if not root.is_dir():
        print(f"error: {root} is not a folder", file=sys.stderr)
        return 2
    report = check(root)
    for f in report.findings:
        print(f"{'ERROR' if f.error else 'WARN '} {f.flag}: {f.output}: {f.detail}")
    print(f"checked {report.outputs} output(s): {len(report.errors)} error(s), "
          f"{len(report.findings) - len(report.errors)} warning(s)", file=sys.stderr)
    if report.outputs == 0:
        print(f"error: no outputs under {root}", file=sys.stderr)
        return 2
    return 1 if report.errors else 0
