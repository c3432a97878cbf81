"""``video-features report OUTPUT_PATH``: one self-contained HTML page of what a folder holds.

Built only from what runs leave on disk: the records of the outputs (``<stem>_meta.json``, or
the ``meta`` of consolidated ones), ``failures.jsonl`` and ``metrics.jsonl``. Plots are PNGs
embedded in the page (matplotlib, the ``[report]`` extra); no script, no server, no network.

* counts per feature type: outputs, hours of video, size on disk; failures grouped by reason,
  each failed input listed; inputs decoded despite damage (the ``damaged`` line of their record),
  grouped the same way;
* speed of each run from its metrics lines: its average frames/s (frames / wall time, one
  computation, :func:`run_speed`, for the table and the chart, whose curve is the average from the
  start up to each moment and ends on the table's figure), GPU busy share and memory when a GPU
  was used (a busy share far below 1 means the run waited on decoding);
* per input, for at most ``max_videos`` (the flagged ones chosen first, then a sample): the flags
  of ``video-features check``, thumbnails at the rows' times, each row's norm and its cosine
  similarity to the row before over time, and the rows' self-similarity image (cosine similarity
  on a fixed -1..1 colour scale, with its colour bar, so images of different inputs compare).

Inputs are listed by name (their path, numbers in it compared as numbers), whatever order they
finished in: records do not hold the run's input list (``video_paths`` is left out of them).

Records are read one at a time; arrays only of the inputs checked (at most ``max_checked``, a
sample beyond) and of those shown, one at a time, so memory stays small on large folders.
"""
from __future__ import annotations

import base64
import collections
import html
import io
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from video_features.check import NOT_FEATURES, Output, check_output, iter_outputs
from video_features.utils.runlog import read_runlog

MAX_VIDEOS = 24
MAX_CHECKED = 5000
THUMBS = 6
SIMILARITY_SIDE = 200     # rows of the self-similarity image at most (longer videos are sampled)


def _plt() -> Any:
    from video_features.utils.errors import require

    matplotlib = require("matplotlib", "report", extra="report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _size_on_disk(root: Path) -> dict[str, int]:
    """Bytes per top-level feature-type folder or consolidated file (staging left out)."""
    sizes: dict[str, int] = collections.Counter()
    for p in root.iterdir():
        name = p.name.split(".")[0]
        files = [p] if p.is_file() else (f for f in p.rglob("*") if f.is_file() and ".staging" not in f.parts)
        sizes[name] += sum(f.stat().st_size for f in files)
    return sizes


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _read_failures(root: Path) -> list[dict]:
    out = []
    try:
        for line in (root / "failures.jsonl").read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    except OSError:
        pass
    return out


def _reason_group(reason: str, path: str) -> str:
    """A reason with the input's own path and numbers taken out, so alike failures group."""
    text = reason.replace(path, "<input>")
    return re.sub(r"\d+(\.\d+)?", "N", text)


def name_key(name: str) -> tuple:
    """Sort key of an input by name: its path, case aside, with numbers compared as numbers
    (``clip2`` before ``clip10``)."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), name


def _input_of(out: Output) -> str:
    """The input an output was made from (its record's absolute path, as failures.jsonl names
    it), else the output's own name."""
    return str(out.meta.get("input") or out.name)


def _output_key(out: Output) -> tuple:
    return name_key(_input_of(out)), out.feature_type, out.name


def _grouped(entries: list[tuple[str, str, str]]) -> str:
    """``(input, note, reason)`` entries grouped by reason (numbers and the input's path taken
    out), the largest group first, each input listed by name: ``input (note): reason``."""
    groups: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
    for e in entries:
        groups[_reason_group(e[2], e[0])].append(e)
    return "".join(
        f"<details><summary>{len(es)} x {html.escape(reason)}</summary><ul>"
        + "".join(f"<li>{html.escape(path)} ({html.escape(note)}): {html.escape(why)}</li>"
                  for path, note, why in sorted(es, key=lambda e: name_key(e[0])))
        + "</ul></details>"
        for reason, es in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))


# -- per input -------------------------------------------------------------------------------
def _thumbnails(video: str, stamps_s: list[float], stream: int | None = None) -> list[np.ndarray]:
    """Frames of ``video`` nearest to ``stamps_s`` (decoded in one pass at a low rate)."""
    from video_features.utils.video import open_frames

    if not stamps_s or not Path(video).exists():
        return []
    span = max(stamps_s) + 1e-3
    fps = max(1.0, len(stamps_s) / span * 2)
    frames, times = [], []
    try:
        with open_frames(video, fps, video_stream=stream) as src:
            for chunk in src.chunks(16):
                frames += list(chunk.frames)
                times += list(chunk.timestamps_ms / 1000.0)
                if times and times[-1] >= span:
                    break
    except Exception:  # noqa: BLE001 - thumbnails are a courtesy
        return []
    if not frames:
        return []
    times = np.asarray(times)
    return [frames[int(np.abs(times - t).argmin())] for t in stamps_s]


