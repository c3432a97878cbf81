"""``backend=ray``: the run's inputs on Ray actors, one per GPU of the cluster (or per CPU worker).

Each actor builds what a local worker builds (the extractor with its models, the output writer,
the device pipeline with its decoder processes and shared memory) once, on its own GPU (cuda:0
inside the actor) and with ``decoders=auto`` taken from its own node's CPUs, then takes chunks
of inputs through that one pipeline until the run closes it. The driver
keeps every actor fed with two chunks (one running, one queued behind it, so its decoders never
wait for the driver) and collects results as chunks finish (``ray.wait``), so faster actors take
more of the list. Outputs are written by the actors straight into ``output_path``, which must
be storage every node sees (a shared file system); done detection, records, claims of the
consolidated outputs and the summary are the local backend's.

A chunk whose actor dies (out of memory, a crashed node) is given once more to a restarted
actor; a second loss fails its inputs with the reason.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from video_features.utils.config import Config
from video_features.utils.errors import ConfigError, require
from video_features.utils.runlog import GpuMeter

log = logging.getLogger(__name__)

#: chunks each actor holds at a time: one running, one queued behind it
QUEUED_PER_ACTOR = 2


def import_ray() -> Any:
    return require("ray", "backend=ray", pip="'ray>=2.9'", extra="ray")


def _checkout_root() -> str | None:
    """The repository root when running from a checkout (actors must import the same code)."""
    import video_features

    root = Path(video_features.__file__).resolve().parent.parent
    return str(root) if (root / "utils" / "config.py").is_file() else None


def connect(cfg: Config) -> Any:
    """``ray.init`` as ``ray_address`` says (null: RAY_ADDRESS if set, else a local Ray on this
    machine), unless this process is already connected."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    env = {k: os.environ[k] for k in ("TORCH_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE",
                                      "VIDEO_FEATURES_OFFLINE", "VIDEO_FEATURES_PLUGINS")
           if k in os.environ}
    root = _checkout_root()
    if root:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "include_dashboard": False,
                              "logging_level": logging.WARNING}
    if cfg.get("ray_address"):
        kwargs["address"] = cfg.ray_address
    try:
        ray.init(**kwargs)
    except Exception as exc:  # e.g. no cluster at the address
        raise ConfigError(f"backend=ray: cannot connect to Ray"
                          f"{' at ' + cfg.ray_address if cfg.get('ray_address') else ''}: "
                          f"{str(exc).splitlines()[0][:300]}") from None
    return ray


def actor_device(cfg: Config) -> str:
    """The device an actor is built on. Ray narrows a GPU actor to the GPU it was given
    (CUDA_VISIBLE_DEVICES): inside the actor that GPU is always cuda:0."""
    return "cuda:0" if cfg.device == "cuda" else "cpu"


def _node_resources() -> dict:
    """The resources Ray counts on this process's node ({} outside Ray, or when unknown)."""
    try:
        import ray

        node = ray.get_runtime_context().get_node_id()
        for n in ray.nodes():
            if n.get("NodeID") == node:
                return dict(n.get("Resources") or {})
    except Exception:  # noqa: BLE001 - the node's CPU count is the fallback
        pass
    return {}


