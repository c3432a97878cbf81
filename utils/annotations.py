"""Labelled videos for fine-tuning: Charades' annotation CSV and a simple generic form.

Both give :class:`Sample` rows: an input (video file or frame folder), its labelled segments
``(class, start_s, end_s)`` and its length when the annotation says it. A row that cannot be read
is an :class:`AnnotationError` naming the file and line; a video that is not on disk is left out
with a warning and counted, so one missing file does not stop a training run.

* Charades (``Charades_v1_train.csv`` / ``_test.csv``): columns ``id``, ``actions`` (``c092
  11.90 21.20;c147 0.00 12.60``, possibly empty) and ``length`` (seconds); inputs are found under
  ``video_root`` as ``<id>.<ext>`` or as a frame folder ``<id>/`` (``<id>-000001.jpg``, ...).
* generic CSV (header ``video,label[,start,end]``) or JSON (a list of objects with those keys):
  one row per labelled segment; rows of one video are merged; without start / end the label
  covers the whole video. ``label`` is a class index or a class name (names are numbered in
  sorted order; the names are kept with the checkpoint).
"""
from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from video_features.utils.errors import ConfigError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
CHARADES_CLASSES = 157


class AnnotationError(ConfigError):
    """An annotation file or row that cannot be read (the message names file and line)."""


@dataclass(frozen=True)
class Sample:
    video: str
    #: (class index, start s, end s); end may be inf (to the end of the video)
    segments: tuple[tuple[int, float, float], ...]
    length_s: float | None = None

    def labels(self, num_classes: int) -> list[int]:
        """Classes present anywhere in the video (video-level multi-hot)."""
        present = [0] * num_classes
        for c, _, _ in self.segments:
            present[c] = 1
        return present


@dataclass(frozen=True)
class Annotations:
    samples: list[Sample]
    num_classes: int
    #: class names in index order, when the annotations named them
    class_names: list[str] | None
    #: inputs listed but not found on disk
    missing: int = 0


def _find_input(root: Path, vid: str) -> Path | None:
    """``<root>/<vid>.<ext>`` or the frame folder ``<root>/<vid>``."""
    for suffix in VIDEO_SUFFIXES:
        if (root / f"{vid}{suffix}").is_file():
            return root / f"{vid}{suffix}"
    return root / vid if (root / vid).is_dir() else None


