"""Run an extraction over many inputs: one worker process per device, one shared queue.

The parent validates, skips inputs whose outputs already exist, hands the rest to workers through
a shared queue (fast workers take more), shows progress, and records per input whether it was
done or failed and why. A worker that dies (out of memory, segfault, killed) costs only the input
it was on: that input is recorded as failed, a replacement worker starts on the same device, and
the run goes on. With a single worker everything runs in the calling process.

:func:`process_one` is the per-input function; a cluster backend can call it as is.
"""
from __future__ import annotations

import logging
import os
import queue as queue_mod
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from utils.config import Config
from utils.errors import FeatureError
from utils.output import OutputWriter

log = logging.getLogger(__name__)

MAX_RESPAWNS_PER_DEVICE = 3


@dataclass
class Result:
    path: str
    status: str               # done | failed | skipped
    reason: str = ""
    frames: int = 0
    seconds: float = 0.0


@dataclass
class Summary:
    results: list[Result] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def exit_code(self) -> int:
        return 0 if not self.failed else 1

    def text(self) -> str:
        lines = [f"done {self.count('done')}, skipped {self.count('skipped')} (already extracted), "
                 f"failed {self.count('failed')}"]
        lines += [f"  FAILED {r.path}: {r.reason}" for r in self.failed]
        return "\n".join(lines)


def devices_for(cfg: Config) -> list[str]:
    if cfg.device == "cpu":
        return ["cpu"] * int(cfg.cpu_workers)
    return [f"cuda:{i}" for i in cfg.device_ids]


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
                        force=True)


def build_extractor(cfg: Config, device: str) -> Any:
    import torch

    from models.registry import get_extractor_class

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        torch.backends.cudnn.benchmark = True
    return get_extractor_class(cfg.feature_type)(cfg, torch.device(device))


def process_one(extractor: Any, writer: OutputWriter, path: str) -> Result:
    """Extract and write one input; every failure becomes a one-line reason."""
    t0 = time.perf_counter()
    extractor.frames_read = 0
    try:
        feats = extractor.extract(path)
        writer.write(path, feats)
        return Result(path, "done", frames=extractor.frames_read, seconds=time.perf_counter() - t0)
    except FeatureError as exc:
        reason = str(exc)
    except MemoryError:
        reason = "out of memory"
    except Exception as exc:  # a bug or a library error: keep the run going, keep the trace
        if type(exc).__name__ == "OutOfMemoryError":
            reason = "out of GPU memory (lower batch_size)"
            _free_cuda()
        else:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.debug("traceback for %s:\n%s", path, traceback.format_exc())
    return Result(path, "failed", reason=reason, frames=extractor.frames_read,
                  seconds=time.perf_counter() - t0)


def _free_cuda() -> None:
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass


def _threads_per_worker(n_cpu_workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, n_cpu_workers))


