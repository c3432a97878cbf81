"""Nothing lost: the failure report in the output folder, a full or read-only output folder
(a clear error, no partial files, the run stops instead of failing every input), and kill -9 at
any moment followed by the same command giving the outputs of an uninterrupted run."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from tests.faulty_extractor import FaultyExtractor
from video_features.utils import output
from video_features.utils.config import make_config
from video_features.utils.errors import OutputError
from video_features.utils.runner import run

ROOT = Path(__file__).resolve().parent.parent


class DiskFillingExtractor(FaultyExtractor):
    """A ``full*`` input fills the disk: from then on every array write of every worker fails
    with ENOSPC, as on a real full disk (a marker file beside the output folder tells the other
    worker processes, which a monkeypatch in the test process cannot reach)."""

    def __init__(self, cfg, device) -> None:
        super().__init__(cfg, device)
        self.marker = Path(cfg.output_path).parent / "disk-is-full"
        real = output._dump

        def dump(f, value, mode, marker=self.marker):
            if marker.exists():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(f, value, mode)

        output._dump = dump

    def extract(self, path: str) -> dict[str, np.ndarray]:
        if Path(path).name.startswith("full"):
            self.marker.touch()
        return super().extract(path)


def _null(paths, out: Path, **kw):
    base = dict(video_paths=[str(p) for p in paths], device="cpu", on_extraction="save_numpy",
                output_path=str(out), input_root=str(Path(paths[0]).parent), progress=False)
    base.update(kw)
    return make_config("null", **base)


@pytest.fixture(scope="module")
def clips(make_video):
    return [make_video(f"nl{i}.mp4", n_frames=6 + i, width=64, height=48, seed=i) for i in range(4)]


def _copies(clips, folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"v{i:02d}.mp4")
        shutil.copy(clips[i % len(clips)], paths[-1])
    return paths


def _report(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "failures.jsonl").read_text().splitlines()]


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def _check_records(root: Path) -> int:
    """Every .npy under ``root`` loads and every record matches its arrays' size, shape and
    dtype; returns the records seen. Files a run removes meanwhile (staged inputs moved into
    the HDF5 file) are not damage."""
    for npy in root.rglob("*.npy"):
        try:
            np.load(npy)
        except FileNotFoundError:
            pass
    records = 0
    for meta_path in root.rglob("*_meta.json"):
        try:
            meta = json.loads(meta_path.read_text())
            for key, info in meta["outputs"].items():
                path = meta_path.parent / info["file"]
                arr = np.load(path)
                assert (path.stat().st_size, list(arr.shape), arr.dtype.str) == (
                    info["bytes"], info["shape"], info["dtype"]), path
        except FileNotFoundError:
            continue
        records += 1
    return records


# -- the failure report ------------------------------------------------------------------------
def test_failure_report_lists_each_failed_input_and_follows_reruns(tmp_path, clips):
    d = tmp_path / "in"
    good, missing, empty, text = (d / n for n in ("good.mp4", "missing.mp4", "empty.mp4", "text.mp4"))
    d.mkdir()
    shutil.copy(clips[0], good)
    empty.write_bytes(b"")
    text.write_text("hello")
    out = tmp_path / "out"

    s1 = run(_null([good, missing, empty, text], out))
    assert (s1.count("done"), s1.count("failed"), s1.exit_code) == (1, 3, 1)
    lines = _report(out)
    assert {ln["path"] for ln in lines} == {str(p) for p in (missing, empty, text)}
    reasons = {r.path: r.reason for r in s1.failed}
    for ln in lines:
        assert ln["reason"] == reasons[ln["path"]] and ln["stage"] == "open"
        assert ln["attempts"] == 1 and ln["feature_type"] == "null" and ln["run"] == s1.run_id
        assert abs(datetime.fromisoformat(ln["time"]).timestamp() - time.time()) < 600
    assert f"failures: {out / 'failures.jsonl'}" in s1.text()

    # a rerun on part of the list: its inputs' lines are replaced (a fixed input loses its line),
    # the line of the input it did not plan (another shard, another list) stays as it was
    shutil.copy(clips[1], missing)
    s2 = run(_null([good, missing, empty], out))
    assert (s2.count("done"), s2.count("skipped"), s2.count("failed")) == (1, 1, 1)
    lines2 = _report(out)
    assert [(ln["path"], ln["run"]) for ln in lines2] == [(str(text), s1.run_id),
                                                          (str(empty), s2.run_id)]
    assert next(ln for ln in lines2 if ln["path"] == str(text)) == next(
        ln for ln in lines if ln["path"] == str(text))

    # nothing fails any more: no report, and the summary points at none
    shutil.copy(clips[2], empty)
    shutil.copy(clips[3], text)
    s3 = run(_null([good, missing, empty, text], out))
    assert s3.exit_code == 0 and not (out / "failures.jsonl").exists()
    assert "failures:" not in s3.text()


def test_printing_run_has_no_failure_report(tmp_path, clips, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    s = run(make_config("null", video_paths=[str(clips[0]), str(tmp_path / "missing.mp4")],
                        device="cpu", on_extraction="print", progress=False))
    assert s.count("failed") == 1 and "file not found" in s.text()
    assert "failures:" not in s.text() and not list(tmp_path.rglob("failures.jsonl"))


# -- read-only and full output folders ----------------------------------------------------------
def test_atomic_write_names_the_file_of_a_full_disk_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "a_null.npy"

    def full(f):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputError, match=f"cannot write {target}: no space left on device") as e:
        output.atomic_write(target, full)
    assert e.value.stop_reason == f"the output folder {tmp_path} is full (no space left on device)"
    assert list(tmp_path.iterdir()) == []

    # an error about another file (one read while dumping) is that error, not a full folder
    def unreadable(f):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "staged.npy"))

    with pytest.raises(PermissionError):
        output.atomic_write(target, unreadable)
    assert list(tmp_path.iterdir()) == []


def test_read_only_output_folder_ends_the_run_before_any_work(tmp_path, clips):
    from tests.conftest import run_main

    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (the simulated test covers it)")
        res = run_main("--feature_type", "null", "--device", "cpu", "--video_paths", str(clips[0]),
                       "--on_extraction", "save_numpy", "--output_path", str(out), cwd=tmp_path)
    finally:
        out.chmod(0o755)
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: cannot write to the output folder {out}: permission denied"], res.stderr
    assert list(out.iterdir()) == []


def test_read_only_output_folder_simulated_exits_2_naming_it(tmp_path, clips, monkeypatch, capsys):
    from video_features.cli import main

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(output, "_open_temp", read_only)
    out = tmp_path / "out"
    code = main(["--feature_type", "null", "--device", "cpu", "--video_paths", str(clips[0]),
                 "--on_extraction", "save_numpy", "--output_path", str(out), "progress=false"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: cannot write to the output folder {out}: read-only file system" in err
    assert "done " not in err  # no input was tried
    assert not [p for p in out.rglob("*") if p.is_file()]


def _full_after(monkeypatch, n_ok: int) -> None:
    """Array writes fail with ENOSPC after the first ``n_ok`` (at the low-level dump)."""
    real, calls = output._dump, [0]

    def dump(f, value, mode):
        calls[0] += 1
        if calls[0] > n_ok:
            f.write(b"\0" * 64)  # some bytes made it before the disk filled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, value, mode)

    monkeypatch.setattr(output, "_dump", dump)


def _outputs(out: Path, ft: str = "null") -> dict[str, dict[str, np.ndarray]]:
    """stem -> its arrays, for every input with a record."""
    got = {}
    for meta_path in (out / ft).rglob("*_meta.json"):
        meta = json.loads(meta_path.read_text())
        got[meta_path.name[:-len("_meta.json")]] = {
            k: np.load(meta_path.parent / v["file"]) for k, v in meta["outputs"].items()}
    return got


def test_disk_full_mid_run_stops_the_run_and_a_rerun_completes_it(tmp_path, clips, monkeypatch):
    videos = _copies(clips, tmp_path / "in", 8)
    out = tmp_path / "out"
    # the first input's three arrays fit; the second's second array does not
    _full_after(monkeypatch, 4)
    s = run(_null(videos, out, decoders=1))
    assert s.count("done") == 1 and s.count("failed") == 7 and s.exit_code == 1
    folder = out / "null"
    writes = [r for r in s.failed if not r.reason.startswith("not started")]
    not_started = [r for r in s.failed if r.reason.startswith("not started")]
    assert writes and all(f"cannot write {folder}/" in r.reason and "no space left on device" in r.reason
                          for r in writes), s.text()
    assert s.stopped == f"the output folder {folder} is full (no space left on device)"
    # at most the inputs the pipeline held (decoders + 1) were under way when the disk filled
    assert len(not_started) >= 8 - 1 - 2
    assert all(r.reason == f"not started: {s.stopped}; rerun to extract it" for r in not_started)
    assert "stopped early: the output folder" in s.text() and "input(s) not started" in s.text()
    # the finished input is whole; the failed ones left nothing (no array without its record)
    done = [Path(r.path).stem for r in s.results if r.status == "done"]
    assert set(_outputs(out)) == set(done) and _check_records(out) == 1
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{done[0]}_{k}" for k in ("null.npy", "fps.npy", "timestamps_ms.npy", "meta.json"))
    assert _temps(out) == []
    lines = _report(out)
    assert sorted(ln["stage"] for ln in lines) == sorted(
        ["write"] * len(writes) + ["not_started"] * len(not_started))
    assert all(ln["attempts"] == 0 for ln in lines if ln["stage"] == "not_started")

    # space again: the same command finishes the rest, as an uninterrupted run would have
    monkeypatch.undo()
    s2 = run(_null(videos, out, decoders=1))
    assert (s2.count("done"), s2.count("skipped"), s2.exit_code) == (7, 1, 0)
    ref = tmp_path / "ref"
    run(_null(videos, ref, decoders=1))
    _assert_same(_outputs(out), _outputs(ref))
    assert not (out / "failures.jsonl").exists() and _temps(out) == []


def _assert_same(got: dict, expect: dict) -> None:
    assert set(got) == set(expect) and expect
    for name, arrays in expect.items():
        assert set(got[name]) == set(arrays), name
        for key, value in arrays.items():
            np.testing.assert_array_equal(got[name][key], value, err_msg=f"{name} {key}")


def test_read_only_mid_run_in_process_stops_and_says_the_report_could_not_be_written(
        tmp_path, monkeypatch):
    """One CPU worker, a feature type outside the pipeline: the folder turns read-only after the
    first input, so even the failure report cannot be written; the summary says so."""
    monkeypatch.setenv("VIDEO_FEATURES_PLUGINS", "faulty=tests.faulty_extractor:FaultyExtractor")
    names = [tmp_path / f"a{i}.mp4" for i in range(5)]
    out = tmp_path / "out"
    real, calls = output._open_temp, [0]

    def open_temp(path):
        calls[0] += 1
        if calls[0] > 3:  # the check before the run (2 folders), the first input's array
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path)

    monkeypatch.setattr(output, "_open_temp", open_temp)
    cfg = make_config("faulty", video_paths=[str(p) for p in names], device="cpu",
                      on_extraction="save_numpy", output_path=str(out), input_root=str(tmp_path),
                      progress=False)
    s = run(cfg)
    got = [(Path(r.path).name, r.status, r.stage) for r in s.results]
    # the first input's array went in, its record did not: it fails at write, the rest never start
    assert got == [("a0.mp4", "failed", "write")] + [
        (f"a{i}.mp4", "failed", "not_started") for i in range(1, 5)]
    assert s.failed[0].reason == (f"cannot write {out / 'faulty' / 'a0_meta.json'}: "
                                  "read-only file system")
    assert s.stopped == f"the output folder {out / 'faulty'} is on a read-only file system"
    # its array was removed again (the run's metrics line went in before the folder turned)
    assert not [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".lock")
                and p != out / "metrics.jsonl"]
    assert "read-only file system" in s.report_error and not (out / "failures.jsonl").exists()
    assert f"the failure report could not be written: cannot write {out / 'failures.jsonl'}" in s.text()


def test_disk_full_stops_the_worker_pool(tmp_path):
    """Two worker processes: a write that finds the disk full fails its input, no later input is
    sent to a worker, and what was finished stays."""
    from tests.conftest import run_main

    names = ["a0.mp4", "a1.mp4", "full2.mp4"] + [f"a{i}.mp4" for i in range(3, 12)]
    out = tmp_path / "out"
    env = {"VIDEO_FEATURES_PLUGINS": "filling=tests.test_nothing_lost:DiskFillingExtractor"}

    def main(names):
        return run_main("--feature_type", "filling", "--device", "cpu", "--cpu_workers", "2",
                        "--on_extraction", "save_numpy", "--output_path", str(out),
                        f"input_root={tmp_path}", "--video_paths", *[str(tmp_path / n) for n in names],
                        cwd=tmp_path, env=env, timeout=300)

    res = main(names)
    assert res.returncode == 1, res.stderr
    listed = [ln.strip() for ln in res.stderr.splitlines() if ln.strip().startswith("FAILED ")]
    folder = out / "filling"
    report = {Path(ln["path"]).name: ln for ln in _report(out)}
    assert report["full2.mp4"]["stage"] == "write"
    assert report["full2.mp4"]["reason"] == f"cannot write {folder / 'full2_faulty.npy'}: no space left on device"
    not_started = {n for n, ln in report.items() if ln["stage"] == "not_started"}
    assert len(not_started) >= 12 - 3 - 2, res.stderr  # a0, a1, full2 and one more per worker
    assert all(report[n]["reason"].startswith(f"not started: the output folder {folder} is full")
               and report[n]["attempts"] == 0 for n in not_started)
    # the summary lists the inputs that failed and counts those the report holds as not started
    assert sorted(listed) == sorted(f"FAILED {tmp_path / n}: {report[n]['reason']}"
                                    for n in set(report) - not_started)
    assert (f"stopped early: the output folder {folder} is full (no space left on device); "
            f"{len(not_started)} input(s) not started (listed in {out / 'failures.jsonl'})") in res.stderr
    done = {n for n in names if (folder / f"{Path(n).stem}_meta.json").exists()}
    assert done | set(report) == set(names) and not done & set(report)
    assert f"done {len(done)}, skipped 0 (already extracted), failed {len(report)}" in res.stderr
    assert f"failures: {out / 'failures.jsonl'}" in res.stderr
    assert {f.name for f in folder.iterdir()} == {
        f"{Path(n).stem}_{k}" for n in done for k in ("faulty.npy", "meta.json")}
    assert _temps(out) == []

    # space again: the rest is done, the finished inputs are skipped
    (tmp_path / "disk-is-full").unlink()
    rest = [n for n in names if n != "full2.mp4"]
    res2 = main(rest)
    assert res2.returncode == 0, res2.stderr
    assert f"done {len(rest) - len(done)}, skipped {len(done)} (already extracted), failed 0" in res2.stderr
    # the report keeps the line of the input this run did not plan, and only that one
    assert [Path(ln["path"]).name for ln in _report(out)] == ["full2.mp4"]


def test_a_full_disk_while_consolidating_keeps_the_inputs_staged(tmp_path, clips, monkeypatch):
    from video_features.utils.consolidate import HDF5Store, read_hdf5

    def full(self, items):
        raise OSError(errno.ENOSPC, "Can't write data (no space left on device)")

    monkeypatch.setattr(HDF5Store, "add", full)
    out = tmp_path / "out"
    s = run(_null(clips, out, on_extraction="save_hdf5"))
    assert s.count("done") == len(clips) and s.exit_code == 1
    assert len(s.errors) == 1 and "no space left on device" in s.errors[0]
    assert f"they stay in {out / 'null' / '.staging'}" in s.text()
    assert len(list((out / "null" / ".staging").rglob("*_meta.json"))) == len(clips)
    monkeypatch.undo()
    s2 = run(_null(clips, out, on_extraction="save_hdf5"))
    assert s2.count("skipped") == len(clips) and s2.exit_code == 0  # moved, not recomputed
    assert len(read_hdf5(out / "null.h5")) == len(clips)


# -- kill -9 at any moment -----------------------------------------------------------------------
def _killed_after(args: list[str], out: Path, cwd: Path, records: int) -> int:
    """Run ``main.py args``, checking at every poll that no file is partial, and kill -9 its
    process group once ``records`` inputs are whole; returns the records left."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and _check_records(out) >= records:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    return _check_records(out)