def _number(text: str, what: str, where: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise AnnotationError(f"{where}: {what} {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise AnnotationError(f"{where}: {what} {text!r} must be a finite number >= 0")
    return value


def parse_charades_actions(text: str, where: str, num_classes: int = CHARADES_CLASSES
                           ) -> tuple[tuple[int, float, float], ...]:
    """``c092 11.90 21.20;c147 0.00 12.60`` -> ((92, 11.9, 21.2), (147, 0.0, 12.6))."""
    out = []
    for part in (p.strip() for p in (text or "").split(";")):
        if not part:
            continue
        fields = part.split()
        if len(fields) != 3 or not fields[0].startswith("c") or not fields[0][1:].isdigit():
            raise AnnotationError(f"{where}: action {part!r} is not 'cNNN start end'")
        cls = int(fields[0][1:])
        if cls >= num_classes:
            raise AnnotationError(f"{where}: class {fields[0]} is not below {num_classes}")
        start, end = (_number(f, "time", where) for f in fields[1:])
        if end < start:
            raise AnnotationError(f"{where}: action {part!r} ends before it starts")
        out.append((cls, start, end))
    return tuple(out)


def read_charades(csv_path: str | Path, video_root: str | Path) -> Annotations:
    """Charades' annotation CSV; inputs under ``video_root`` (see the module docstring)."""
    path, root = Path(csv_path), Path(video_root)
    samples, missing = [], 0
    for line, row in _csv_rows(path, ("id", "actions", "length")):
        where = f"{path}:{line}"
        vid = (row.get("id") or "").strip()
        if not vid:
            raise AnnotationError(f"{where}: empty id")
        segments = parse_charades_actions(row.get("actions") or "", where)
        length = _number(row.get("length"), "length", where) if row.get("length") else None
        found = _find_input(root, vid)
        if found is None:
            missing += 1
            log.warning("%s: %s is not under %s (neither a video file nor a frame folder); "
                        "left out", where, vid, root)
            continue
        samples.append(Sample(str(found), segments, length))
    return Annotations(samples, CHARADES_CLASSES, None, missing)


def _csv_rows(path: Path, required: Sequence[str]) -> Iterable[tuple[int, dict]]:
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    with f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        lacking = [c for c in required if c not in header]
        if lacking:
            raise AnnotationError(f"{path}:1: the header lacks column(s) {', '.join(lacking)} "
                                  f"(has: {', '.join(header) or 'nothing'})")
        reader.fieldnames = header
        try:
            for row in reader:
                yield reader.line_num, {k: (v.strip() if isinstance(v, str) else v)
                                        for k, v in row.items()}
        except csv.Error as exc:
            raise AnnotationError(f"{path}:{reader.line_num}: {exc}") from None


def read_generic(path: str | Path, video_root: str | Path | None = None,
                 num_classes: int | None = None) -> Annotations:
    """A CSV (``video,label[,start,end]``) or JSON list of such objects; relative video paths
    are taken under ``video_root`` (default: the annotation file's folder)."""
    path = Path(path)
    root = Path(video_root) if video_root else path.parent
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AnnotationError(f"{path}: not a readable JSON file ({exc})") from None
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: expected a list of {{video, label, start, end}} objects")
        rows = []
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise AnnotationError(f"{path}: item {i} is not an object")
            rows.append((f"{path}: item {i}", {k: item.get(k) for k in ("video", "label", "start", "end")}))
    else:
        rows = [(f"{path}:{line}", row) for line, row in _csv_rows(path, ("video", "label"))]

    labels = [str(row.get("label") if row.get("label") is not None else "").strip() for _, row in rows]
    for (where, _), label in zip(rows, labels):
        if not label:
            raise AnnotationError(f"{where}: empty label")
    named = not all(label.isdigit() for label in labels)
    names = sorted(set(labels)) if named else None
    index = {n: i for i, n in enumerate(names)} if named else None
    by_video: dict[str, list] = {}
    for (where, row), label in zip(rows, labels):
        video = str(row.get("video") or "").strip()
        if not video:
            raise AnnotationError(f"{where}: empty video")
        cls = index[label] if named else int(label)
        start = _number(row["start"], "start", where) if row.get("start") not in (None, "") else 0.0
        end = _number(row["end"], "end", where) if row.get("end") not in (None, "") else math.inf
        if end < start:
            raise AnnotationError(f"{where}: end {end:g} is before start {start:g}")
        by_video.setdefault(video, []).append((cls, start, end, where))
    count = len(names) if named else max((int(x) for x in labels), default=-1) + 1
    if num_classes is not None:
        if count > num_classes:
            raise AnnotationError(f"{path}: labels need {count} classes, num_classes is {num_classes}")
        count = num_classes
    samples, missing = [], 0
    for video, segs in by_video.items():
        p = Path(video).expanduser()
        p = p if p.is_absolute() else root / p
        if not p.exists():
            missing += 1
            log.warning("%s: %s does not exist; left out", segs[0][3], p)
            continue
        samples.append(Sample(str(p), tuple((c, s, e) for c, s, e, _ in segs)))
    return Annotations(samples, count, names, missing)


def frame_labels(sample: Sample, times_s: Sequence[float], num_classes: int) -> list[list[int]]:
    """Multi-hot ``(num_classes, len(times_s))``: class c is on at time t when a segment of c
    covers it (start <= t <= end), as pytorch-i3d labels Charades frames."""
    out = [[0] * len(times_s) for _ in range(num_classes)]
    for c, start, end in sample.segments:
        row = out[c]
        for k, t in enumerate(times_s):
            if start <= t <= end:
                row[k] = 1
    return out
