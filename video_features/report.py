"""``video-features report OUTPUT_PATH``: one self-contained HTML page of what a folder holds.

Built only from what runs leave on disk: the records of the outputs (``<stem>_meta.json``, or
the ``meta`` of consolidated ones), ``failures.jsonl`` and ``metrics.jsonl``. Plots are PNGs
embedded in the page (matplotlib, the ``[report]`` extra); no script, no server, no network.

* counts per feature type: outputs, hours of video, size on disk; failures grouped by reason,
  each failed input listed;
* speed of each run from its metrics lines: frames/s over time, GPU busy share and memory when a
  GPU was used (a busy share far below 1 means the run waited on decoding);
* per input, for at most ``max_videos`` (the flagged ones first, then a sample): the flags of
  ``video-features check``, thumbnails at the rows' times, each row's norm and its cosine
  similarity to the row before over time, and the rows' self-similarity image.

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
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from video_features.check import NOT_FEATURES, Output, check_output, iter_outputs
from video_features.utils.runlog import read_runlog

MAX_VIDEOS = 24
MAX_CHECKED = 5000
THUMBS = 6
SIMILARITY_SIDE = 200     # rows of the self-similarity image at most (longer videos are sampled)


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        from video_features.utils.errors import ConfigError

        raise ConfigError(f"report needs matplotlib ({exc}): pip install matplotlib (or the "
                          "[report] extra)") from None
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


# -- per input -------------------------------------------------------------------------------
def _thumbnails(video: str, stamps_s: list[float]) -> list[np.ndarray]:
    """Frames of ``video`` nearest to ``stamps_s`` (decoded in one pass at a low rate)."""
    from video_features.utils.video import open_frames

    if not stamps_s or not Path(video).exists():
        return []
    span = max(stamps_s) + 1e-3
    fps = max(1.0, len(stamps_s) / span * 2)
    frames, times = [], []
    try:
        with open_frames(video, fps) as src:
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


def _video_section(out: Output, findings: list, arrays: dict) -> str:
    plt = _plt()
    parts = [f"<h3>{html.escape(out.name)}</h3>"]
    if findings:
        parts.append("<ul class=flags>" + "".join(
            f"<li class={'err' if f.error else 'warn'}><b>{html.escape(f.flag)}</b>: "
            f"{html.escape(f.detail)}</li>" for f in findings) + "</ul>")
    else:
        parts.append("<p class=ok>no flags</p>")
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
        thumbs = _thumbnails(video, at)
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
        pick = np.linspace(0, len(unit) - 1, min(SIMILARITY_SIDE, len(unit))).round().astype(int)
        sim = unit[pick] @ unit[pick].T
        fig, ax = plt.subplots(figsize=(2.6, 2.6))
        ax.imshow(sim, vmin=-1, vmax=1, cmap="viridis")
        ax.set_title(f"{key}: self-similarity", fontsize=9)
        ax.axis("off")
        parts.append(_img(_png(fig), f"{key} self-similarity"))
    return "<section class=video>" + "\n".join(parts) + "</section>"


# -- runs --------------------------------------------------------------------------------------
def _runs_section(lines: list[dict]) -> str:
    if not lines:
        return "<p>No metrics.jsonl: runs from before this version, or outputs only printed.</p>"
    plt = _plt()
    runs: dict[str, list[dict]] = collections.OrderedDict()
    for ln in lines:
        runs.setdefault(ln.get("run", "?"), []).append(ln)
    rows, figs = [], []
    for run_id, entries in runs.items():
        ticks = [e for e in entries if "frames" in e]
        summary = next((e["summary"] for e in entries if "summary" in e), {})
        wall = max((e.get("elapsed_s", 0) for e in entries), default=0)
        frames = max((e["frames"] for e in ticks), default=0)
        gpus = [g for e in ticks for g in e.get("gpus", [])]
        busy = f"{np.mean([g['busy'] for g in gpus]):.0%}" if gpus else "n/a"
        peak = f"{max(g['memory_bytes'] for g in gpus) / 2**30:.1f} GB" if gpus else "n/a"
        rows.append(f"<tr><td>{html.escape(run_id)}</td><td>{html.escape('+'.join(entries[0].get('feature_types', [])))}</td>"
                    f"<td>{html.escape(', '.join(entries[0].get('devices', [])))}</td><td>{wall:.1f}</td>"
                    f"<td>{frames}</td><td>{frames / wall if wall else 0:.1f}</td>"
                    f"<td>{summary.get('done', '')}</td><td>{summary.get('skipped', '')}</td>"
                    f"<td>{summary.get('failed', '')}</td><td>{busy}</td><td>{peak}</td></tr>")
        if len(ticks) >= 2:
            t = np.array([e["elapsed_s"] for e in ticks])
            f = np.array([e["frames"] for e in ticks], np.float64)
            rate = np.diff(f) / np.maximum(np.diff(t), 1e-9)
            fig, ax = plt.subplots(figsize=(6, 2))
            ax.plot(t[1:], rate, lw=1, marker=".")
            ax.set_title(f"run {run_id}: frames/s", fontsize=9)
            ax.set_xlabel("s", fontsize=8)
            if gpus:
                ax2 = ax.twinx()
                ax2.plot([e["elapsed_s"] for e in ticks if e.get("gpus")],
                         [np.mean([g["busy"] for g in e["gpus"]]) for e in ticks if e.get("gpus")],
                         color="tab:red", lw=1)
                ax2.set_ylim(0, 1.05)
                ax2.set_ylabel("GPU busy", fontsize=8)
            figs.append(_img(_png(fig), f"run {run_id} speed"))
    head = ("<tr><th>run</th><th>feature types</th><th>devices</th><th>wall s</th><th>frames</th>"
            "<th>frames/s</th><th>done</th><th>skipped</th><th>failed</th><th>GPU busy</th>"
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
    for out in iter_outputs(root):
        counts[out.feature_type] += 1
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
    shown = flagged[:max_videos]
    shown += rng.sample(clean, min(len(clean), max_videos - len(shown))) if len(shown) < max_videos else []

    count_rows = []
    for ft, n in sorted(counts.items()):
        failed = sum(1 for f in failures if ft in str(f.get("feature_type", "")).split("+"))
        count_rows.append(f"<tr><td>{html.escape(ft)}</td><td>{n}</td><td>{failed}</td>"
                          f"<td>{hours[ft]:.3f}</td><td>{_bytes(sizes.get(ft, 0))}</td></tr>")
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for f in failures:
        groups[_reason_group(str(f.get("reason", "")), str(f.get("path", "")))].append(f)
    fail_html = "".join(
        f"<details><summary>{len(fs)} x {html.escape(reason)}</summary><ul>"
        + "".join(f"<li>{html.escape(str(f.get('path')))} ({html.escape(str(f.get('stage', '')))}): "
                  f"{html.escape(str(f.get('reason')))}</li>" for f in fs) + "</ul></details>"
        for reason, fs in sorted(groups.items(), key=lambda kv: -len(kv[1])))
    flag_counts = collections.Counter(f.flag for _, found in flagged for f in found)
    sections = [_video_section(out, found, out.load()) for out, found in shown]
    return PAGE.format(
        title=html.escape(f"video_features report: {root}"), root=html.escape(str(root)),
        counts="".join(count_rows), n_outputs=n_outputs, n_failed=len(failures),
        failures=fail_html or "<p class=ok>no failed input</p>",
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
<p>{root}: {n_outputs} output(s), {n_failed} input(s) failing.</p>
<h2>Outputs per feature type</h2>
<table><tr><th>feature type</th><th>outputs</th><th>failing inputs</th><th>hours of video</th><th>size on disk</th></tr>{counts}</table>
<h2>Failures</h2>{failures}
<h2>Runs</h2>{runs}
<h2>Inputs</h2>
<p>{checked} output(s) checked, {n_flagged} flagged ({flag_counts}); {n_shown} shown, the flagged ones first.</p>
{videos}
</body></html>
"""


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="video-features report",
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
