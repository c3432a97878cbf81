"""Run an extraction over many inputs: worker processes on the devices, fed over their own pipes.

The parent validates, records what produces the outputs (utils/record.py: resolving, and if
needed downloading, every checkpoint once), skips inputs whose outputs are already done under
the same record, and hands the rest to workers: each worker holds at most as many inputs as it
asked for (one; or, for feature types on the pipeline, one more than its decoder processes, so
they all stay busy), and gets the next one when it reports a result, so the parent always knows
which inputs each worker holds. It waits on the pipes and on the processes' sentinels together,
so a worker that dies (out of memory, segfault, killed) is noticed at once, however busy the
others are; a worker that reports no progress for ``worker_timeout`` seconds is killed as hung;
a worker whose CUDA context is broken by a sticky error (illegal address, device assert) is
replaced instead of failing every later input. The inputs a dead or hung worker held get one
more try on a fresh worker, then fail with the reason. At the end every planned input has
exactly one result; anything unaccounted for is reported as failed, never silently dropped.

With one CPU worker (``device=cpu``, ``cpu_workers=1``) everything runs in the calling process
instead, without that protection; every GPU run uses worker processes.
:func:`process_one` is the per-input function of feature types that are not on the pipeline; a
cluster backend can call it as is.

Nothing is lost when outputs cannot be written either: a read-only or unwritable output folder
ends the run before any work; a write that fails because the folder is full or stopped being
writable (``OutputError``) fails its input and stops the run (the inputs already under way
finish, the others are reported as not started), and finished outputs stay. Where outputs are
saved, ``<output_path>/failures.jsonl`` lists the failed inputs (utils/output.py).
"""
from __future__ import annotations

import collections
import datetime
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

from video_features.utils.config import Config
from video_features.utils.errors import FeatureError, VideoError
from video_features.utils.claims import Claims, InputQueue, remove_stale_claims
from video_features.utils.output import HOST, OutputWriter

log = logging.getLogger(__name__)

#: replacements of a device's worker in a row without any input finished in between
MAX_RESPAWNS_PER_DEVICE = 3
#: tries of an input whose worker died or hung while holding it
MAX_ATTEMPTS = 2
#: finished inputs between moves into a consolidated output (save_hdf5 / save_webdataset /
#: save_parquet)
CONSOLIDATE_EVERY = 64


@dataclass
class Result:
    path: str
    status: str               # done | failed | skipped
    reason: str = ""
    frames: int = 0
    seconds: float = 0.0
    #: the worker's device is unusable after this input (sticky CUDA error): replace the worker
    device_broken: bool = False
    #: where it failed: plan, open, decode, extract, write, worker or not_started; "" where the
    #: producer did not say (:func:`failure_stage` infers it)
    stage: str = ""
    #: tries of this input in this run (0: never started)
    attempts: int = 1
    #: the output folder cannot be written any more (full, read-only): the run stops; says why
    stop: str = ""
    #: when the result was made (time.time())
    at: float = field(default_factory=time.time)
    #: what was decoded around (undecodable packets skipped), one line; "" for a clean input.
    #: Its outputs' record holds the same line as "damaged".
    damaged: str = ""
    #: GPU figures of the Ray actor that made it, over its chunk (on the chunk's last result)
    gpus: list = field(default_factory=list)


