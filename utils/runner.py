"""Run an extraction over many inputs: worker processes on the devices, fed one input at a time.

The parent validates, records what produces the outputs (utils/record.py: resolving, and if
needed downloading, every checkpoint once), skips inputs whose outputs are already done under
the same record, and hands the rest to workers. Each worker has its own pipe: the parent sends it
the next input when it reports the previous one, so the parent always knows which input each
worker holds. It waits on the pipes and on the processes' sentinels together, so a worker that
dies (out of memory, segfault, killed) is noticed at once, however busy the others are: its input
is recorded as failed with the reason and a replacement starts on the same device. A worker that
reports no progress for ``worker_timeout`` seconds is killed and replaced the same way, and a
worker whose CUDA context is broken by a sticky error (illegal address, device assert) is
replaced instead of failing every later input. At the end every planned input has exactly one
result; anything unaccounted for is reported as failed, never silently dropped.

With one CPU worker (``device=cpu``, ``cpu_workers=1``) everything runs in the calling process
instead, without that protection; every GPU run uses worker processes.
:func:`process_one` is the per-input function; a cluster backend can call it as is.
"""
from __future__ import annotations

import collections
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from utils.config import Config
from utils.device import is_sticky_device_error, prepare_device
from utils.errors import FeatureError
from utils.output import OutputWriter

log = logging.getLogger(__name__)

#: replacements of a device's worker in a row without any input finished in between
MAX_RESPAWNS_PER_DEVICE = 3


@dataclass
class Result:
    path: str
    status: str               # done | failed | skipped
    reason: str = ""
    frames: int = 0
    seconds: float = 0.0
    #: the worker's device is unusable after this input (sticky CUDA error): replace the worker
    device_broken: bool = False


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
    from models.registry import get_extractor_class

    return get_extractor_class(cfg.feature_type)(cfg, prepare_device(device, cfg.tf32))


def process_one(extractor: Any, writer: OutputWriter, path: str) -> Result:
    """Extract and write one input; every failure becomes a one-line reason."""
    t0 = time.perf_counter()
    extractor.frames_read = 0
    broken = False
    try:
        feats = extractor.extract(path)
        seconds = time.perf_counter() - t0
        writer.write(path, feats, {"frames": extractor.frames_read, "seconds": round(seconds, 3),
                                   "device": str(extractor.device)})
        return Result(path, "done", frames=extractor.frames_read, seconds=seconds)
    except FeatureError as exc:
        reason = str(exc)
    except MemoryError:
        reason = "out of memory"
    except Exception as exc:  # a bug or a library error: keep the run going, keep the trace
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if type(exc).__name__ == "OutOfMemoryError":
            reason = "out of GPU memory (lower batch_size)"
            _free_cuda()
        elif is_sticky_device_error(exc):
            broken = True
            reason = f"device error, the worker is replaced: {type(exc).__name__}: {first}"
        else:
            reason = f"{type(exc).__name__}: {first}"
            log.debug("traceback for %s:\n%s", path, traceback.format_exc())
    return Result(path, "failed", reason=reason, frames=extractor.frames_read,
                  seconds=time.perf_counter() - t0, device_broken=broken)


def _free_cuda() -> None:
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass


def _threads_per_worker(n_cpu_workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, n_cpu_workers))


def _worker_main(device: str, cfg: Config, record: dict, conn: Any) -> None:
    """Entry point of a spawned worker: build once, then extract each path the parent sends."""
    configure_logging(cfg.log_level)
    import torch

    if device == "cpu":
        torch.set_num_threads(_threads_per_worker(len(devices_for(cfg))))
    try:
        extractor = build_extractor(cfg, device)
        writer = OutputWriter.from_config(cfg, record)
    except Exception as exc:
        conn.send(("fatal", str(exc) if isinstance(exc, FeatureError) else f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", device))
    last = [0, time.monotonic()]  # frames not yet reported, time of the last report

    def report(n: int) -> None:  # throttled live progress; also the watchdog's heartbeat
        last[0] += n
        if time.monotonic() - last[1] >= 0.5:
            conn.send(("frames", last[0]))
            last[:] = [0, time.monotonic()]

    extractor.progress_hook = report
    while True:
        try:
            path = conn.recv()
        except EOFError:  # the parent is gone
            return
        if path is None:
            return
        res = process_one(extractor, writer, path)
        if last[0]:
            conn.send(("frames", last[0]))
            last[:] = [0, time.monotonic()]
        conn.send(("result", res))
        if res.device_broken:
            conn.close()
            os._exit(3)  # a broken CUDA context can hang an orderly exit


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


def plan(cfg: Config, record: dict) -> tuple[list[str], list[Result]]:
    """Split inputs into (to do, already settled). Settled: skipped (done under the same record),
    refused (``on_mismatch=refuse`` and made differently) or colliding with another input."""
    from models.registry import get_extractor_class

    writer = OutputWriter.from_config(cfg, record)
    keys = get_extractor_class(cfg.feature_type).output_keys_for(cfg)
    todo: list[str] = []
    settled: list[Result] = []
    owners: dict[Any, str] = {}
    for path in cfg.video_paths:
        if writer.saves:
            first = next(iter(writer.paths_for(path, keys).values()))
            other = owners.setdefault(first, path)
            if other != path:
                settled.append(Result(path, "failed", reason=f"its output files would overwrite those of {other}"))
                continue
            if not cfg.overwrite:
                state = writer.state(path, keys)
                if state.status == "done":
                    settled.append(Result(path, "skipped"))
                    continue
                if state.status == "mismatch":
                    why = "; ".join(state.reasons)
                    if cfg.on_mismatch == "refuse":
                        settled.append(Result(path, "failed", reason=(
                            f"existing outputs were made differently ({why}); on_mismatch=recompute "
                            "or overwrite=true replaces them, or use another output_path")))
                        continue
                    log.info("recomputing %s: its outputs were made differently (%s)", path, why)
        todo.append(path)
    return todo, settled


def run(cfg: Config) -> Summary:
    """Extract features for every input of ``cfg``; never raises for a bad input."""
    from utils.record import run_record

    record = run_record(cfg)  # WeightsError here (missing weights) ends the run before any work
    todo, settled = plan(cfg, record)
    summary = Summary(list(settled))
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
        if devices == ["cpu"]:  # one CPU worker: no process to spawn
            _run_inline(cfg, record, devices[0], todo, summary, progress)
        else:
            _run_pool(cfg, record, devices[: len(todo)], todo, summary, progress)
    finally:
        progress.close()
    _reconcile(cfg.video_paths, summary, progress)
    return summary


def _reconcile(planned: list[str], summary: Summary, progress: _Progress) -> None:
    """Every planned input has a result: one that has none is reported, not dropped."""
    reported = {r.path for r in summary.results}
    for path in planned:
        if path not in reported:
            res = Result(path, "failed", reason="no result was reported for this input (lost)")
            summary.results.append(res)
            progress.update(res)


def _run_inline(cfg: Config, record: dict, device: str, todo: list[str], summary: Summary,
                progress: _Progress) -> None:
    extractor = build_extractor(cfg, device)  # errors here (weights, device) end the run
    extractor.progress_hook = progress.add_frames
    writer = OutputWriter.from_config(cfg, record)
    for i, path in enumerate(todo):
        res = process_one(extractor, writer, path)
        summary.results.append(res)
        progress.update(res)
        if res.device_broken:  # this process's CUDA context is gone: nothing more can run here
            for rest in todo[i + 1:]:
                res = Result(rest, "failed", reason="not processed: the device failed on an "
                                                    "earlier input; rerun to extract it")
                summary.results.append(res)
                progress.update(res)
            return


@dataclass
class _Worker:
    proc: Any
    conn: Any
    device: str
    task: str | None = None
    heard: float = 0.0        # monotonic time of the last message
    ready: bool = False
    start_failed: bool = False
    broken: bool = False      # reported a sticky device error and exits


def _run_pool(cfg: Config, record: dict, devices: list[str], todo: list[str], summary: Summary,
              progress: _Progress) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    pending = collections.deque(todo)
    workers: list[_Worker] = []
    respawns: dict[str, int] = collections.Counter()
    fatal: list[str] = []
    timeout = float(cfg.worker_timeout or 0)

    def start(device: str) -> None:
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(target=_worker_main, args=(device, cfg, record, child_end),
                        name=f"worker-{device}", daemon=True)
        p.start()
        child_end.close()
        workers.append(_Worker(p, parent_end, device, heard=time.monotonic()))

    def finish(w: _Worker, res: Result) -> None:
        w.task = None
        summary.results.append(res)
        progress.update(res)

    def dispatch(w: _Worker) -> None:
        if pending and w.ready and w.task is None and w.proc.is_alive():
            w.task = pending.popleft()
            w.heard = time.monotonic()
            try:
                w.conn.send(w.task)
            except (BrokenPipeError, OSError):
                pass  # it died; its sentinel says so next round, with the task still held

    def retire(w: _Worker, why: str, replace: bool) -> None:
        workers.remove(w)
        w.conn.close()
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=10)
        if w.task is not None:
            finish(w, Result(w.task, "failed", reason=why))
        respawns[w.device] += 1
        if replace and pending and respawns[w.device] <= MAX_RESPAWNS_PER_DEVICE:
            log.warning("worker on %s: %s; starting a new one", w.device, why)
            start(w.device)

    for d in devices:
        start(d)
    try:
        while pending or any(w.task is not None for w in workers):
            if not workers:
                reason = fatal[0] if fatal else "no worker left (they kept dying)"
                if fatal and summary.count("done") == 0:
                    raise FeatureError(reason)
                while pending:
                    res = Result(pending.popleft(), "failed", reason=f"not processed: {reason}")
                    summary.results.append(res)
                    progress.update(res)
                break
            wait([w.conn for w in workers] + [w.proc.sentinel for w in workers], timeout=1.0)
            for w in list(workers):
                # read what it said before judging whether it is alive: a result may precede death
                try:
                    while w.conn.poll():
                        kind, payload = w.conn.recv()
                        w.heard = time.monotonic()
                        if kind == "ready":
                            w.ready = True
                        elif kind == "frames":
                            progress.add_frames(payload)
                        elif kind == "result":
                            respawns[w.device] = 0
                            finish(w, payload)
                            if payload.device_broken:
                                w.broken = True
                                break
                        elif kind == "fatal":
                            w.start_failed = True
                            fatal.append(payload)
                            log.error("worker on %s could not start: %s", w.device, payload)
                except (EOFError, OSError):
                    pass
                if w.broken or w.start_failed:
                    w.proc.join(timeout=30)
                if not w.proc.is_alive():
                    if w.start_failed:
                        retire(w, "could not start", replace=False)
                    elif w.broken:
                        retire(w, "device error", replace=True)
                    else:
                        retire(w, f"worker process died (exit code {w.proc.exitcode}) while "
                                  "extracting this input", replace=True)
                    continue
                if w.task is not None and timeout and time.monotonic() - w.heard > timeout:
                    retire(w, f"no progress for {timeout:g} s (worker_timeout): the worker was "
                              "killed as hung", replace=True)
                    continue
                dispatch(w)
    finally:
        for w in workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for w in workers:
            w.proc.join(timeout=5)
            if w.proc.is_alive():
                w.proc.kill()
