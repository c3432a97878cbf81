"""Work claims: runs on one list and output folder do each input once and all end with every
output; claims of runs that are gone are taken over; claims are released as each input ends and
never left behind; a release, heartbeat or takeover touches only its own (or the judged) claim."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT
from video_features.utils import claims as claims_module
from video_features.utils import runner
from video_features.utils.claims import Claims, InputQueue
from video_features.utils.config import make_config
from video_features.utils.consolidate import read_hdf5
from video_features.utils.output import HOST, OutputWriter
from video_features.utils.runner import run

PLUGIN = {"VIDEO_FEATURES_PLUGINS": "faulty=tests.faulty_extractor:FaultyExtractor"}


def _start(inputs, out, *extra, busy=0.8, mode="save_numpy"):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--feature_type", "faulty", "--video_paths",
         *map(str, inputs), "--device", "cpu", "--on_extraction", mode, "--output_path",
         str(out), "--input_root", str(inputs[0].parent), f"busy_seconds={busy}", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **PLUGIN})


def _counts(stderr: str) -> tuple[int, int, int]:
    m = re.search(r"done (\d+), skipped (\d+) \(already extracted\), failed (\d+)", stderr)
    assert m, stderr[-1500:]
    return tuple(int(x) for x in m.groups())


def test_two_runs_on_one_list_do_each_input_once(tmp_path):
    inputs = [tmp_path / f"busy{i:02d}.mp4" for i in range(10)]
    out = tmp_path / "out"
    a, b = _start(inputs, out), _start(inputs, out)
    outs = [p.communicate(timeout=300) for p in (a, b)]
    assert a.returncode == b.returncode == 0, [o[1][-1500:] for o in outs]
    (done_a, skip_a, fail_a), (done_b, skip_b, fail_b) = (_counts(o[1]) for o in outs)
    assert fail_a == fail_b == 0
    assert done_a + done_b == 10                  # each input extracted once, by one of them
    assert done_a + skip_a == done_b + skip_b == 10   # both account for every input
    assert done_a and done_b                       # and they shared the work
    pids = {int(np.load(out / "faulty" / f"{p.stem}_faulty.npy")[0, 1]) for p in inputs}
    assert pids == {a.pid, b.pid}
    assert not list(out.rglob("*.claim*"))         # nothing left behind


def _writer(out, inputs):
    return OutputWriter("save_numpy", str(out), "faulty", str(inputs[0].parent))


def _claim_file(out, inputs, path, **info):
    f = _writer(out, inputs).video_dir(str(path)) / f".{path.stem}.claim"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(info))
    return f


def _cfg(inputs, out, busy_seconds=0.0, **kw):
    return make_config("faulty", video_paths=[str(p) for p in inputs], device="cpu",
                       on_extraction="save_numpy", output_path=str(out),
                       input_root=str(inputs[0].parent), busy_seconds=busy_seconds, **kw)


@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.setenv("VIDEO_FEATURES_PLUGINS", PLUGIN["VIDEO_FEATURES_PLUGINS"])


def test_claims_of_a_dead_process_or_a_silent_host_are_taken_over(tmp_path, plugin):
    inputs = [tmp_path / f"ok{i}.mp4" for i in range(3)]
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    _claim_file(out, inputs, inputs[0], host=HOST, pid=int(dead), run="x")
    old = _claim_file(out, inputs, inputs[1], host="another-host", pid=1, run="y")
    os.utime(old, (time.time() - 120, time.time() - 120))   # its heartbeat stopped 2 min ago
    summary = run(_cfg(inputs, out, claim_timeout=60))
    assert summary.count("done") == 3
    assert not list(out.rglob("*.claim*"))


def test_a_live_claim_is_waited_for_and_its_outputs_are_used(tmp_path, plugin):
    inputs = [tmp_path / f"ok{i}.mp4" for i in range(2)]
    out = tmp_path / "out"
    # another run on another host holds ok1 with a fresh heartbeat, then finishes it
    held = _claim_file(out, inputs, inputs[1], host="another-host", pid=1, run="z")
    first = run(_cfg(inputs[1:], out / "elsewhere"))   # the "other run's" outputs, made apart
    assert first.count("done") == 1

    import threading

    def other_run_finishes():
        time.sleep(1.5)
        for f in (out / "elsewhere" / "faulty").iterdir():
            os.replace(f, out / "faulty" / f.name)
        held.unlink()

    t = threading.Thread(target=other_run_finishes)
    t.start()
    t0 = time.time()
    summary = run(_cfg(inputs, out, claim_timeout=3600))
    t.join()
    assert summary.count("done") == 1 and summary.count("skipped") == 1
    assert time.time() - t0 >= 1.0                 # it waited for the holder
    skipped = [r.path for r in summary.results if r.status == "skipped"]
    assert skipped == [str(inputs[1])]


def test_input_queue_puts_aside_what_others_hold(tmp_path):
    inputs = [tmp_path / f"v{i}.mp4" for i in range(3)]
    out = tmp_path / "out"
    mine, theirs = Claims([_writer(out, inputs)], 600), Claims([_writer(out, inputs)], 600)
    try:
        assert theirs.take(str(inputs[1]))
        q = InputQueue([str(p) for p in inputs], mine)
        got = []
        while q:
            got.append(q.popleft())
        assert got == [str(inputs[0]), str(inputs[2])] and q.elsewhere == [str(inputs[1])]
        assert not mine.take(str(inputs[1]))
        theirs.release(str(inputs[1]))
        assert mine.take(str(inputs[1]))
        mine.release_all()
        assert not list(out.rglob("*.claim*"))
    finally:
        mine.close()
        theirs.close()


def _left_behind(out):
    """Claims, claims moved aside, and temporary files: none may outlive the runs."""
    return [p for p in out.rglob("*") if ".claim" in p.name or p.name.endswith(".tmp")]


@pytest.mark.parametrize("mode", ["save_numpy", "save_hdf5"])
def test_three_runs_on_twenty_inputs_extract_each_input_exactly_once(tmp_path, mode):
    inputs = [tmp_path / f"busy{i:02d}.mp4" for i in range(20)]
    out = tmp_path / "out"
    # each in its own order, started a little apart: each run plans and claims inputs the
    # others are finishing (and releasing) meanwhile
    orders = [inputs, inputs[::-1], inputs[10:] + inputs[:10]]
    runs = []
    for order in orders:
        runs.append(_start(order, out, busy=0.15, mode=mode))
        time.sleep(0.5)
    outs = [p.communicate(timeout=300) for p in runs]
    assert [p.returncode for p in runs] == [0, 0, 0], [o[1][-1500:] for o in outs]
    counts = [_counts(o[1]) for o in outs]
    assert sum(done for done, _, _ in counts) == 20, counts   # no input extracted twice
    assert all(done + skipped == 20 and not failed for done, skipped, failed in counts), counts
    if mode == "save_hdf5":   # the three runs took turns moving their inputs into one file
        got = read_hdf5(out / "faulty.h5")
        assert sorted(got) == [p.stem for p in inputs]
        assert not [f for f in (out / "faulty" / ".staging").rglob("*") if f.is_file()]
        pids = [int(got[p.stem]["faulty"][0, 1]) for p in inputs]
    else:
        pids = [int(np.load(out / "faulty" / f"{p.stem}_faulty.npy")[0, 1]) for p in inputs]
    # the outputs each run made are as many as it says it extracted
    assert [pids.count(p.pid) for p in runs] == [done for done, _, _ in counts], (pids, counts)
    assert not _left_behind(out)


def test_an_input_another_run_finished_after_the_plan_is_skipped_not_redone(tmp_path, plugin,
                                                                             monkeypatch):
    inputs = [tmp_path / f"ok{i}.mp4" for i in range(3)]
    out = tmp_path / "out"
    assert run(_cfg(inputs[1:2], out / "elsewhere")).count("done") == 1   # the other run's work
    theirs = np.load(out / "elsewhere" / "faulty" / "ok1_faulty.npy")
    real_plan = runner.plan

    def plan_then_the_other_run_finishes(*args):
        todo, settled = real_plan(*args)
        # ok1 was "to do"; now the other run writes it and removes its claim (it held it, so the
        # plan could not know)
        (out / "faulty").mkdir(parents=True, exist_ok=True)
        for f in (out / "elsewhere" / "faulty").iterdir():
            os.replace(f, out / "faulty" / f.name)
        return todo, settled

    monkeypatch.setattr(runner, "plan", plan_then_the_other_run_finishes)
    summary = run(_cfg(inputs, out))
    assert summary.count("done") == 2 and summary.count("skipped") == 1
    assert [r.path for r in summary.results if r.status == "skipped"] == [str(inputs[1])]
    assert np.array_equal(np.load(out / "faulty" / "ok1_faulty.npy"), theirs)   # not redone
    assert not _left_behind(out / "faulty")


def test_each_claim_is_released_as_soon_as_its_input_ends(tmp_path, plugin, monkeypatch):
    from tests.faulty_extractor import FaultyExtractor

    inputs = [tmp_path / "bad.mp4"] + [tmp_path / f"ok{i}.mp4" for i in range(3)]
    out = tmp_path / "out"
    held = []
    real_extract = FaultyExtractor.extract

    def extract(self, path):
        held.append(sorted(p.name for p in (out / "faulty").glob(".*.claim")))
        if "bad" in path:
            raise ValueError("a broken input")
        return real_extract(self, path)

    monkeypatch.setattr(FaultyExtractor, "extract", extract)
    summary = run(_cfg(inputs, out))
    assert summary.count("failed") == 1 and summary.count("done") == 3
    # only the input in flight is held: done and failed ones were released at once
    assert held == [[f".{p.stem}.claim"] for p in inputs], held
    assert not _left_behind(out)


def test_a_retried_input_keeps_its_claim_until_its_final_result(tmp_path, plugin, monkeypatch):
    inputs = [tmp_path / "die0.mp4", tmp_path / "ok1.mp4"]
    out = tmp_path / "out"
    seen = []
    real = InputQueue.appendleft

    def appendleft(self, path):   # the pool puts a retried input back: it must still be ours
        seen.append((path, path in self.claims.held,
                     (out / "faulty" / f".{os.path.basename(path)[:-4]}.claim").exists()))
        real(self, path)

    monkeypatch.setattr(InputQueue, "appendleft", appendleft)
    summary = run(_cfg(inputs, out, cpu_workers=2, worker_timeout=60))
    assert seen == [(str(inputs[0]), True, True)]
    assert summary.count("done") == 1 and summary.count("failed") == 1
    assert not _left_behind(out)


def _kill_when(p, cond, timeout=120):
    t0 = time.time()
    while not cond():
        assert p.poll() is None, p.communicate()[1][-1500:]
        assert time.time() - t0 < timeout
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_a_rerun_after_a_kill_9_leaves_no_claim_behind(tmp_path, plugin):
    inputs = [tmp_path / f"busy{i}.mp4" for i in range(6)]
    out = tmp_path / "out"
    p = _start(inputs, out, busy=0.4)
    _kill_when(p, lambda: len(list((out / "faulty").glob("*_faulty.npy"))) >= 2)
    summary = run(_cfg(inputs, out, busy_seconds=0.4))
    assert summary.count("failed") == 0
    assert summary.count("skipped") >= 2 and summary.count("done") + summary.count("skipped") == 6
    assert all((out / "faulty" / f"{i.stem}_faulty.npy").exists() for i in inputs)
    assert not _left_behind(out)


def test_stale_claims_beside_done_inputs_are_removed_and_live_ones_kept(tmp_path, plugin):
    inputs = [tmp_path / f"ok{i}.mp4" for i in range(3)]
    out = tmp_path / "out"
    assert run(_cfg(inputs, out)).count("done") == 3
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    gone = _claim_file(out, inputs, inputs[0], host=HOST, pid=int(dead), run="x")
    live = _claim_file(out, inputs, inputs[1], host="another-host", pid=1, run="y")
    silent = _claim_file(out, inputs, inputs[2], host="another-host", pid=1, run="z")
    os.utime(silent, (time.time() - 120, time.time() - 120))
    summary = run(_cfg(inputs, out, claim_timeout=60))
    assert summary.count("skipped") == 3
    assert not gone.exists() and not silent.exists()
    assert json.loads(live.read_text())["run"] == "y"     # its holder is alive: its to remove
    live.unlink()
    assert not _left_behind(out)


def test_the_heartbeat_goes_on_after_an_error_and_says_it_once(tmp_path, monkeypatch, caplog):
    inputs = [tmp_path / "v0.mp4", tmp_path / "v1.mp4"]
    out = tmp_path / "out"
    mine = Claims([_writer(out, inputs)], 1.0)    # beats every 0.5 s
    calls = []
    real_utime = os.utime

    def utime(f, *a, **kw):
        calls.append(f)
        if len(calls) <= 4:      # e.g. NFS after a server restart, for two beats
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), str(f))
        return real_utime(f, *a, **kw)

    caplog.set_level(logging.WARNING, logger=claims_module.__name__)
    try:
        assert mine.take(str(inputs[0])) and mine.take(str(inputs[1]))
        files = mine.files(str(inputs[0])) + mine.files(str(inputs[1]))
        for f in files:
            os.utime(f, (time.time() - 30, time.time() - 30))
        monkeypatch.setattr(os, "utime", utime)
        t0 = time.time()
        while time.time() - t0 < 10 and not all(time.time() - f.stat().st_mtime < 5
                                                 for f in files):
            time.sleep(0.05)
        assert all(time.time() - f.stat().st_mtime < 5 for f in files)   # it beat on, for real
        assert len(calls) >= 6, calls          # after two failed beats, each touching both
        assert sum(os.strerror(errno.ESTALE) in r.getMessage()
                   for r in caplog.records) == 1, caplog.text   # said once, not every beat
    finally:
        monkeypatch.undo()
        mine.close()
    assert not _left_behind(out)


def _stale_claim(out, inputs, path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    return _claim_file(out, inputs, path, host=HOST, pid=int(dead), run="gone")


def test_two_runs_taking_over_one_stale_claim_at_once_do_not_both_win(tmp_path, monkeypatch):
    inputs = [tmp_path / "v0.mp4"]
    out = tmp_path / "out"
    f = _stale_claim(out, inputs, inputs[0])
    a, b = Claims([_writer(out, inputs)], 600), Claims([_writer(out, inputs)], 600)
    real_alive = claims_module._pid_alive
    won = []

    def alive(pid):   # while a judges the stale claim, b takes it over
        if not won:
            won.append(None)
            won[0] = b.take(str(inputs[0]))
        return real_alive(pid)

    monkeypatch.setattr(claims_module, "_pid_alive", alive)
    try:
        assert not a.take(str(inputs[0]))
        assert won == [True]
        assert json.loads(f.read_text())["run"] == b.me["run"]   # b's claim, in place
        a.release(str(inputs[0]))
        assert f.exists()
        b.release(str(inputs[0]))
        assert not f.exists()
        assert not _left_behind(out)
    finally:
        a.close()
        b.close()


def test_a_takeover_gives_back_a_claim_whose_holder_beat_after_it_was_judged(tmp_path,
                                                                              monkeypatch):
    inputs = [tmp_path / "v0.mp4"]
    out = tmp_path / "out"
    f = _claim_file(out, inputs, inputs[0], host="another-host", pid=1, run="slow")
    os.utime(f, (time.time() - 120, time.time() - 120))
    a = Claims([_writer(out, inputs)], 60)
    real_rename, real_utime = os.rename, os.utime

    def rename(src, dst):   # between a's judgement and its move aside
        if str(src) == str(f) and str(dst).endswith(".tmp"):   # moved aside
            real_utime(f)      # the holder's heartbeat, just late
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    try:
        assert not a.take(str(inputs[0]))
        assert json.loads(f.read_text())["run"] == "slow"
        f.unlink()
        assert not _left_behind(out)
    finally:
        monkeypatch.undo()
        a.close()


def _taken_over(out, inputs, a):
    """``a``'s claim of inputs[0] judged stale (its heartbeat is old) and taken over by ``b``."""
    b = Claims([_writer(out, inputs)], 60)
    for f in a.files(str(inputs[0])):
        os.utime(f, (time.time() - 120, time.time() - 120))
    assert b.take(str(inputs[0]))
    return b