@dataclass
class Summary:
    results: list[Result] = field(default_factory=list)
    #: why the run stopped before starting every input ("": it did not)
    stopped: str = ""
    #: problems of the run as a whole, not of one input (e.g. a consolidation that failed)
    errors: list[str] = field(default_factory=list)
    #: the failure report of this run, or why it could not be written
    report: str = ""
    report_error: str = ""
    run_id: str = ""

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def damaged(self) -> list[Result]:
        """Inputs extracted from what decoded around damaged data (their outputs were written)."""
        return [r for r in self.results if r.damaged and r.status == "done"]

    @property
    def exit_code(self) -> int:
        return 0 if not self.failed and not self.errors else 1

    def text(self) -> str:
        """The counts and each failure; inputs not started after a stop are counted, not listed,
        when the failure report holds them (after a stop on a long list they are most of it).
        Inputs done from damaged data (packets skipped) are counted and listed too."""
        lines = [f"done {self.count('done')}, skipped {self.count('skipped')} (already extracted), "
                 f"failed {self.count('failed')}"]
        unstarted = [r for r in self.failed if _unstarted(r)]
        lines += [f"  FAILED {r.path}: {r.reason}" for r in self.failed
                  if not (self.report and _unstarted(r))]
        lines += [f"  ERROR {e}" for e in self.errors]
        if self.damaged:
            lines.append(f"damaged {len(self.damaged)} (decoded around undecodable data; their "
                         "outputs hold what decoded, their record says what was skipped)")
            lines += [f"  DAMAGED {r.path}: {r.damaged}" for r in self.damaged]
        if self.stopped:
            held = f" (listed in {self.report})" if self.report and unstarted else ""
            lines.append(f"stopped early: {self.stopped}; {len(unstarted)} input(s) not started"
                         f"{held}; finished outputs are kept, rerun once it can be written")
        if self.failed and self.report:
            lines.append(f"failures: {self.report} (a JSON line per failed input)")
        elif self.failed and self.report_error:
            lines.append(f"the failure report could not be written: {self.report_error}")
        return "\n".join(lines)


def _unstarted(res: Result) -> bool:
    """Not started because the run stopped: its output folder cannot be written."""
    return res.stage == "not_started" and res.reason.startswith("not started: ")


def failure_stage(res: Result) -> str:
    """Where ``res`` failed: its own ``stage``, else what its reason and frames say (results of
    the device pipeline carry no stage)."""
    if res.stage:
        return res.stage
    if res.reason.startswith(("not processed", "not started")):
        return "not_started"
    if res.reason.startswith("writing the outputs failed"):
        return "write"
    return "open" if res.frames == 0 else "extract"


def failure_entries(summary: Summary, feature_type: str) -> list[dict]:
    """The lines of the failure report for the failed inputs of ``summary``."""
    from video_features.utils.output import input_key

    return [{"path": input_key(r.path), "stage": failure_stage(r), "reason": r.reason,
             "attempts": r.attempts, "feature_type": feature_type,
             "time": datetime.datetime.fromtimestamp(r.at).astimezone().isoformat(timespec="seconds"),
             "run": summary.run_id} for r in summary.failed]


def devices_for(cfg: Config) -> list[str]:
    if cfg.device == "cpu":
        return ["cpu"] * int(cfg.cpu_workers)
    return [f"cuda:{i}" for i in cfg.device_ids]


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
                        force=True)


def build_extractor(cfg: Config, device: str) -> Any:
    from video_features.models.registry import get_extractor_class
    from video_features.utils.device import prepare_device

    return get_extractor_class(cfg.feature_type)(cfg, prepare_device(device, cfg.tf32))


def build_worker(cfgs: list[Config], records: list[dict], device: str) -> tuple[Any, Any]:
    """The extractor and output writer of one worker: of the one feature type, or the
    one-decode combination of several (utils/multi.py)."""
    if len(cfgs) == 1:
        return build_extractor(cfgs[0], device), OutputWriter.from_config(cfgs[0], records[0])
    from video_features.utils.multi import MultiExtractor, MultiWriter

    writers = {c.feature_type: OutputWriter.from_config(c, r) for c, r in zip(cfgs, records)}
    return MultiExtractor(cfgs, device, writers), MultiWriter(writers)


def as_configs(cfg: Config | list[Config]) -> list[Config]:
    return [cfg] if isinstance(cfg, Config) else list(cfg)


def process_one(extractor: Any, writer: OutputWriter, path: str) -> Result:
    """Extract and write one input; every failure becomes a one-line reason."""
    t0 = time.perf_counter()
    extractor.frames_read = 0
    stage = "extract"
    try:
        with extractor.autocast():
            feats = extractor.extract(path)
        stage = "write"
        seconds = time.perf_counter() - t0
        writer.write(path, feats, {"frames": extractor.frames_read, "seconds": round(seconds, 3),
                                   "device": str(extractor.device)})
        return Result(path, "done", frames=extractor.frames_read, seconds=seconds)
    except Exception as exc:
        res = process_failure(exc, path)
        res.frames, res.seconds = extractor.frames_read, time.perf_counter() - t0
        if stage == "extract":  # nothing read: it could not be opened; a bad stream: decode
            stage = "open" if not res.frames else "decode" if isinstance(exc, VideoError) else stage
        res.stage = stage
        return res


