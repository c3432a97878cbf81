"""``<output_path>/metrics.jsonl``: what a run did over time, for ``video-features report``.

A line every ``INTERVAL`` seconds at most (written from the progress updates the runner makes
anyway, never per frame): elapsed seconds, frames and inputs so far, and on GPUs each device's
busy share and memory in use (NVML, when ``pynvml`` is importable); a last line holds the run's
summary counts. Lines of several runs (and shards) append to one file, each with its run id.
A log that cannot be written is given up silently: it must never cost an input.

Under Ray the GPUs are the actors', on other nodes: each actor measures its own
(:class:`GpuMeter`) and sends the figures of each chunk with its results; the log shows the
latest of every actor's GPU.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INTERVAL = 5.0
FILE = "metrics.jsonl"
#: seconds between an actor's GPU samples (averaged over each of its chunks)
SAMPLE_EVERY = 1.0


class RunLog:
    def __init__(self, output_path: str | None, run_id: str, feature_types: list[str],
                 devices: list[str], interval: float = INTERVAL, sample_gpus: bool = True):
        """``sample_gpus``: measure this process's GPUs (``devices``); under Ray the actors
        measure theirs and their figures come through :meth:`note_remote`."""
        self.path = Path(output_path or ".") / FILE
        self.run_id, self.feature_types, self.devices = run_id, feature_types, devices
        self.interval = interval
        self.t0 = time.time()
        self._last = 0.0
        self._gpus = self._nvml([d for d in devices if d.startswith("cuda")]) if sample_gpus \
            else []
        self._remote: dict = {}   # (host, index) -> the latest figures of an actor's GPU
        self.ok = True

    def note_remote(self, gpus: list[dict]) -> None:
        """GPU figures another process measured (a Ray actor's, with its host)."""
        for g in gpus:
            self._remote[(g.get("host"), g.get("index"))] = g

    @staticmethod
    def _nvml(cuda: list[str]) -> list[tuple[int, Any]]:
        """NVML handles of the run's GPUs, found by UUID: NVML numbers every GPU of the machine,
        torch only the visible ones (CUDA_VISIBLE_DEVICES under Slurm or Ray), so an index
        could name another job's GPU. A GPU that cannot be matched gets no figures."""
        if not cuda:
            return []
        try:
            import pynvml
            import torch

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no NVML: the report shows no GPU figures
            return []
        out = []
        for i in dict.fromkeys(int(d.split(":")[1]) if ":" in d else 0 for d in cuda):
            try:
                uuid = str(torch.cuda.get_device_properties(i).uuid)
                out.append((i, _handle_by_uuid(pynvml, uuid)))
            except Exception:  # noqa: BLE001
                continue
        return out

    def _gpu_sample(self) -> list[dict]:
        return gpu_sample(self._gpus)

    def tick(self, frames: int, done: int, failed: int, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self._write({"elapsed_s": round(now - self.t0, 3), "frames": int(frames), "done": int(done),
                     "failed": int(failed),
                     "gpus": self._gpu_sample() + list(self._remote.values())})

    def finish(self, counts: dict[str, int]) -> None:
        self._write({"elapsed_s": round(time.time() - self.t0, 3), "summary": counts})

    def _write(self, entry: dict) -> None:
        if not self.ok:
            return
        line = {"run": self.run_id, "time": time.time(), "feature_types": self.feature_types,
                "devices": self.devices, **entry}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as exc:
            self.ok = False
            log.warning("metrics log %s cannot be written (%s); the run goes on without it",
                        self.path, exc)


def gpu_sample(handles: list[tuple[int, Any]]) -> list[dict]:
    """Busy share and memory in use of each (index, NVML handle) now; [] without NVML."""
    out = []
    try:
        import pynvml

        for i, h in handles:
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append({"index": i, "busy": util.gpu / 100.0, "memory_bytes": int(mem.used)})
    except Exception:  # noqa: BLE001
        return []
    return out


class GpuMeter:
    """A Ray actor's GPU over each chunk: the busy share sampled every :data:`SAMPLE_EVERY`
    seconds on a thread of its own and averaged, and the most memory in use. (Sampled when the
    chunk ends, the GPU would look idle: its pipeline has just drained.)"""

    def __init__(self, device: str):
        from video_features.utils.output import HOST

        self.host = HOST
        self._handles = RunLog._nvml([device]) if device.startswith("cuda") else []
        self._lock = threading.Lock()
        self._busy: dict[int, list[float]] = {}
        self._memory: dict[int, int] = {}
        self._stop = threading.Event()
        if self._handles:
            threading.Thread(target=self._sample_until_closed, name="gpu-meter",
                             daemon=True).start()

    def _sample_until_closed(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.sample()

    def close(self) -> None:
        self._stop.set()

    def sample(self) -> None:
        for g in gpu_sample(self._handles):
            with self._lock:
                self._busy.setdefault(g["index"], []).append(g["busy"])
                self._memory[g["index"]] = max(self._memory.get(g["index"], 0),
                                               g["memory_bytes"])

    def harvest(self) -> list[dict]:
        """The figures since the previous harvest (one per GPU), and a fresh start."""
        with self._lock:
            busy, memory, self._busy, self._memory = self._busy, self._memory, {}, {}
        return [{"host": self.host, "index": i, "busy": sum(v) / len(v),
                 "memory_bytes": memory[i]} for i, v in busy.items() if v]


def _handle_by_uuid(pynvml: Any, uuid: str) -> Any:
    """NVML's handle of the GPU torch reports as ``uuid`` (torch prints it bare, NVML names it
    GPU-<uuid>, or MIG-<uuid> for a MIG instance)."""
    names = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
    err: Exception | None = None
    for name in names:
        for arg in (name, name.encode()):  # older pynvml releases take bytes only
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(arg)
            except Exception as exc:  # noqa: BLE001
                err = exc
    raise LookupError(f"no NVML device with UUID {uuid}") from err


def read_runlog(output_path: str | Path) -> list[dict]:
    path = Path(output_path) / FILE
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        return []
    return out
