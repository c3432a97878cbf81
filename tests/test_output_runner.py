"""Output layout, atomic writes, skip-on-rerun, the runner with several workers, bad inputs."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, run_main
from video_features.utils.output import OutputWriter


def test_same_file_name_in_different_folders_do_not_collide(tmp_path):
    w = OutputWriter("save_numpy", str(tmp_path / "out"), "resnet", input_root=str(tmp_path))
    a = w.paths_for(str(tmp_path / "a" / "clip.mp4"), ["resnet"])["resnet"]
    b = w.paths_for(str(tmp_path / "b" / "clip.mp4"), ["resnet"])["resnet"]
    assert a != b
    assert a == tmp_path / "out" / "resnet" / "a" / "clip_resnet.npy"
    outside = w.paths_for("/elsewhere/x/clip.mp4", ["fps"])["fps"]
    assert outside == tmp_path / "out" / "resnet" / "elsewhere" / "x" / "clip_fps.npy"


@pytest.mark.parametrize("mode", ["save_numpy", "save_pickle"])
def test_write_is_atomic_and_done_detection(tmp_path, mode):
    w = OutputWriter(mode, str(tmp_path), "resnet", input_root=str(tmp_path))
    video = str(tmp_path / "v.mp4")
    feats = {"resnet": np.ones((3, 4), np.float32), "fps": np.array(25.0)}
    assert not w.is_done(video, feats)
    paths = w.write(video, feats)
    assert all(p.exists() for p in paths) and w.is_done(video, feats)
    assert paths[-1].name == "v_meta.json"  # the record is written last
    assert not [p for p in paths[0].parent.iterdir() if p.name.endswith(".tmp")]
    # a damaged file is not "done"
    paths[0].write_bytes(paths[0].read_bytes()[:20])
    assert not w.is_done(video, feats)
    # arrays without their record (a run killed between them) are not "done" either
    w.write(video, feats)
    paths[-1].unlink()
    assert not w.is_done(video, feats)


def _npys(root: Path) -> list[Path]:
    return sorted(root.rglob("*.npy"))


def test_main_job_two_workers_bad_inputs_and_rerun(tmp_path, make_video, resnet_weights):
    resnet_weights("resnet18")
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    v1 = make_video("clip.mp4", n_frames=8, fps=25.0, width=64, height=48)
    d1.mkdir(), d2.mkdir()
    shutil.copy(v1, d1 / "clip.mp4")
    shutil.copy(make_video("other.mp4", n_frames=5, fps=10.0, width=64, height=48), d2 / "clip.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("hello")
    lst = tmp_path / "list.txt"
    lst.write_text("d1/clip.mp4\nd2/clip.mp4\nmissing.mp4\nempty.mp4\ntext.mp4\n")
    out = tmp_path / "out"
    args = ["--feature_type", "resnet", "--device", "cpu", "--cpu_workers", "2",
            "--file_with_video_paths", str(lst), "--on_extraction", "save_numpy",
            "--output_path", str(out), "model_name=resnet18", "batch_size=4",
            f"input_root={tmp_path}"]
    res = run_main(*args, cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "done 2, skipped 0 (already extracted), failed 3" in res.stderr
    assert "file not found" in res.stderr and "empty file" in res.stderr and "not a readable video" in res.stderr
    f1 = np.load(out / "resnet" / "d1" / "clip_resnet.npy")
    f2 = np.load(out / "resnet" / "d2" / "clip_resnet.npy")
    assert f1.shape == (8, 512) and f2.shape == (5, 512)
    assert float(np.load(out / "resnet" / "d2" / "clip_fps.npy")) == 10.0
    assert len(_npys(out)) == 6
    # rerun: finished videos are skipped, failures are tried again
    res2 = run_main(*args, cwd=tmp_path)
    assert "done 0, skipped 2 (already extracted), failed 3" in res2.stderr
    # a damaged output is recomputed
    (out / "resnet" / "d1" / "clip_fps.npy").write_bytes(b"garbage")
    res3 = run_main(*args, cwd=tmp_path)
    assert "done 1, skipped 1" in res3.stderr
    assert float(np.load(out / "resnet" / "d1" / "clip_fps.npy")) == 25.0


def _copies_and_args(tmp_path: Path, make_video, n: int, out: Path, *extra: str) -> list[str]:
    """``n`` copies of one tiny video and the command line that saves their ResNet-18 features."""
    videos = []
    for i in range(n):
        p = tmp_path / f"v{i}.mp4"
        shutil.copy(make_video("k.mp4", n_frames=24, fps=25.0, width=64, height=48), p)
        videos.append(str(p))
    return [sys.executable, str(ROOT / "main.py"), "--feature_type", "resnet", "--device", "cpu",
            *extra, "--video_paths", *videos, "--on_extraction", "save_numpy", "--output_path",
            str(out), "batch_size=4", "model_name=resnet18", f"input_root={tmp_path}"]


def test_kill_leaves_no_partial_files_and_rerun_completes(tmp_path, make_video, resnet_weights):
    resnet_weights("resnet18")
    out = tmp_path / "out"
    args = _copies_and_args(tmp_path, make_video, 6, out)
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(_npys(out)) < 3:  # first video written, more under way
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for f in _npys(out):
        np.load(f)  # every feature file that exists is complete
    res = run_main(*args[2:], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "failed 0" in res.stderr
    assert len(_npys(out)) == 18
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def _worker_pids(parent: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmd:
                out.append(int(pid))
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_dying_worker_costs_only_its_video(tmp_path, make_video, resnet_weights):
    resnet_weights("resnet18")
    out = tmp_path / "out"
    args = _copies_and_args(tmp_path, make_video, 8, out, "--cpu_workers", "2")
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(_npys(out)) < 3:
        time.sleep(0.05)
    victims = _worker_pids(proc.pid)
    assert victims, "no worker processes found"
    os.kill(victims[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    # the run finishes; at most the killed worker's video failed, with that reason
    failed = [ln for ln in err.splitlines() if ln.strip().startswith("FAILED")]
    assert len(failed) <= 1 and all("worker process died" in ln for ln in failed), err
    assert proc.returncode == (1 if failed else 0)
    assert f"done {8 - len(failed)}," in err
    res = run_main(*args[2:], cwd=tmp_path)
    assert res.returncode == 0 and len(_npys(out)) == 24


def test_progress_bar_reports_frames_per_second_during_the_run(make_video, resnet_weights, capsys):
    from video_features.utils.config import make_config
    from video_features.utils.runner import run

    resnet_weights("resnet18")
    path = make_video("prog.mp4", n_frames=12, fps=25.0, width=64, height=48)
    cfg = make_config("resnet", video_paths=[str(path)], device="cpu", model_name="resnet18",
                      batch_size=4, progress=True, on_extraction="save_numpy",
                      output_path=str(path.parent / "prog_out"), overwrite=True)
    summary = run(cfg)
    err = capsys.readouterr().err
    assert summary.count("done") == 1 and summary.results[0].frames == 12
    assert "1/1" in err and "frames/s" in err