def _flag_stop(res: Result, writer: Any) -> Result:
    """Mark ``res`` as stopping the run once a write of ``writer`` (or of one of a multi-writer's
    writers) met a full or unwritable output folder."""
    for w in getattr(writer, "writers", {"": writer}).values():
        err = getattr(w, "unwritable", None)
        if err is not None:
            res.stop = res.stop or err.stop_reason
    return res


def _run_ray(cfgs: list[Config], records: list[dict], todo: InputQueue, summary: Summary,
             progress: "_Progress") -> None:
    """``backend=ray`` (utils/ray_backend.py): actors instead of local worker processes."""
    from video_features.utils.ray_backend import run_on_ray

    def done(res: Result) -> bool:
        summary.results.append(res)
        progress.update(res)
        if res.stop and not summary.stopped:  # chunks under way finish; no new one is sent
            summary.stopped = res.stop
            log.error("stopping: %s", res.stop)
        return not summary.stopped

    for path in run_on_ray(cfgs, records, todo, done):
        done(_not_started(path, summary.stopped))


def _not_started(path: str, reason: str) -> Result:
    return Result(path, "failed", reason=f"not started: {reason}; rerun to extract it",
                  stage="not_started", attempts=0)


def process_failure(exc: BaseException, path: str = "") -> Result:
    """An exception met while extracting ``path`` -> a failed Result with a one-line reason."""
    broken = False
    if isinstance(exc, FeatureError):
        reason = str(exc)
    elif isinstance(exc, MemoryError):
        reason = "out of memory"
    else:  # a bug or a library error: keep the run going, keep the trace
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if type(exc).__name__ == "OutOfMemoryError":
            reason = "out of GPU memory (lower batch_size)"
            _free_cuda()
        elif _sticky(exc):
            broken = True
            reason = f"device error, the worker is replaced: {type(exc).__name__}: {first}"
        else:
            reason = f"{type(exc).__name__}: {first}"
            log.debug("traceback for %s:\n%s", path, traceback.format_exc())
    return Result(path, "failed", reason=reason, device_broken=broken)


def _sticky(exc: BaseException) -> bool:
    from video_features.utils.device import is_sticky_device_error

    return is_sticky_device_error(exc)


def _free_cuda() -> None:
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass


def _threads_per_worker(n_cpu_workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, n_cpu_workers))


def videos_at_once(cfg: Config) -> int:
    """Videos a device decodes at a time: its decoder processes, or its NVDEC sessions."""
    if cfg.get("decoder", "cpu") == "nvdec":
        from video_features.utils.nvdec import MAX_SESSIONS

        return min(cfg.decoders, MAX_SESSIONS)
    return cfg.decoders


