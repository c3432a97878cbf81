"""Which GPU a worker uses and reports, without a GPU: Ray actors on cuda:0 of what Ray lets
them see, decoders sized by the actor's node, and NVML figures of the GPU torch really uses."""
from __future__ import annotations

import collections
import sys
import types

import torch

from video_features.utils.config import Config


class _Queue(collections.deque):
    def drain(self) -> list:
        out = list(self)
        self.clear()
        return out


class _Ref:
    def __init__(self, fn, *args):
        try:
            self.value, self.error = fn(*args), None
        except Exception as exc:  # noqa: BLE001
            self.value, self.error = None, exc


class _FakeRay:
    """Just what run_on_ray calls, with each actor an object in this process."""

    def __init__(self, gpus: int):
        self.gpus, self.options, self.killed, self.restarted = gpus, None, 0, 0

    def is_initialized(self):
        return True

    def cluster_resources(self):
        return {"CPU": 8.0, "GPU": float(self.gpus)}

    def remote(self, **options):
        self.options = options

        def wrap(cls):
            class Handle:
                def __init__(self, *args):
                    self.args = args
                    self.obj = cls(*args)

                def __getattr__(self, name):
                    method = getattr(self.obj, name)
                    return types.SimpleNamespace(remote=lambda *a: _Ref(method, *a))

            return types.SimpleNamespace(remote=lambda *a: Handle(*a))

        return wrap

    def get(self, refs, timeout=None):
        if isinstance(refs, list):
            return [self.get(r) for r in refs]
        if refs.error is not None:
            raise refs.error
        return refs.value

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def kill(self, actor, no_restart=True):
        if no_restart:
            self.killed += 1
        else:   # Ray starts the actor again in a new process
            self.restarted += 1
            actor.obj = type(actor.obj)(*actor.args)


class _Extractor:
    """What a fake actor's worker extracts with: ``extract(path)`` decides each input."""

    frame_seam, frames_read = False, 0

    def __init__(self, extract, device=torch.device("cpu")):
        self._extract, self.device = extract, device

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def extract(self, path):
        return self._extract(path)


class _Writer:
    def write(self, path, feats, info):
        pass


def _run_on_fake_ray(monkeypatch, build_worker, paths: list[str], gpus: int = 1):
    """run_on_ray with device=cuda on a fake Ray of ``gpus`` GPUs whose actors build their
    worker with ``build_worker``; (the fake Ray, the inputs left, the results in order)."""
    from video_features.utils import ray_backend, runner

    fake = _FakeRay(gpus=gpus)
    monkeypatch.setattr(ray_backend, "import_ray", lambda: fake)
    monkeypatch.setattr(runner, "build_worker", build_worker)
    monkeypatch.setattr(runner, "configure_logging", lambda level: None)
    monkeypatch.setattr(ray_backend, "_node_resources",
                        lambda: {"CPU": 8.0, "GPU": float(gpus)}, raising=False)
    cfg = Config({"device": "cuda", "tf32": False, "log_level": "info", "cpu_workers": 1,
                  "decoders": 3, "ray_actors": None, "ray_address": None})
    results = []
    left = ray_backend.run_on_ray([cfg], [{}], _Queue(paths), lambda r: results.append(r) or True)
    return fake, left, results


def test_ray_gpu_actors_select_an_indexed_device(monkeypatch):
    """Ray narrows each GPU actor to its GPU: the actor must ask for cuda:0 (a bare "cuda"
    made set_device raise before any work)."""
    from torch.cuda._utils import _get_device_index

    from video_features.utils.device import prepare_device

    selected, built = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda d: selected.append(_get_device_index(d, optional=False)))

    def build_worker(cfgs, records, device):
        built.append(device)
        return _Extractor(lambda path: {}, prepare_device(device, cfgs[0].tf32)), _Writer()

    fake, left, results = _run_on_fake_ray(monkeypatch, build_worker,
                                           ["a.mp4", "b.mp4", "c.mp4"], gpus=2)
    assert left == [] and sorted(r.path for r in results) == ["a.mp4", "b.mp4", "c.mp4"]
    assert all(r.status == "done" for r in results), [r.reason for r in results]
    assert built == ["cuda:0", "cuda:0"] and selected == [0, 0]
    assert fake.options["num_gpus"] == 1 and fake.killed == 2


def test_a_ray_worker_whose_device_fails_is_restarted(monkeypatch):
    """A sticky CUDA error (the process's context is gone) fails its input as a device error;
    the driver has Ray start that actor again, and it does the rest of the chunk."""
    from video_features.utils import ray_backend

    contexts = []

    def build_worker(cfgs, records, device):
        state = {"broken": False}    # of this process's CUDA context
        contexts.append(state)

        def extract(path):
            if state["broken"] or (path == "b.mp4" and len(contexts) == 1):
                state["broken"] = True
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return {}
        return _Extractor(extract), _Writer()

    monkeypatch.setattr(ray_backend, "QUEUED_PER_ACTOR", 1)
    fake, _, done = _run_on_fake_ray(monkeypatch, build_worker,
                                     ["a.mp4", "b.mp4", "c.mp4", "d.mp4"])
    results = {r.path: r for r in done}
    assert results["b.mp4"].status == "failed" and results["b.mp4"].device_broken
    assert "device error" in results["b.mp4"].reason
    assert [results[p].status for p in ("a.mp4", "c.mp4", "d.mp4")] == ["done"] * 3, [
        (r.path, r.reason) for r in results.values()]
    assert fake.restarted == 1 and len(contexts) == 2   # the one actor, started again once