def similarity_figure(key: str, unit: np.ndarray) -> Any:
    """The self-similarity image of unit-norm rows (sampled to ``SIMILARITY_SIDE``): cosine
    similarity drawn on the fixed range -1..1 whatever the input, with its colour bar."""
    plt = _plt()
    pick = np.linspace(0, len(unit) - 1, min(SIMILARITY_SIDE, len(unit))).round().astype(int)
    sim = np.clip(unit[pick] @ unit[pick].T, -1.0, 1.0)
    fig, ax = plt.subplots(figsize=(3.2, 2.6))
    im = ax.imshow(sim, vmin=-1.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_title(f"{key}: self-similarity", fontsize=9)
    ax.axis("off")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, ticks=[-1, -0.5, 0, 0.5, 1])
    bar.set_label("cosine similarity", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig


def _video_section(out: Output, findings: list, arrays: dict) -> str:
    plt = _plt()
    parts = [f"<h3>{html.escape(out.name)}</h3>"]
    if findings:
        parts.append("<ul class=flags>" + "".join(
            f"<li class={'err' if f.error else 'warn'}><b>{html.escape(f.flag)}</b>: "
            f"{html.escape(f.detail)}</li>" for f in findings) + "</ul>")
    else:
        parts.append("<p class=ok>no flags</p>")
    if out.meta.get("damaged"):
        parts.append(f"<p class=warn><b>damaged</b>: {html.escape(str(out.meta['damaged']))}</p>")
    feats = {k: np.asarray(v) for k, v in arrays.items()
             if k not in NOT_FEATURES and np.asarray(v).ndim >= 1 and len(v)}
    stamps = arrays.get("timestamps_ms")
    if stamps is not None:
        ts = np.asarray(stamps, np.float64)
        t_s = (ts[:, 0] if ts.ndim == 2 else ts) / 1000.0
    else:
        t_s = None
    video = out.meta.get("input")
    if t_s is not None and video and len(t_s):
        at = [float(t_s[i]) for i in np.linspace(0, len(t_s) - 1, min(THUMBS, len(t_s))).round().astype(int)]
        stream = ((out.meta.get("media") or {}).get("video") or {}).get("stream")
        thumbs = _thumbnails(video, at, stream if isinstance(stream, int) else None)
        if thumbs:
            fig, axes = plt.subplots(1, len(thumbs), figsize=(1.6 * len(thumbs), 1.4))
            for ax, img, t in zip(np.atleast_1d(axes), thumbs, at):
                ax.imshow(img)
                ax.set_title(f"{t:.1f} s", fontsize=8)
                ax.axis("off")
            parts.append(_img(_png(fig), "thumbnails"))
    for key, x in feats.items():
        rows = x.reshape(len(x), -1).astype(np.float64)
        rows = np.where(np.isfinite(rows), rows, 0.0)
        norm = np.linalg.norm(rows, axis=1)
        unit = rows / np.maximum(norm, 1e-12)[:, None]
        cos = np.r_[np.nan, (unit[1:] * unit[:-1]).sum(1)]
        t = t_s[: len(rows)] if t_s is not None and len(t_s) >= len(rows) else np.arange(len(rows))
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 2.2))
        a1.plot(t, norm, lw=1)
        a1.set_title(f"{key}: row norm", fontsize=9)
        a1.set_xlabel("s" if t_s is not None else "row", fontsize=8)
        a2.plot(t, cos, lw=1, color="tab:orange")
        a2.set_title("cosine similarity to the row before", fontsize=9)
        a2.set_ylim(min(-0.05, float(np.nanmin(cos)) if len(cos) > 1 else 0), 1.05)
        parts.append(_img(_png(fig), f"{key} norm and similarity"))
        parts.append(_img(_png(similarity_figure(key, unit)), f"{key} self-similarity"))
    return "<section class=video>" + "\n".join(parts) + "</section>"