def _decode_threads(cfg: Config) -> int:
    """FFmpeg threads per decoder process, so that all decoders together fill the cores once."""
    return max(1, (os.cpu_count() or 1) // max(1, cfg.decoders * len(devices_for(cfg))))


def _worker_main(device: str, cfgs: list[Config], records: list[dict], conn: Any) -> None:
    """Entry point of a spawned worker: build once, then extract what the parent sends."""
    cfg = cfgs[0]  # the run's options (RUN_OPTIONS) are the same in every one
    configure_logging(cfg.log_level)
    import torch

    if device == "cpu":
        torch.set_num_threads(_threads_per_worker(len(devices_for(cfg))))
    try:
        extractor, writer = build_worker(cfgs, records, device)
    except Exception as exc:
        conn.send(("fatal", str(exc) if isinstance(exc, FeatureError) else f"{type(exc).__name__}: {exc}"))
        return
    # how many inputs it wants at a time: enough to keep every decoder busy
    capacity = videos_at_once(cfg) + 1 if extractor.frame_seam else 1
    conn.send(("ready", capacity))
    last = [0, time.monotonic()]  # frames not yet reported, time of the last report

    def report(n: int) -> None:  # throttled live progress; also the watchdog's heartbeat
        last[0] += n
        if time.monotonic() - last[1] >= 0.5:
            flush()

    def flush() -> None:
        if last[0]:
            conn.send(("frames", last[0]))
            last[:] = [0, time.monotonic()]

    extractor.progress_hook = report
    if extractor.frame_seam:
        _worker_pipeline(extractor, writer, cfg, conn, flush)
        return
    while True:
        try:
            path = conn.recv()
        except EOFError:  # the parent is gone
            return
        if path is None:
            return
        res = _flag_stop(process_one(extractor, writer, path), writer)
        flush()
        conn.send(("result", res))
        if res.device_broken:
            conn.close()
            os._exit(3)  # a broken CUDA context can hang an orderly exit


def _worker_pipeline(extractor: Any, writer: OutputWriter, cfg: Config, conn: Any,
                     flush: Any) -> None:
    """Worker loop of a frame-seam feature type: inputs from the parent go into the device
    pipeline as they arrive; results go back as each input finishes."""
    import torch

    from video_features.utils.pipeline import DevicePipeline

    def send(res: Result) -> None:
        _flag_stop(res, writer)
        flush()
        conn.send(("result", res))

    try:
        pipe = DevicePipeline(extractor, writer, cfg.decoders, send, _decode_threads(cfg))
    except FeatureError as exc:  # e.g. too little shared memory: nothing can run here
        conn.send(("fatal", str(exc)))
        return
    stopping = False
    try:
        with torch.inference_mode():
            while not (stopping and not pipe.busy):
                while not stopping and conn.poll():
                    try:
                        path = conn.recv()
                    except EOFError:
                        return
                    if path is None:
                        stopping = True
                    else:
                        pipe.submit(path)
                if pipe.busy:
                    try:
                        pipe.step()
                    except Exception as exc:  # a batch failed: every input in it is lost
                        res = process_failure(exc)
                        for path in pipe.abandon():
                            send(Result(path, "failed", reason=res.reason, stage="extract",
                                        device_broken=res.device_broken))
                        if res.device_broken:
                            conn.close()
                            os._exit(3)
                        pipe.close()
                        pipe = DevicePipeline(extractor, writer, cfg.decoders, send,
                                              _decode_threads(cfg))
                elif not stopping:
                    conn.poll(0.1)
    finally:
        pipe.close()


class _Progress:
    def __init__(self, total: int, enabled: bool, consolidating: list | None = None,
                 runlog: Any = None):
        #: utils/runlog.py: a metrics line every few seconds (None: not saving)
        self.runlog = runlog
        #: frames arrive live through add_frames; else (Ray actors) with each result
        self.frames_live = True
        self.frames = 0
        self.failed = 0
        self.done = 0
        #: writers of consolidated outputs: finished inputs move into them in batches
        self.consolidating = list(consolidating or [])
        #: consolidations that failed (their inputs stay staged for the next run)
        self.errors: list[str] = []
        self.t0 = self._shown = time.perf_counter()
        #: the run's claims (utils/claims.py): each is released once its input's result is in
        self.claims: Claims | None = None
        self.bar = None
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="video", dynamic_ncols=True, file=sys.stderr)

    def add_frames(self, n: int) -> None:
        """Frames read so far (live, during a video)."""
        self.frames += n
        if self.bar is not None and time.perf_counter() - self._shown >= 0.5:
            self._postfix()
        if self.runlog is not None:
            self.runlog.tick(self.frames, self.done, self.failed)

    def _postfix(self) -> None:
        self._shown = time.perf_counter()
        fps = self.frames / max(1e-9, self._shown - self.t0)
        self.bar.set_postfix_str(f"{fps:.1f} frames/s, {self.failed} failed")

    def update(self, res: Result) -> None:
        """One input finished (its frames were counted by add_frames)."""
        if self.claims is not None:   # a retried input has no result yet: it keeps its claim
            self.claims.release(res.path)
        self.failed += res.status == "failed"
        self.done += res.status == "done"
        if res.status == "done" and not self.frames_live:
            self.frames += res.frames or 0
        if self.runlog is not None:
            if res.gpus:
                self.runlog.note_remote(res.gpus)
            self.runlog.tick(self.frames, self.done, self.failed)
        if self.consolidating and res.status == "done" and self.done % CONSOLIDATE_EVERY == 0:
            _consolidate_all(self.consolidating, self.errors, final=False)
        if self.bar is not None:
            self._postfix()
            self.bar.update(1)
        if res.status == "failed" and not _unstarted(res):  # those: one line when the run stops
            msg = f"failed: {res.path}: {res.reason}"
            if self.bar is not None:
                self.bar.write(msg, file=sys.stderr)
            else:
                log.warning(msg)

    def close(self) -> None:
        if self.runlog is not None:
            self.runlog.tick(self.frames, self.done, self.failed, force=True)
        if self.bar is not None:
            self.bar.close()