def actor_share(cfg: Config, gpu: bool, resources: dict) -> tuple[int, int]:
    """``(decoders, FFmpeg threads per decoder)`` of one actor, by the local backend's rule on
    the actor's own node: its CPUs (as Ray counts them) shared between its devices (the node's
    GPUs, or the run's CPU actors), so ``decoders=auto`` never takes the driver's core count."""
    cpus = int(resources.get("CPU") or os.cpu_count() or 1)
    if gpu:
        devices = int(resources.get("GPU") or 1)
    else:
        devices = int(cfg.get("ray_actors") or cfg.cpu_workers)
    share = max(1, cpus // max(1, devices))
    decoders = share if cfg.get("decoders") in ("auto", None) else int(cfg.decoders)
    return decoders, max(1, share // decoders)


class ExtractActor:
    """One worker of the run on a Ray node: the models and the device pipeline (decoder
    processes, shared-memory slots) stay up between chunks; ``close`` ends them."""

    def __init__(self, cfgs: list[Config], records: list[dict], device: str):
        from video_features.utils.runner import build_worker, configure_logging, _threads_per_worker

        cfg = cfgs[0]
        configure_logging(cfg.log_level)
        import torch

        if device == "cpu":
            torch.set_num_threads(_threads_per_worker(int(cfg.get("ray_actors") or cfg.cpu_workers)))
        self.decoders, self.decode_threads = actor_share(cfg, device != "cpu", _node_resources())
        self.cfg = cfg.replace(decoders=self.decoders)
        self.extractor, self.writer = build_worker(cfgs, records, device)
        self.pipelines_built = 0
        self._results: list = []
        self.pipe = self._new_pipeline() if self.extractor.frame_seam else None
        self.gpu_meter = GpuMeter(device)

    def _new_pipeline(self) -> Any:
        from video_features.utils.pipeline import DevicePipeline

        self.pipelines_built += 1
        return DevicePipeline(self.extractor, self.writer, self.decoders, self._collect,
                              self.decode_threads)

    def _collect(self, res: Any) -> None:
        from video_features.utils.runner import _flag_stop

        self._results.append(_flag_stop(res, self.writer))

    def ready(self) -> dict:
        """What the driver sizes chunks by, and what the actor has built."""
        from video_features.utils.runner import videos_at_once

        return {"decoders": self.decoders, "capacity": videos_at_once(self.cfg) + 1,
                "pipelines_built": self.pipelines_built}

    def process(self, paths: list[str]) -> list:
        """Results of ``paths``, through the device pipeline (or one at a time for feature types
        that are not on it); the last one carries the actor's GPU figures over the chunk."""
        results = self._process(paths)
        if results:
            results[-1].gpus = self.gpu_meter.harvest()
        return results

    def _process(self, paths: list[str]) -> list:
        import collections

        import torch

        from video_features.utils.runner import _flag_stop, process_one, videos_at_once

        if not self.extractor.frame_seam:
            results = []
            for p in paths:
                results.append(_flag_stop(process_one(self.extractor, self.writer, p),
                                          self.writer))
                if results[-1].device_broken:
                    break   # nothing more can run in this process: the driver restarts it
            return results
        if self.pipe is None:
            self.pipe = self._new_pipeline()
        self._results = results = []
        try:
            with torch.inference_mode():
                self.pipe.run(collections.deque(paths), videos_at_once(self.cfg) + 1)
        except BaseException:
            self.close()
            raise
        if self.pipe.busy:  # a failed batch left its inputs in the pipeline: start clean
            self.close()
        if any(r.device_broken for r in results):   # those never started go to the driver again
            results = [r for r in results if r.stage != "not_started"]
        return results

    def close(self) -> bool:
        """End the decoder processes and free the shared memory (the next chunk rebuilds)."""
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            pipe.close()
        return True


def actor_count(ray: Any, cfg: Config) -> int:
    if cfg.get("ray_actors"):
        return int(cfg.ray_actors)
    if cfg.device == "cuda":
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus < 1:
            raise ConfigError("backend=ray with device=cuda: the Ray cluster has no GPU")
        return gpus
    return int(cfg.cpu_workers)


def run_on_ray(cfgs: list[Config], records: list[dict], todo: Any,
               on_result: Callable[[Any], bool]) -> list[str]:
    """Every input of ``todo`` (a queue: ``popleft``, ``drain``, truthiness; the runner's claims
    decide what it hands out) through actors; ``on_result(result)`` gets each result and returns
    False once the run must stop: then no new chunk is sent, those under way finish, and the
    inputs never sent are returned."""
    from video_features.utils.runner import Result

    cfg = cfgs[0]
    ray = connect(cfg)
    n = min(actor_count(ray, cfg), max(1, len(todo)))   # len: at most, claims may take fewer
    gpu = cfg.device == "cuda"
    device = actor_device(cfg)
    remote = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1, max_restarts=1,
                        max_task_retries=0)(ExtractActor)
    actors = [remote.remote(cfgs, records, device) for _ in range(n)]
    try:
        infos = ray.get([a.ready.remote() for a in actors])
    except Exception as exc:
        for actor in actors:
            ray.kill(actor)
        raise ConfigError(f"backend=ray: a worker could not be built: {_last_line(exc)}") from None
    # a chunk keeps an actor's decoders busy twice over; a short list is spread over all actors
    capacity = min(int(i["capacity"]) for i in infos)
    size = max(1, min(2 * capacity, -(-len(todo) // n)))
    retry: list[list[str]] = []           # chunks of a lost actor, sent once more
    tries: dict[int, int] = {}
    running: dict[Any, tuple[int, list[str]]] = {}   # ref -> (actor index, chunk)
    feeding = True
    log.info("backend=ray: %d actor(s) on %s, up to %d input(s) in chunks of %d", n, device,
             len(todo), size)

    def send(a: int) -> None:
        chunk = retry.pop() if retry else [todo.popleft() for _ in range(size) if todo]
        if chunk:
            running[actors[a].process.remote(chunk)] = (a, chunk)

    try:
        for _ in range(QUEUED_PER_ACTOR):
            for a in range(n):
                send(a)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            a, chunk = running.pop(ref)
            try:
                results = ray.get(ref)
            except Exception as exc:  # the actor died with the chunk
                why = _last_line(exc)
                key = id(chunk)
                tries[key] = tries.get(key, 0) + 1
                if tries[key] == 1 and feeding:
                    log.warning("backend=ray: a worker was lost with %d input(s); they are tried "
                                "once more (%s)", len(chunk), why)
                    retry.append(chunk)
                else:
                    results = [Result(p, "failed", reason=f"the Ray worker was lost: {why}",
                                      stage="worker", attempts=tries[key] + 1) for p in chunk]
                    for res in results:
                        feeding = on_result(res) and feeding
            else:
                for res in results:
                    feeding = on_result(res) and feeding
                if any(res.device_broken for res in results):
                    # its CUDA context is gone for good: Ray restarts it in a fresh process
                    # (max_restarts); the inputs of the chunk it did not start are sent again,
                    # chunks queued on it come back as lost and are retried
                    log.warning("backend=ray: a worker's device failed; it is restarted")
                    ray.kill(actors[a], no_restart=False)
                    answered = {res.path for res in results}
                    unrun = [p for p in chunk if p not in answered]
                    if unrun:
                        retry.append(unrun)
            if feeding:
                send(a)
    finally:
        _shut_down(ray, actors)
    return [p for chunk in retry for p in chunk] + todo.drain()


def _shut_down(ray: Any, actors: list) -> None:
    """Close each actor's pipeline (its decoders and shared memory), then end the actors; a
    kill alone would leave that to the decoders' orphan checks and the resource tracker."""
    try:  # ray.wait: a lost actor's failed close does not cut the others' short
        refs = [a.close.remote() for a in actors]
        ray.wait(refs, num_returns=len(refs), timeout=60)
    except Exception as exc:  # noqa: BLE001 - nothing left to close
        log.debug("backend=ray: closing the workers: %s", _last_line(exc))
    for actor in actors:
        ray.kill(actor)


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1][:300] if text else type(exc).__name__