def test_a_release_leaves_a_claim_taken_over_by_another_run_alone(tmp_path):
    inputs = [tmp_path / "v0.mp4"]
    out = tmp_path / "out"
    a = Claims([_writer(out, inputs)], 600)
    try:
        assert a.take(str(inputs[0]))
        b = _taken_over(out, inputs, a)
        f = b.files(str(inputs[0]))[0]
        a.release(str(inputs[0]))
        assert json.loads(f.read_text())["run"] == b.me["run"]
        b.close()
        assert not _left_behind(out)
    finally:
        a.close()


def test_a_release_racing_a_takeover_puts_the_new_claim_back(tmp_path, monkeypatch):
    inputs = [tmp_path / "v0.mp4"]
    out = tmp_path / "out"
    a = Claims([_writer(out, inputs)], 600)
    f = a.files(str(inputs[0]))[0]
    real_rename = os.rename
    others = []

    def rename(src, dst):   # between a's check that the claim is its own and its move aside
        if str(src) == str(f) and str(dst).endswith(".tmp") and not others:
            monkeypatch.setattr(os, "rename", real_rename)
            others.append(_taken_over(out, inputs, a))
        return real_rename(src, dst)

    try:
        assert a.take(str(inputs[0]))
        monkeypatch.setattr(os, "rename", rename)
        a.release(str(inputs[0]))
        assert others, "the release did not move the claim aside"
        assert json.loads(f.read_text())["run"] == others[0].me["run"]
        others[0].close()
        assert not _left_behind(out)
    finally:
        monkeypatch.undo()
        a.close()