def _progress_enabled(cfg: Config) -> bool:
    if cfg.progress == "auto":
        return sys.stderr.isatty()
    return bool(cfg.progress)


def plan(cfgs: Config | list[Config], records: dict | list[dict]) -> tuple[list[str], list[Result]]:
    """Split inputs into (to do, already settled). Settled: skipped (done under the same record,
    for every feature type), refused (``on_mismatch=refuse`` and made differently) or colliding
    with another input."""
    from video_features.models.registry import get_extractor_class

    cfgs = as_configs(cfgs)
    records = [records] if isinstance(records, dict) else list(records)
    cfg = cfgs[0]
    writers = [OutputWriter.from_config(c, r) for c, r in zip(cfgs, records)]
    keys = [get_extractor_class(c.feature_type).output_keys_for(c) for c in cfgs]
    named = len(cfgs) > 1  # reasons name their feature type
    todo: list[str] = []
    settled: list[Result] = []
    owners: dict[Any, str] = {}
    for path in cfg.video_paths:
        if writers[0].saves:
            first = next(iter(writers[0].paths_for(path, keys[0]).values()))
            other = owners.setdefault(first, path)
            if other != path:
                settled.append(Result(path, "failed", reason=f"its output files would overwrite those of {other}",
                                      stage="plan", attempts=0))
                continue
            if not cfg.overwrite:
                states = [(c.feature_type, w.state(path, k)) for c, w, k in zip(cfgs, writers, keys)]
                if all(st.status == "done" for _, st in states):
                    settled.append(Result(path, "skipped"))
                    continue
                reasons = [(f"{t}: " if named else "") + "; ".join(st.reasons)
                           for t, st in states if st.status == "mismatch"]
                if reasons:
                    why = "; ".join(reasons)
                    if cfg.on_mismatch == "refuse":
                        settled.append(Result(path, "failed", reason=(
                            f"existing outputs were made differently ({why}); on_mismatch=recompute "
                            "or overwrite=true replaces them, or use another output_path"),
                            stage="plan", attempts=0))
                        continue
                    log.info("recomputing %s: its outputs were made differently (%s)", path, why)
        todo.append(path)
    return todo, settled


def _done_now(cfgs: list[Config], writers: list[OutputWriter]) -> Callable[[str], bool]:
    """Whether an input is done now for every feature type, as :func:`plan` judges "skipped",
    seeing what other runs wrote since (for an input just claimed)."""
    from video_features.models.registry import get_extractor_class

    saving = [(w, get_extractor_class(c.feature_type).output_keys_for(c))
              for c, w in zip(cfgs, writers) if w.saves]

    def done(path: str) -> bool:
        for w, _ in saving:
            w.refresh()
        return bool(saving) and all(w.state(path, k).status == "done" for w, k in saving)

    return done


def _remove_stale_claims(writers: list[OutputWriter], settled: list[Result], timeout: float) -> None:
    """Claims left beside inputs found done by runs that are gone (killed between writing an
    input and releasing its claim) are removed; a live holder's are left to it."""
    skipped = [r.path for r in settled if r.status == "skipped"]
    if skipped:
        remove_stale_claims(writers, skipped, timeout)


