"""backend=ray: the same run on a local Ray instance with two CPU actors gives the local
backend's outputs, records and summary."""
from __future__ import annotations

import json

import numpy as np
import pytest

from video_features.utils.config import make_config
from video_features.utils.errors import ConfigError
from video_features.utils.runner import run

ray = pytest.importorskip("ray", reason="backend=ray needs Ray (requirements-dev.txt installs it)")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def videos(make_video):
    return [make_video(f"ray{i}.mp4", n_frames=4 + i, fps=25.0, width=64, height=48)
            for i in range(5)]


def _cfg(ft, paths, out, **kw):
    return make_config(ft, video_paths=[str(p) for p in paths], device="cpu",
                       on_extraction="save_numpy", output_path=str(out),
                       input_root=str(paths[0].parent), **kw)


@pytest.mark.parametrize("ft,extra", [("null", {}), ("resnet", {"model_name": "resnet18"})])
def test_two_actors_give_the_local_backends_outputs(videos, tmp_path, resnet_weights, ft, extra):
    resnet_weights("resnet18")
    local = run(_cfg(ft, videos, tmp_path / "local", **extra))
    assert local.count("done") == 5
    ray_cfg = _cfg(ft, videos + [tmp_path / "missing.mp4"], tmp_path / "ray", backend="ray",
                   cpu_workers=2, **extra)
    if ft == "null":  # decoders=auto reaching the actors: each resolves it on its node
        ray_cfg = ray_cfg.replace(decoders="auto")
    remote = run(ray_cfg)
    assert remote.count("done") == 5 and remote.count("failed") == 1
    assert "missing.mp4" in remote.failed[0].reason or remote.failed[0].reason
    for v in videos:
        for key in (ft, "timestamps_ms"):
            a = np.load(tmp_path / "local" / ft / f"{v.stem}_{key}.npy")
            b = np.load(tmp_path / "ray" / ft / f"{v.stem}_{key}.npy")
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(1.0, float(np.abs(a).max())))
        meta = json.loads((tmp_path / "ray" / ft / f"{v.stem}_meta.json").read_text())
        assert meta["config"]["backend"] == "ray"
    # a rerun finds everything done, whichever backend made it
    assert run(_cfg(ft, videos, tmp_path / "ray", **extra)).count("skipped") == 5


def test_actor_count_and_clear_errors(monkeypatch, videos, tmp_path):
    from video_features.utils import ray_backend

    cfg = _cfg("null", videos, tmp_path, backend="ray", cpu_workers=3)
    assert ray_backend.actor_count(ray, cfg) == 3
    assert ray_backend.actor_count(ray, cfg.replace(ray_actors=2)) == 2
    with pytest.raises(ConfigError, match="ray_actors must be >= 1"):
        _cfg("null", videos, tmp_path, backend="ray", ray_actors=0)

    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ConfigError, match=r"backend=ray needs 'ray>=2\.9' \(No module named 'ray'\): "
                                          r"pip install 'ray>=2\.9' \(or the \[ray\] extra\)"):
        _cfg("null", videos, tmp_path, backend="ray")


def test_an_actor_keeps_one_pipeline_for_all_its_chunks(videos, tmp_path):
    """The decoders and shared memory are built once per actor (not per chunk), sized from the
    actor's node, and the outputs are the local backend's."""
    from video_features.utils.ray_backend import ExtractActor, actor_share, connect
    from video_features.utils.record import run_record

    local = run(_cfg("null", videos, tmp_path / "local"))
    assert local.count("done") == 5
    cfg = _cfg("null", videos, tmp_path / "ray", backend="ray", cpu_workers=2)
    cfg = cfg.replace(decoders="auto")
    connect(cfg)
    actor = ray.remote(num_cpus=1)(ExtractActor).remote([cfg], [run_record(cfg)], "cpu")
    try:
        info = ray.get(actor.ready.remote())
        here = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == here)
        assert info["decoders"] == actor_share(cfg, False, node["Resources"])[0]
        results = []
        for chunk in (videos[:2], videos[2:4], videos[4:]):
            results += ray.get(actor.process.remote([str(p) for p in chunk]))
        assert sorted(r.status for r in results) == ["done"] * 5
        assert ray.get(actor.ready.remote())["pipelines_built"] == 1
        assert ray.get(actor.close.remote())
    finally:
        ray.kill(actor)
    for v in videos:
        for key in ("null", "timestamps_ms"):
            name = f"null/{v.stem}_{key}.npy"
            np.testing.assert_array_equal(np.load(tmp_path / "ray" / name),
                                          np.load(tmp_path / "local" / name))
