"""Where features go: print | save_numpy | save_pickle, written atomically, skipped when done.

Layout: ``<output_path>/<feature_type>/<folder of the input>/<stem>_<key>.<npy|pkl>``, where the
folder of the input is its parent relative to ``input_root`` (default: the current folder); an
input outside that root keeps its absolute folder (``/data/x/a.mp4`` ->
``<output_path>/<feature_type>/data/x/a_<key>.npy``). Two inputs with the same file name in
different folders therefore never share an output file, and the layout depends only on each
input's own path, so reruns find earlier results whatever else is in the list.

Each file is written to a temporary name in the same folder and renamed into place, so a
killed run never leaves a partial feature file behind.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

SUFFIX = {"save_numpy": ".npy", "save_pickle": ".pkl"}


class OutputWriter:
    def __init__(self, on_extraction: str, output_path: str | None, feature_type: str,
                 input_root: str | None = None):
        self.mode = on_extraction
        self.feature_type = feature_type
        self.root = Path(output_path or ".") / feature_type
        self.input_root = Path(input_root or os.getcwd()).resolve()

    @classmethod
    def from_config(cls, cfg: Any) -> "OutputWriter":
        return cls(cfg.on_extraction, cfg.output_path, cfg.feature_type, cfg.get("input_root"))

    @property
    def saves(self) -> bool:
        return self.mode in SUFFIX

    def video_dir(self, video_path: str) -> Path:
        p = Path(video_path).expanduser().resolve()
        try:
            rel = p.parent.relative_to(self.input_root)
        except ValueError:
            rel = Path(*p.parent.parts[1:])  # absolute folder without its anchor
        return self.root / rel

    def paths_for(self, video_path: str, keys: Iterable[str]) -> dict[str, Path]:
        folder = self.video_dir(video_path)
        stem = Path(video_path.rstrip("/\\")).stem if not Path(video_path).is_dir() \
            else Path(video_path.rstrip("/\\")).name
        return {k: folder / f"{stem}_{k}{SUFFIX[self.mode]}" for k in keys}

    def is_done(self, video_path: str, keys: Iterable[str]) -> bool:
        """All output files of ``video_path`` exist and load (a truncated file does not count)."""
        if not self.saves:
            return False
        for path in self.paths_for(video_path, keys).values():
            if not path.is_file():
                return False
            try:
                _load(path)
            except Exception:
                return False
        return True

    def write(self, video_path: str, feats: Mapping[str, np.ndarray]) -> list[Path]:
        if not self.saves:
            print_features(video_path, feats)
            return []
        written = []
        for key, path in self.paths_for(video_path, feats.keys()).items():
            _atomic_write(path, np.asarray(feats[key]), self.mode)
            written.append(path)
        return written


def _load(path: Path) -> Any:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    with open(path, "rb") as f:
        return pickle.load(f)


def _atomic_write(path: Path, value: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a run killed mid-write
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode == "save_numpy":
                np.save(f, value, allow_pickle=False)
            else:
                pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def print_features(video_path: str, feats: Mapping[str, np.ndarray]) -> None:
    lines = [f"== {video_path}"]
    for key, value in feats.items():
        arr = np.asarray(value)
        lines.append(f"{key}: shape={tuple(arr.shape)} dtype={arr.dtype}")
        lines.append(np.array2string(arr, threshold=40, edgeitems=3, precision=4))
    print("\n".join(lines), flush=True)