def run(cfg: Config | list[Config]) -> Summary:
    """Extract features for every input of ``cfg`` (or of several feature types' configs, one
    decode for all); never raises for a bad input."""
    from video_features.utils.output import check_writable
    from video_features.utils.record import run_record

    cfgs = as_configs(cfg)
    cfg = cfgs[0]
    run_id = f"{datetime.datetime.now():%Y%m%dT%H%M%S.%f}"[:-3] + f"-{HOST}-{os.getpid()}"
    # WeightsError here (missing weights) ends the run before any work
    records = [run_record(c) for c in cfgs]
    writers = [OutputWriter.from_config(c, r) for c, r in zip(cfgs, records)]
    # before planning: inputs a killed run left staged move in, damaged parts are repaired
    early: list[str] = []
    _consolidate_all(writers, early)
    todo, settled = plan(cfgs, records)
    summary = Summary(list(settled), run_id=run_id)
    summary.errors += early
    _remove_stale_claims(writers, settled, cfg.get("claim_timeout", 600))
    for r in summary.results:
        if r.status == "failed":
            log.warning("failed: %s: %s", r.path, r.reason)
    if summary.count("skipped"):
        log.info("skipping %d input(s) already extracted (overwrite=true recomputes them)",
                 summary.count("skipped"))
    if not todo:
        _consolidate_all(writers, summary.errors)
        _report(cfgs, summary)
        return summary
    # a read-only or unwritable output folder ends the run here (exit 2), not input by input
    for folder in dict.fromkeys(f for w in writers if w.saves
                                for f in (Path(w.output_path or "."), w.root)):
        check_writable(folder)
    devices = devices_for(cfg)
    consolidating = [w for w in writers if w.consolidated]
    from video_features.utils.runlog import RunLog

    ray = cfg.get("backend", "local") == "ray"   # then the actors measure their own GPUs
    runlog = RunLog(cfg.output_path, run_id, [c.feature_type for c in cfgs], devices,
                    sample_gpus=not ray) if writers[0].saves else None
    progress = _Progress(len(todo), _progress_enabled(cfg), consolidating, runlog)
    progress.frames_live = not ray
    # several runs on one list and output folder: each input is started by one of them
    claims = Claims(writers, cfg.get("claim_timeout", 600)) if writers[0].saves else None
    progress.claims = claims
    finished_elsewhere = None if cfg.overwrite or claims is None else _done_now(cfgs, writers)

    def skipped(path: str) -> None:   # another run finished it after the plan
        summary.results.append(res := Result(path, "skipped"))
        progress.update(res)

    def queue_of(paths: list[str]) -> InputQueue:
        return InputQueue(paths, claims, finished_elsewhere, skipped)

    def dispatch(queue: InputQueue) -> None:
        try:
            if cfg.get("backend", "local") == "ray":
                _run_ray(cfgs, records, queue, summary, progress)
            elif devices == ["cpu"]:  # one CPU worker: no process to spawn
                _run_inline(cfgs, records, devices[0], queue, summary, progress)
            else:
                _run_pool(cfgs, records, devices[: len(todo)], queue, summary, progress)
        finally:
            if claims is not None:
                claims.release_all()

    try:
        queue = queue_of(todo)
        dispatch(queue)
        # inputs other runs were extracting: done by them (skipped), or taken over once their
        # holder is gone
        while queue.elsewhere and not summary.stopped:
            time.sleep(min(5.0, claims.timeout / 10))
            again, settled = plan([c.replace(video_paths=queue.elsewhere) for c in cfgs], records)
            # their holder may have died after finishing them
            _remove_stale_claims(writers, settled, cfg.get("claim_timeout", 600))
            for res in settled:
                summary.results.append(res)
                progress.update(res)
            queue = queue_of(again)
            if queue:
                dispatch(queue)
        for path in queue.elsewhere:   # a stop left them: they are not this run's to finish
            summary.results.append(res := _not_started(path, summary.stopped))
            progress.update(res)
    finally:
        if claims is not None:
            claims.close()
        progress.close()
        _consolidate_all(consolidating, progress.errors)
    summary.errors += progress.errors
    _reconcile(cfg.video_paths, summary, progress)
    _report(cfgs, summary)
    if runlog is not None:
        runlog.finish({k: summary.count(k) for k in ("done", "skipped", "failed")})
    return summary


