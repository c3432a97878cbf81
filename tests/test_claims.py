"""Work claims: two runs on one list and output folder do each input once and both end with
every output; claims of runs that are gone are taken over; claims are not left behind."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT
from video_features.utils.claims import Claims, InputQueue
from video_features.utils.config import make_config
from video_features.utils.output import HOST, OutputWriter
from video_features.utils.runner import run

PLUGIN = {"VIDEO_FEATURES_PLUGINS": "faulty=tests.faulty_extractor:FaultyExtractor"}


def _start(inputs, out, *extra):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--feature_type", "faulty", "--video_paths",
         *map(str, inputs), "--device", "cpu", "--on_extraction", "save_numpy", "--output_path",
         str(out), "--input_root", str(inputs[0].parent), "busy_seconds=0.8", *extra],
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


def _cfg(inputs, out, **kw):
    return make_config("faulty", video_paths=[str(p) for p in inputs], device="cpu",
                       on_extraction="save_numpy", output_path=str(out),
                       input_root=str(inputs[0].parent), busy_seconds=0.0, **kw)


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