def test_actor_decoders_follow_the_actors_node_not_the_driver():
    from video_features.utils.ray_backend import actor_share

    gpu = Config({"device": "cuda", "cpu_workers": 1, "ray_actors": None, "decoders": "auto"})
    assert actor_share(gpu, True, {"CPU": 32.0, "GPU": 4.0}) == (8, 1)
    assert actor_share(gpu.replace(decoders=None), True, {"CPU": 6.0, "GPU": 1.0}) == (6, 1)
    assert actor_share(gpu.replace(decoders=2), True, {"CPU": 32.0, "GPU": 4.0}) == (2, 4)
    cpu = Config({"device": "cpu", "cpu_workers": 2, "ray_actors": None, "decoders": "auto"})
    assert actor_share(cpu, False, {"CPU": 8.0}) == (4, 1)
    assert actor_share(cpu.replace(ray_actors=4), False, {"CPU": 8.0}) == (2, 1)


def _fake_nvml(monkeypatch, uuids: list[str], bytes_only: bool = False):
    """pynvml whose devices (in NVML's own order) carry ``uuids``."""
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None

    def by_uuid(u):
        if bytes_only and not isinstance(u, bytes):
            raise TypeError("bytes expected")
        u = u.decode() if isinstance(u, bytes) else u
        if u not in uuids:
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        return f"handle{uuids.index(u)}"

    def by_index(i):
        return f"handle{i}"

    nvml.nvmlDeviceGetHandleByUUID = by_uuid
    nvml.nvmlDeviceGetHandleByIndex = by_index
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=50)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=123)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


def test_gpu_metrics_name_the_gpu_torch_uses_by_its_uuid(monkeypatch, tmp_path):
    """CUDA_VISIBLE_DEVICES=2: torch's cuda:0 is NVML's third GPU."""
    from video_features.utils.runlog import RunLog

    machine = [f"GPU-{c * 8}-0000-0000-0000-000000000000" for c in "abc"]
    visible = {0: "cccccccc-0000-0000-0000-000000000000"}  # as torch prints it, bare

    def props(i):
        if i not in visible:
            raise RuntimeError("invalid device ordinal")
        return types.SimpleNamespace(uuid=visible[i])

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    _fake_nvml(monkeypatch, machine)
    log = RunLog(str(tmp_path), "r", ["resnet"], ["cuda:0"])
    assert log._gpus == [(0, "handle2")]
    assert log._gpu_sample() == [{"index": 0, "busy": 0.5, "memory_bytes": 123}]

    _fake_nvml(monkeypatch, machine, bytes_only=True)   # an older pynvml
    assert RunLog(str(tmp_path), "r", ["resnet"], ["cuda"])._gpus == [(0, "handle2")]
    # a GPU that cannot be matched gets no figures, never another GPU's
    _fake_nvml(monkeypatch, machine[:2])
    assert RunLog(str(tmp_path), "r", ["resnet"], ["cuda:0"])._gpus == []
    assert RunLog(str(tmp_path), "r", ["resnet"], ["cuda:1"])._gpus == []


def test_ray_actors_measure_their_own_gpus_and_the_log_shows_them(monkeypatch, tmp_path):
    """Under Ray the driver's GPUs are not the run's: each actor samples its GPU while it works
    and sends the chunk's average busy share and peak memory with its last result; the metrics
    log shows the latest figures of every actor's GPU."""
    import json

    from video_features.utils import runlog, runner
    from video_features.utils.output import HOST

    uuid = "aaaaaaaa-0000-0000-0000-000000000000"
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=uuid))
    _fake_nvml(monkeypatch, [f"GPU-{uuid}"])
    busy = iter([20, 60, 100, 40])
    sys.modules["pynvml"].nvmlDeviceGetUtilizationRates = \
        lambda h: types.SimpleNamespace(gpu=next(busy))
    monkeypatch.setattr(runlog, "SAMPLE_EVERY", 3600.0)   # the test takes the samples itself

    meter = runlog.GpuMeter("cuda:0")
    meter.sample()
    meter.sample()
    assert meter.harvest() == [{"host": HOST, "index": 0, "busy": 0.4, "memory_bytes": 123}]
    assert meter.harvest() == []                          # each chunk starts afresh
    meter.close()
    assert runlog.GpuMeter("cpu").harvest() == []

    meters = []
    made = runlog.GpuMeter.__init__
    monkeypatch.setattr(runlog.GpuMeter, "__init__",
                        lambda self, device: (made(self, device), meters.append(self))[0])

    def extract(path):
        meters[-1].sample()                               # as the meter's thread would
        return {}

    busy = iter([50, 70])                                 # what the fake NVML reports next
    _, _, results = _run_on_fake_ray(monkeypatch, lambda cfgs, records, device: (
        _Extractor(extract), _Writer()), ["a.mp4", "b.mp4"])
    meters[-1].close()
    assert [r.gpus for r in results] == [[], [{"host": HOST, "index": 0, "busy": 0.6,
                                               "memory_bytes": 123}]]

    log = runlog.RunLog(str(tmp_path), "r", ["resnet"], ["cuda:0"], sample_gpus=False)
    assert log._gpus == []                                # not the driver's own GPU
    progress = runner._Progress(2, False, runlog=log)
    for r in results:
        progress.update(r)
    progress.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["gpus"] == results[-1].gpus


def test_decoders_auto_is_left_to_each_ray_actor():
    """The command line's default decoders=auto reaches the actors (each sizes it from its own
    node), while the local backend resolves it up front."""
    from video_features.utils.config import make_config

    ray_cfg = make_config("null", video_paths=["x"], device="cpu", backend="ray")
    assert ray_cfg.decoders == "auto"
    local = make_config("null", video_paths=["x"], device="cpu")
    assert isinstance(local.decoders, int) and local.decoders >= 1