def _report(cfgs: list[Config], summary: Summary) -> None:
    """Bring ``<output_path>/failures.jsonl`` up to date (only where outputs are saved: a printing
    run has no output folder, its summary is the report). A report that cannot be written (the
    folder is full or read-only) is said in the summary, never raised."""
    from video_features.utils.output import update_failure_report

    cfg = cfgs[0]
    if not OutputWriter.from_config(cfg).saves:
        return
    feature_type = "+".join(c.feature_type for c in cfgs)
    try:
        path = update_failure_report(cfg.output_path, feature_type, cfg.video_paths,
                                     failure_entries(summary, feature_type))
    except (OSError, FeatureError) as exc:
        summary.report_error = str(exc)
        log.error("the failure report could not be written: %s", exc)
        return
    summary.report = str(path) if path is not None and summary.failed else ""


def _consolidate_all(writers: Any, errors: list[str], final: bool = True) -> None:
    """Move every staged input into its consolidated file (also those an earlier, killed run
    left staged). A file that cannot be written (e.g. a full disk) is added to ``errors``: its
    inputs stay staged, and the next run moves them; anything else is a bug and propagates."""
    from video_features.utils.consolidate import consolidate

    for writer in writers:
        if writer.consolidated:
            try:
                consolidate(writer, final=final)
            except (OSError, FeatureError) as exc:
                why = exc if isinstance(exc, FeatureError) else f"{type(exc).__name__}: {exc}"
                msg = (f"{writer.feature_type}: moving staged inputs into the {writer.mode} output "
                       f"failed ({why}); they stay in {writer.root} and the next run moves them")
                log.error("%s", msg)
                errors.append(msg)


def _reconcile(planned: list[str], summary: Summary, progress: _Progress) -> None:
    """Every planned input has a result: one that has none is reported, not dropped."""
    reported = {r.path for r in summary.results}
    for path in planned:
        if path not in reported:
            res = Result(path, "failed", reason="no result was reported for this input (lost)",
                         stage="worker")
            summary.results.append(res)
            progress.update(res)


def _run_inline(cfgs: list[Config], records: list[dict], device: str, todo: InputQueue,
                summary: Summary, progress: _Progress) -> None:
    cfg = cfgs[0]
    extractor, writer = build_worker(cfgs, records, device)  # errors here (weights, device) end the run
    extractor.progress_hook = progress.add_frames
    if extractor.frame_seam:
        _run_inline_pipeline(cfg, extractor, writer, todo, summary, progress)
        return
    while todo:
        path = todo.popleft()
        res = _flag_stop(process_one(extractor, writer, path), writer)
        summary.results.append(res)
        progress.update(res)
        if res.stop:  # the output folder is full or unwritable: every later write would fail
            summary.stopped = res.stop
            log.error("stopping: %s", res.stop)
            for rest in todo.drain():
                summary.results.append(res := _not_started(rest, summary.stopped))
                progress.update(res)
            return
        if res.device_broken:  # this process's CUDA context is gone: nothing more can run here
            for rest in todo.drain():
                res = Result(rest, "failed", reason="not processed: the device failed on an "
                                                    "earlier input; rerun to extract it",
                             stage="not_started", attempts=0)
                summary.results.append(res)
                progress.update(res)
            return


def _run_inline_pipeline(cfg: Config, extractor: Any, writer: OutputWriter, todo: InputQueue,
                         summary: Summary, progress: _Progress) -> None:
    import torch

    from video_features.utils.pipeline import DevicePipeline

    def done(res: Result) -> None:
        summary.results.append(_flag_stop(res, writer))
        progress.update(res)
        if res.stop and not summary.stopped:  # the inputs in the pipeline finish; no new one starts
            summary.stopped = res.stop
            log.error("stopping: %s", res.stop)
            for path in todo.drain():
                done(_not_started(path, summary.stopped))

    pipe = DevicePipeline(extractor, writer, cfg.decoders, done, _decode_threads(cfg))
    try:
        with torch.inference_mode():
            pipe.run(todo, videos_at_once(cfg) + 1)   # ``done`` empties the queue on a stop
    finally:
        pipe.close()