# -- runs --------------------------------------------------------------------------------------
@dataclass
class RunSpeed:
    """A run's speed from its metrics lines: ``average`` (frames / wall time) is the figure of the
    table, and ``fps`` the chart's curve: the average from the start up to each time in ``t``,
    whose last point is at the wall time, so it ends on ``average``."""

    wall_s: float
    frames: int
    t: np.ndarray
    fps: np.ndarray

    @property
    def average(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0


def run_speed(entries: list[dict]) -> RunSpeed:
    """The speed of one run from its metrics lines: the wall time is the latest time of its lines
    (the summary line's, written once the run ended), the frames the most any line counted."""
    ticks = [e for e in entries if "frames" in e]
    wall = float(max((e.get("elapsed_s", 0) for e in entries), default=0))
    frames = int(max((e["frames"] for e in ticks), default=0))
    points = sorted((float(e.get("elapsed_s", 0)), int(e["frames"])) for e in ticks)
    points = [(t, f) for t, f in points if 0 < t < wall]
    if wall > 0:
        points.append((wall, frames))
    t = np.array([p[0] for p in points], np.float64)
    f = np.array([p[1] for p in points], np.float64)
    return RunSpeed(wall, frames, t, f / t)


def speed_figure(run_id: str, speed: RunSpeed, entries: list[dict]) -> Any:
    """The chart of one run: its average frames/s from the start up to each moment (the last
    point is the table's figure), the run's average as a dashed line, and the GPU busy share."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.plot(speed.t, speed.fps, lw=1, marker=".", label="average since the start")
    ax.axhline(speed.average, color="tab:gray", ls="--", lw=1,
               label=f"run average {speed.average:.1f}")
    ax.set_ylim(0, max(1.0, float(speed.fps.max()) if len(speed.fps) else 0) * 1.1)
    ax.set_title(f"run {run_id}: frames/s", fontsize=9)
    ax.set_xlabel("s", fontsize=8)
    ax.legend(fontsize=7, loc="best")
    busy = [(e["elapsed_s"], np.mean([g["busy"] for g in e["gpus"]]))
            for e in entries if "frames" in e and e.get("gpus")]
    if busy:
        ax2 = ax.twinx()
        ax2.plot([b[0] for b in busy], [b[1] for b in busy], color="tab:red", lw=1)
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("GPU busy", fontsize=8)
    return fig


def _runs_section(lines: list[dict]) -> str:
    if not lines:
        return "<p>No metrics.jsonl: runs from before this version, or outputs only printed.</p>"
    runs: dict[str, list[dict]] = collections.OrderedDict()
    for ln in lines:
        runs.setdefault(ln.get("run", "?"), []).append(ln)
    rows, figs = [], []
    for run_id, entries in runs.items():
        ticks = [e for e in entries if "frames" in e]
        summary = next((e["summary"] for e in entries if "summary" in e), {})
        speed = run_speed(entries)
        gpus = [g for e in ticks for g in e.get("gpus", [])]
        busy = f"{np.mean([g['busy'] for g in gpus]):.0%}" if gpus else "n/a"
        peak = f"{max(g['memory_bytes'] for g in gpus) / 2**30:.1f} GB" if gpus else "n/a"
        rows.append(f"<tr><td>{html.escape(run_id)}</td><td>{html.escape('+'.join(entries[0].get('feature_types', [])))}</td>"
                    f"<td>{html.escape(', '.join(entries[0].get('devices', [])))}</td><td>{speed.wall_s:.1f}</td>"
                    f"<td>{speed.frames}</td><td>{speed.average:.1f}</td>"
                    f"<td>{summary.get('done', '')}</td><td>{summary.get('skipped', '')}</td>"
                    f"<td>{summary.get('failed', '')}</td><td>{busy}</td><td>{peak}</td></tr>")
        if ticks and len(speed.t):
            figs.append(_img(_png(speed_figure(run_id, speed, entries)), f"run {run_id} speed"))
    head = ("<tr><th>run</th><th>feature types</th><th>devices</th><th>wall s</th><th>frames</th>"
            "<th>frames/s (average)</th><th>done</th><th>skipped</th><th>failed</th><th>GPU busy</th>"
            "<th>peak GPU memory</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>" + "".join(figs)


# -- the page ----------------------------------------------------------------------------------
def build(root: str | Path, max_videos: int = MAX_VIDEOS, max_checked: int = MAX_CHECKED,
          seed: int = 0) -> str:
    root = Path(root)
    rng = random.Random(seed)
    # one pass over the records: counts per type, and a uniform sample of max_checked outputs
    # (reservoir sampling), so memory does not grow with the folder
    counts: dict[str, int] = collections.Counter()
    hours: dict[str, float] = collections.Counter()
    checked: list[Output] = []
    n_outputs = 0
    # inputs decoded despite damage: input -> [description, its feature types]
    damaged: dict[str, list] = {}
    damaged_per_type: dict[str, int] = collections.Counter()
    for out in iter_outputs(root):
        counts[out.feature_type] += 1
        if out.meta.get("damaged"):
            damaged.setdefault(_input_of(out), [str(out.meta["damaged"]), []])[1].append(out.feature_type)
            damaged_per_type[out.feature_type] += 1
        hours[out.feature_type] += float((out.meta.get("media") or {}).get("duration_s") or 0) / 3600
        if len(checked) < max_checked:
            checked.append(out)
        elif (j := rng.randrange(n_outputs + 1)) < max_checked:
            checked[j] = out
        n_outputs += 1
    sizes = _size_on_disk(root)
    failures = _read_failures(root)
    flagged, clean = [], []
    for out in checked:
        found = check_output(out)
        (flagged if found else clean).append((out, found))
    # the flagged ones are chosen first (by name), then a sample of the others; all are shown
    # by name
    flagged.sort(key=lambda of: _output_key(of[0]))
    shown = flagged[:max_videos]
    shown += rng.sample(clean, min(len(clean), max_videos - len(shown))) if len(shown) < max_videos else []
    shown.sort(key=lambda of: _output_key(of[0]))

    count_rows = []
    for ft, n in sorted(counts.items()):
        failed = sum(1 for f in failures if ft in str(f.get("feature_type", "")).split("+"))
        count_rows.append(f"<tr><td>{html.escape(ft)}</td><td>{n}</td><td>{failed}</td>"
                          f"<td>{damaged_per_type[ft]}</td><td>{hours[ft]:.3f}</td>"
                          f"<td>{_bytes(sizes.get(ft, 0))}</td></tr>")
    fail_html = _grouped([(str(f.get("path")), str(f.get("stage", "")), str(f.get("reason", "")))
                          for f in failures])
    damaged_html = _grouped([(path, "+".join(sorted(types)), why)
                             for path, (why, types) in damaged.items()])
    flag_counts = collections.Counter(f.flag for _, found in flagged for f in found)
    sections = [_video_section(out, found, out.load()) for out, found in shown]
    return PAGE.format(
        title=html.escape(f"video_features report: {root}"), root=html.escape(str(root)),
        counts="".join(count_rows), n_outputs=n_outputs, n_failed=len(failures),
        failures=fail_html or "<p class=ok>no failed input</p>",
        n_damaged=len(damaged), damaged=damaged_html or "<p class=ok>no damaged input</p>",
        runs=_runs_section(read_runlog(root)),
        checked=len(checked), n_flagged=len(flagged),
        flag_counts=", ".join(f"{k}: {v}" for k, v in sorted(flag_counts.items())) or "none",
        n_shown=len(shown), videos="\n".join(sections))


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
.err {{ color: #b00; }} .warn {{ color: #a60; }} .ok {{ color: #080; }}
section.video {{ border-top: 1px solid #ddd; padding-top: 0.5em; }}
img {{ margin: 0.2em; vertical-align: top; }}
</style></head><body>
<h1>video_features report</h1>
<p>{root}: {n_outputs} output(s), {n_failed} input(s) failing, {n_damaged} damaged.</p>
<h2>Outputs per feature type</h2>
<table><tr><th>feature type</th><th>outputs</th><th>failing inputs</th><th>damaged inputs</th><th>hours of video</th><th>size on disk</th></tr>{counts}</table>
<h2>Failures</h2>{failures}
<h2>Damaged inputs</h2>
<p>{n_damaged} input(s) decoded despite damage: their outputs hold what could be decoded.</p>{damaged}
<h2>Runs</h2>{runs}
<h2>Inputs</h2>
<p>{checked} output(s) checked, {n_flagged} flagged ({flag_counts}); {n_shown} shown (the flagged ones chosen first, then a sample of the others), by name.</p>
{videos}
</body></html>
"""


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="video-features report", allow_abbrev=False,
                                     description="Write one self-contained HTML report of an output folder.")
    parser.add_argument("output_path")
    parser.add_argument("--out", help="the HTML file (default: OUTPUT_PATH/report.html)")
    parser.add_argument("--max_videos", type=int, default=MAX_VIDEOS)
    parser.add_argument("--max_checked", type=int, default=MAX_CHECKED)
    args = parser.parse_args(argv)
    root = Path(args.output_path)
    if not root.is_dir():
        print(f"error: {root} is not a folder", file=sys.stderr)
        return 2
    from video_features.utils.errors import FeatureError

    try:
        page = build(root, args.max_videos, args.max_checked)
    except FeatureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else root / "report.html"
    out.write_text(page, encoding="utf-8")
    print(f"report: {out}", file=sys.stderr)
    return 0