def _worker_main(wid: int, device: str, cfg: Config, tasks: Any, results: Any) -> None:
    """Entry point of a spawned worker process."""
    configure_logging(cfg.log_level)
    import torch

    if device == "cpu":
        torch.set_num_threads(_threads_per_worker(len(devices_for(cfg))))
    try:
        extractor = build_extractor(cfg, device)
        writer = OutputWriter.from_config(cfg)
    except FeatureError as exc:
        results.put(("fatal", wid, str(exc)))
        return
    except Exception as exc:
        results.put(("fatal", wid, f"{type(exc).__name__}: {exc}"))
        return
    results.put(("ready", wid, device))
    pending = [0, time.monotonic()]  # frames not yet reported, time of the last report

    def report(n: int) -> None:  # throttled live progress to the parent
        pending[0] += n
        if time.monotonic() - pending[1] >= 0.5:
            results.put(("frames", wid, pending[0]))
            pending[:] = [0, time.monotonic()]

    extractor.progress_hook = report
    while True:
        path = tasks.get()
        if path is None:
            break
        results.put(("start", wid, path))
        res = process_one(extractor, writer, path)
        if pending[0]:
            results.put(("frames", wid, pending[0]))
            pending[:] = [0, time.monotonic()]
        results.put(("result", wid, res))
    results.put(("exit", wid, None))


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.frames = 0
        self.failed = 0
        self.t0 = self._shown = time.perf_counter()
        self.bar = None
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="video", dynamic_ncols=True, file=sys.stderr)

    def add_frames(self, n: int) -> None:
        """Frames read so far (live, during a video)."""
        self.frames += n
        if self.bar is not None and time.perf_counter() - self._shown >= 0.5:
            self._postfix()

    def _postfix(self) -> None:
        self._shown = time.perf_counter()
        fps = self.frames / max(1e-9, self._shown - self.t0)
        self.bar.set_postfix_str(f"{fps:.1f} frames/s, {self.failed} failed")

    def update(self, res: Result) -> None:
        """One input finished (its frames were counted by add_frames)."""
        self.failed += res.status == "failed"
        if self.bar is not None:
            self._postfix()
            self.bar.update(1)
        if res.status == "failed":
            msg = f"failed: {res.path}: {res.reason}"
            if self.bar is not None:
                self.bar.write(msg, file=sys.stderr)
            else:
                log.warning(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_enabled(cfg: Config) -> bool:
    if cfg.progress == "auto":
        return sys.stderr.isatty()
    return bool(cfg.progress)


def plan(cfg: Config) -> tuple[list[str], list[Result]]:
    """Split inputs into (to do, skipped). Inputs whose outputs would collide fail up front."""
    from models.registry import get_extractor_class

    writer = OutputWriter.from_config(cfg)
    keys = get_extractor_class(cfg.feature_type).output_keys_for(cfg)
    todo: list[str] = []
    done: list[Result] = []
    owners: dict[Any, str] = {}
    for path in cfg.video_paths:
        if writer.saves:
            first = next(iter(writer.paths_for(path, keys).values()))
            other = owners.setdefault(first, path)
            if other != path:
                done.append(Result(path, "failed", reason=f"its output files would overwrite those of {other}"))
                continue
            if not cfg.overwrite and writer.is_done(path, keys):
                done.append(Result(path, "skipped"))
                continue
        todo.append(path)
    return todo, done


def run(cfg: Config) -> Summary:
    """Extract features for every input of ``cfg``; never raises for a bad input."""
    todo, summary_results = plan(cfg)
    summary = Summary(list(summary_results))
    for r in summary.results:
        if r.status == "failed":
            log.warning("failed: %s: %s", r.path, r.reason)
    if summary.count("skipped"):
        log.info("skipping %d input(s) already extracted (overwrite=true recomputes them)",
                 summary.count("skipped"))
    if not todo:
        return summary
    devices = devices_for(cfg)
    progress = _Progress(len(todo), _progress_enabled(cfg))
    try:
        if len(devices) == 1 or len(todo) == 1:
            _run_inline(cfg, devices[0], todo, summary, progress)
        else:
            _run_pool(cfg, devices[: len(todo)], todo, summary, progress)
    finally:
        progress.close()
    return summary


def _run_inline(cfg: Config, device: str, todo: list[str], summary: Summary, progress: _Progress) -> None:
    extractor = build_extractor(cfg, device)  # errors here (weights, device) end the run
    extractor.progress_hook = progress.add_frames
    writer = OutputWriter.from_config(cfg)
    for path in todo:
        res = process_one(extractor, writer, path)
        summary.results.append(res)
        progress.update(res)


def _run_pool(cfg: Config, devices: list[str], todo: list[str], summary: Summary,
              progress: _Progress) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    tasks = ctx.Queue()
    results = ctx.Queue()
    for path in todo:
        tasks.put(path)
    for _ in devices:
        tasks.put(None)

    procs: dict[int, Any] = {}
    device_of: dict[int, str] = {}
    inflight: dict[int, str] = {}
    finished: set[int] = set()
    respawns: dict[str, int] = {}
    fatal: list[str] = []
    next_id = 0

    def start(device: str) -> None:
        nonlocal next_id
        wid, next_id = next_id, next_id + 1
        p = ctx.Process(target=_worker_main, args=(wid, device, cfg, tasks, results),
                        name=f"worker{wid}-{device}", daemon=True)
        p.start()
        procs[wid], device_of[wid] = p, device

    for d in devices:
        start(d)
    remaining = len(todo)
    try:
        while remaining > 0:
            try:
                msg = results.get(timeout=0.5)
            except queue_mod.Empty:
                msg = None
            if msg is not None:
                kind, wid, payload = msg
                if kind == "start":
                    inflight[wid] = payload
                elif kind == "frames":
                    progress.add_frames(payload)
                elif kind == "result":
                    inflight.pop(wid, None)
                    summary.results.append(payload)
                    progress.update(payload)
                    remaining -= 1
                elif kind == "fatal":
                    fatal.append(payload)
                    finished.add(wid)
                    log.error("worker on %s could not start: %s", device_of[wid], payload)
                elif kind == "exit":
                    finished.add(wid)
                continue
            # nothing arrived: look for workers that died without saying so
            for wid, p in list(procs.items()):
                if wid in finished or p.is_alive():
                    continue
                finished.add(wid)
                lost = inflight.pop(wid, None)
                if lost is not None:
                    res = Result(lost, "failed", reason=f"worker process died (exit code {p.exitcode}) "
                                                        "while extracting this input")
                    summary.results.append(res)
                    progress.update(res)
                    remaining -= 1
                dev = device_of[wid]
                respawns[dev] = respawns.get(dev, 0) + 1
                if respawns[dev] <= MAX_RESPAWNS_PER_DEVICE and remaining > 0:
                    log.warning("worker on %s died (exit code %s); starting a new one", dev, p.exitcode)
                    start(dev)
            alive = [w for w in procs if w not in finished]
            if not alive and remaining > 0:
                reason = fatal[0] if fatal else "no worker left (all died)"
                for path in _drain(tasks):
                    res = Result(path, "failed", reason=f"not processed: {reason}")
                    summary.results.append(res)
                    progress.update(res)
                    remaining -= 1
                if fatal and summary.count("done") == 0:
                    raise FeatureError(reason)
                break
    finally:
        for p in procs.values():
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()


def _drain(q: Any) -> list[str]:
    out = []
    while True:
        try:
            item = q.get(timeout=0.2)
        except (queue_mod.Empty, OSError, ValueError):
            return out
        if item is not None:
            out.append(item)