@dataclass
class _Worker:
    proc: Any
    conn: Any
    device: str
    tasks: list = field(default_factory=list)   # inputs sent to it, results not back yet
    capacity: int = 1         # inputs it takes at a time (its decoders + 1 on the pipeline)
    heard: float = 0.0        # monotonic time of the last message
    ready: bool = False
    start_failed: bool = False
    broken: bool = False      # reported a sticky device error and exits


def _run_pool(cfgs: list[Config], records: list[dict], devices: list[str], pending: InputQueue,
              summary: Summary, progress: _Progress) -> None:
    import torch.multiprocessing as mp

    cfg = cfgs[0]
    ctx = mp.get_context("spawn")
    workers: list[_Worker] = []
    respawns: dict[str, int] = collections.Counter()
    attempts: dict[str, int] = collections.Counter()
    fatal: list[str] = []
    timeout = float(cfg.worker_timeout or 0)

    def start(device: str) -> None:
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(target=_worker_main, args=(device, cfgs, records, child_end),
                        name=f"worker-{device}")  # not daemonic: it starts decoders
        p.start()
        child_end.close()
        workers.append(_Worker(p, parent_end, device, heard=time.monotonic()))

    def finish(w: _Worker, res: Result) -> None:
        if res.path in w.tasks:
            w.tasks.remove(res.path)
        res.attempts = attempts[res.path] + 1
        summary.results.append(res)
        progress.update(res)
        if res.stop and not summary.stopped:  # inputs in workers finish; no new one starts
            summary.stopped = res.stop
            log.error("stopping: %s", res.stop)
            for path in pending.drain():
                summary.results.append(rest := _not_started(path, res.stop))
                progress.update(rest)

    def dispatch(w: _Worker) -> None:
        while pending and w.ready and len(w.tasks) < w.capacity and w.proc.is_alive():
            if not w.tasks:
                w.heard = time.monotonic()
            w.tasks.append(pending.popleft())
            try:
                w.conn.send(w.tasks[-1])
            except (BrokenPipeError, OSError):
                return  # it died; its sentinel says so next round, with the tasks still held

    def retire(w: _Worker, why: str, replace: bool) -> None:
        """Stop ``w``; its inputs get one more try on another worker (``replace``: it died or
        hung, which may not be their fault), then fail with ``why``."""
        workers.remove(w)
        w.conn.close()
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=10)
        for path in reversed(w.tasks):
            attempts[path] += 1
            if replace and attempts[path] < MAX_ATTEMPTS and not summary.stopped:
                log.warning("retrying %s on a fresh worker: %s", path, why)
                pending.appendleft(path)
            else:
                summary.results.append(res := Result(path, "failed", reason=why, stage="worker",
                                                     attempts=attempts[path]))
                progress.update(res)
        w.tasks.clear()
        respawns[w.device] += 1
        if replace and pending and respawns[w.device] <= MAX_RESPAWNS_PER_DEVICE * devices.count(w.device):
            log.warning("worker on %s: %s; starting a new one", w.device, why)
            start(w.device)

    for d in devices:
        start(d)
    try:
        while pending or any(w.tasks for w in workers):
            if not workers:
                reason = fatal[0] if fatal else "no worker left (they kept dying)"
                if fatal and summary.count("done") == 0:
                    raise FeatureError(reason)
                for path in pending.drain():
                    res = Result(path, "failed", reason=f"not processed: {reason}",
                                 stage="not_started", attempts=attempts[path])
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
                            w.ready, w.capacity = True, int(payload)
                        elif kind == "frames":
                            progress.add_frames(payload)
                        elif kind == "result":
                            respawns[w.device] = 0
                            finish(w, payload)
                            w.broken = w.broken or payload.device_broken
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
                        retire(w, f"could not start: {fatal[-1]}", replace=False)
                    elif w.broken:
                        retire(w, "device error", replace=True)
                    else:
                        retire(w, f"worker process died (exit code {w.proc.exitcode}) while "
                                  "this input was in it", replace=True)
                    continue
                if w.tasks and timeout and time.monotonic() - w.heard > timeout:
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
