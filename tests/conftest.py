"""Shared fixtures: an isolated weights cache, generated videos, random official checkpoints."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Every test (and every worker process it spawns) sees an empty, private torch hub cache and
# never tries the network: checkpoints come only from what the tests write in official layouts.
_CACHE = tempfile.mkdtemp(prefix="vf-torch-home-")
os.environ["TORCH_HOME"] = _CACHE
os.environ["VIDEO_FEATURES_OFFLINE"] = "1"


def pytest_sessionfinish(session, exitstatus):
    """The private cache holds about 0.9 GB of random checkpoints: gone with the session."""
    import shutil

    shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where a CUDA GPU is visible and are skipped, with the reason,
    elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def torch_home() -> Path:
    return Path(_CACHE)


@pytest.fixture(scope="session")
def hub_checkpoints(torch_home: Path) -> Path:
    p = torch_home / "hub" / "checkpoints"
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture(scope="session")
def make_video(tmp_path_factory):
    """``make_video(name, **kw)`` writes a synthetic video (see sample/make_samples.py) once."""
    from sample.make_samples import write_video

    root = tmp_path_factory.mktemp("videos")
    made: dict = {}

    def _make(name: str = "v.mp4", **kw) -> Path:
        key = (name, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = write_video(root / name, **kw)
        return made[key]

    return _make


@pytest.fixture(scope="session")
def resnet_weights(hub_checkpoints: Path):
    """Random ResNet checkpoints in torchvision's layout, placed where the real ones are cached."""
    from video_features.models.resnet.weights import card_for, write_random_checkpoint

    def _get(model_name: str = "resnet18") -> Path:
        path = hub_checkpoints / card_for(model_name).filename
        if not path.exists():
            write_random_checkpoint(path, model_name)
        return path

    return _get


def run_main(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run ``python main.py ARGS`` as a user would; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture
def private_hub_cache(tmp_path_factory, monkeypatch):
    """An empty Hugging Face cache of our own (shared by a session's tests that use it): nothing
    from the machine's cache is ever read."""
    cache = tmp_path_factory.getbasetemp() / "hf-hub-cache"
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache
