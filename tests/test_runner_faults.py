"""The runner with real worker processes that die, hang or break their device: every planned
input ends with one result, the others are unaffected, and the run never stalls."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_main

PLUGIN = {"VIDEO_FEATURES_PLUGINS": "faulty=tests.faulty_extractor:FaultyExtractor"}


def _run(tmp_path: Path, names: list[str], *extra: str, timeout: int = 240):
    out = tmp_path / "out"
    args = ["--feature_type", "faulty", "--device", "cpu", "--cpu_workers", "2",
            "--on_extraction", "save_numpy", "--output_path", str(out), f"input_root={tmp_path}",
            "--video_paths", *[str(tmp_path / n) for n in names], *extra]
    t0 = time.monotonic()
    res = run_main(*args, cwd=tmp_path, env=PLUGIN, timeout=timeout)
    return res, out / "faulty", time.monotonic() - t0


def _row(folder: Path, name: str) -> np.ndarray:
    return np.load(folder / f"{Path(name).stem}_faulty.npy")[0]


def _failed(stderr: str) -> dict[str, str]:
    out = {}
    for ln in stderr.splitlines():
        if ln.strip().startswith("FAILED "):
            path, _, reason = ln.strip()[len("FAILED "):].partition(": ")
            out[Path(path).name] = reason
    return out


def test_a_broken_device_replaces_the_worker_not_every_later_input(tmp_path):
    names = ["poison.mp4"] + [f"a{i}.mp4" for i in range(5)]
    res, folder, _ = _run(tmp_path, names)
    failed = _failed(res.stderr)
    assert set(failed) == {"poison.mp4"}, res.stderr
    assert "device error, the worker is replaced" in failed["poison.mp4"]
    assert "done 5, skipped 0 (already extracted), failed 1" in res.stderr
    assert res.returncode == 1
    assert all((folder / f"a{i}_faulty.npy").exists() for i in range(5))


def test_a_dead_worker_is_noticed_at_once_while_its_peer_is_busy(tmp_path):
    names = ["busy.mp4", "die.mp4", "a1.mp4", "a2.mp4"]
    res, folder, _ = _run(tmp_path, names, "busy_seconds=20")
    failed = _failed(res.stderr)
    assert set(failed) == {"die.mp4"}, res.stderr
    assert "worker process died (exit code 9)" in failed["die.mp4"]
    assert "done 3, skipped 0 (already extracted), failed 1" in res.stderr
    busy_end, busy_pid = _row(folder, "busy.mp4")
    for name in ("a1.mp4", "a2.mp4"):  # done by the replacement while busy.mp4 was still running
        made, pid = _row(folder, name)
        assert made < busy_end and pid != busy_pid


def test_a_hung_worker_is_killed_and_replaced(tmp_path):
    names = ["hang.mp4", "a1.mp4", "a2.mp4", "a3.mp4"]
    res, folder, wall = _run(tmp_path, names, "worker_timeout=4")
    failed = _failed(res.stderr)
    assert set(failed) == {"hang.mp4"}, res.stderr
    assert "no progress for 4 s (worker_timeout)" in failed["hang.mp4"]
    assert "done 3, skipped 0 (already extracted), failed 1" in res.stderr
    assert wall < 120
    # the rerun retries only the failed input
    res2, _, _ = _run(tmp_path, names, "worker_timeout=4")
    assert "done 0, skipped 3 (already extracted), failed 1" in res2.stderr


def test_every_worker_dying_fails_each_input_with_a_reason(tmp_path):
    names = [f"die{i}.mp4" for i in range(6)]
    res, _, _ = _run(tmp_path, names)
    failed = _failed(res.stderr)
    assert set(failed) == set(names), res.stderr
    assert "done 0, skipped 0 (already extracted), failed 6" in res.stderr
    assert res.returncode == 1


@pytest.mark.parametrize("n_inputs", [1, 3])
def test_inline_sticky_error_stops_using_the_device_but_reports_everything(tmp_path, n_inputs):
    names = ["poison.mp4"] + [f"b{i}.mp4" for i in range(n_inputs)]
    out = tmp_path / "out"
    res = run_main("--feature_type", "faulty", "--device", "cpu", "--on_extraction", "save_numpy",
                   "--output_path", str(out), f"input_root={tmp_path}", "--video_paths",
                   *[str(tmp_path / n) for n in names], cwd=tmp_path, env=PLUGIN)
    failed = _failed(res.stderr)
    assert set(failed) == set(names), res.stderr
    assert all("rerun" in failed[n] for n in names[1:])


def test_an_input_without_any_result_is_reported_as_lost():
    from video_features.utils.runner import Result, Summary, _Progress, _reconcile

    summary = Summary([Result("a.mp4", "done"), Result("c.mp4", "skipped")])
    _reconcile(["a.mp4", "b.mp4", "c.mp4"], summary, _Progress(0, enabled=False))
    assert [(r.path, r.status) for r in summary.results] == [
        ("a.mp4", "done"), ("c.mp4", "skipped"), ("b.mp4", "failed")]
    assert "lost" in summary.results[-1].reason and summary.exit_code == 1