def test_the_heartbeat_stops_holding_a_claim_taken_over_and_says_it_once(tmp_path, caplog):
    inputs = [tmp_path / "v0.mp4"]
    out = tmp_path / "out"
    a = Claims([_writer(out, inputs)], 600)
    caplog.set_level(logging.WARNING, logger=claims_module.__name__)
    try:
        assert a.take(str(inputs[0]))
        b = _taken_over(out, inputs, a)
        f = b.files(str(inputs[0]))[0]
        before = f.stat().st_mtime_ns
        time.sleep(0.02)
        a.beat()
        a.beat()
        assert f.stat().st_mtime_ns == before          # b's claim is not a's to touch
        assert a.held.get(str(inputs[0])) == []
        assert sum("taken over by" in r.getMessage() for r in caplog.records) == 1, caplog.text
        b.close()
        assert not _left_behind(out)
    finally:
        a.close()


def test_a_run_killed_while_claiming_blocks_nobody(tmp_path, monkeypatch):
    """A claim is written under a temporary name and linked into place whole: a run stopped
    before the link leaves no claim; an empty claim (an older version killed between creating
    and writing it) says no holder to wait for, so it is stale after a few seconds, not after
    claim_timeout; where hard links are refused the claim is created directly."""
    import errno

    from video_features.utils import claims as claims_mod

    inputs = [tmp_path / f"v{i}.mp4" for i in range(3)]
    out = tmp_path / "out"
    a = Claims([_writer(out, inputs)], 600)
    b = Claims([_writer(out, inputs)], 600)
    try:
        real_link = os.link

        def killed(src, dst):
            raise KeyboardInterrupt("killed while claiming")
        monkeypatch.setattr(os, "link", killed)
        with pytest.raises(KeyboardInterrupt):
            a.take(str(inputs[0]))
        monkeypatch.setattr(os, "link", real_link)
        assert not _left_behind(out)
        assert b.take(str(inputs[0]))                     # nothing to wait for
        assert json.loads(b.files(str(inputs[0]))[0].read_text())["run"] == b.me["run"]

        empty = _claim_file(out, inputs, inputs[1])
        empty.write_text("")
        assert not a.take(str(inputs[1]))                 # maybe being written right now
        old = time.time() - claims_mod.UNSAID_S - 5
        os.utime(empty, (old, old))
        assert a.take(str(inputs[1]))                     # its writer is gone

        def no_links(src, dst):
            raise OSError(errno.EPERM, "hard links not supported")
        monkeypatch.setattr(os, "link", no_links)
        assert a.take(str(inputs[2]))
        f = a.files(str(inputs[2]))[0]
        assert json.loads(f.read_text())["run"] == a.me["run"]
        a.release(str(inputs[2]))
        assert not f.exists()                             # released as its own claim
    finally:
        monkeypatch.undo()
        a.close()
        b.close()
    assert not _left_behind(out)