@pytest.mark.parametrize("mode", ["save_numpy", "save_hdf5", "save_webdataset", "save_parquet"])
def test_kill_9_then_the_same_command_gives_the_uninterrupted_outputs(tmp_path, clips, make_video,
                                                                     mode):
    from tests.conftest import run_main
    from video_features.utils.consolidate import read_hdf5, read_parquet, read_webdataset

    def consolidated(folder: Path) -> dict:
        if mode == "save_hdf5":
            return read_hdf5(folder / "null.h5") if (folder / "null.h5").exists() else {}
        if mode == "save_parquet":
            return read_parquet(folder / "null.parquet") if (folder / "null.parquet").exists() else {}
        return read_webdataset(folder / "null")

    # long enough that the run is still going when it is killed
    big = [make_video(f"kill{i}.mp4", n_frames=150, width=160, height=120, seed=10 + i, audio=False)
           for i in range(3)]
    videos = _copies(big + list(clips), tmp_path / "in", 16)
    out, ref = tmp_path / "out", tmp_path / "ref"

    def args(folder: Path) -> list[str]:
        return ["--feature_type", "null", "--device", "cpu", "--on_extraction", mode,
                "--output_path", str(folder), f"input_root={tmp_path / 'in'}", "progress=false",
                "--video_paths", *map(str, videos)]

    for wanted in (1, len(videos) // 2):  # kill early, then kill the rerun half-way
        seen = _killed_after(args(out), out, tmp_path, wanted)
        if mode != "save_numpy":  # killed while moving inputs into it
            seen += len(consolidated(out))
        assert wanted <= seen < len(videos)  # killed part-way

    res = run_main(*args(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "failed 0" in res.stderr and _temps(out) == []
    assert run_main(*args(ref), cwd=tmp_path).returncode == 0
    if mode == "save_numpy":
        _check_records(out)
        _assert_same(_outputs(out), _outputs(ref))
    else:
        _assert_same(consolidated(out), consolidated(ref))
        assert not list((out / "null" / ".staging").rglob("*.npy"))
