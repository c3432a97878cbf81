"""Output records: outputs are reused only when made the same way; temporary files of live
writers are never removed; done detection reads headers, not arrays."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from video_features.utils.config import make_config
from video_features.utils.output import HOST, OutputWriter, remove_abandoned_temps
from video_features.utils.runner import run


def _cfg(video: Path, out: Path, **kw):
    base = dict(video_paths=[str(video)], device="cpu", model_name="resnet18", batch_size=4,
                on_extraction="save_numpy", output_path=str(out), input_root=str(video.parent))
    base.update(kw)
    return make_config("resnet", **base)


def test_outputs_made_with_other_options_or_weights_are_not_reused(tmp_path, make_video,
                                                                   resnet_weights):
    resnet_weights("resnet18")
    resnet_weights("resnet50")
    video = make_video("rec.mp4", n_frames=6, fps=25.0, width=64, height=48)
    out = tmp_path / "out"
    feats = out / "resnet" / "rec_resnet.npy"

    s1 = run(_cfg(video, out))
    assert s1.count("done") == 1 and np.load(feats).shape == (6, 512)
    meta = json.loads((out / "resnet" / "rec_meta.json").read_text())
    assert meta["record"]["options"]["model_name"] == "resnet18"
    assert meta["record"]["checkpoints"]["resnet"]["sha256"]
    assert meta["outputs"]["resnet"]["shape"] == [6, 512]
    assert "video_paths" not in meta["config"] and meta["config"]["batch_size"] == 4

    # same options: skipped; another model: recomputed, not "skipped" with 512-wide features
    assert run(_cfg(video, out)).count("skipped") == 1
    s2 = run(_cfg(video, out, model_name="resnet50"))
    assert s2.count("done") == 1 and np.load(feats).shape == (6, 2048)
    # another frame rate: recomputed too
    s3 = run(_cfg(video, out, model_name="resnet50", extraction_fps=10.0))
    assert s3.count("done") == 1 and len(np.load(feats)) == 2

    # the user may prefer a refusal that names what differs
    s4 = run(_cfg(video, out, model_name="resnet50", on_mismatch="refuse"))
    assert s4.count("failed") == 1 and s4.exit_code == 1
    reason = s4.failed[0].reason
    assert "extraction_fps 10.0 -> None" in reason and "on_mismatch=recompute" in reason
    assert len(np.load(feats)) == 2  # refused: the existing outputs are untouched

    # other weights under the same name (an explicit checkpoint) are a mismatch as well
    other = tmp_path / "other50.pth"
    from video_features.models.resnet.weights import write_random_checkpoint

    write_random_checkpoint(other, "resnet50", seed=7)
    s5 = run(_cfg(video, out, model_name="resnet50", extraction_fps=10.0,
                  checkpoint_path=str(other), on_mismatch="refuse"))
    assert s5.count("failed") == 1 and "checkpoint resnet" in s5.failed[0].reason
    # random weights are never taken for the real ones
    s6 = run(_cfg(video, out, model_name="resnet50", extraction_fps=10.0,
                  allow_random_weights=True, on_mismatch="refuse"))
    assert "random weights" in s6.failed[0].reason


def test_a_changed_revision_is_recomputed(tmp_path, make_video, resnet_weights, monkeypatch):
    from video_features.models.resnet.extractor import ResNetExtractor

    resnet_weights("resnet18")
    video = make_video("rev.mp4", n_frames=4, fps=25.0, width=64, height=48)
    out = tmp_path / "out"
    assert run(_cfg(video, out)).count("done") == 1
    monkeypatch.setattr(ResNetExtractor, "revision", ResNetExtractor.revision + 1)
    s = run(_cfg(video, out, on_mismatch="refuse"))
    assert "revision 1 -> 2" in s.failed[0].reason


def test_done_detection_reads_headers_only(tmp_path, monkeypatch):
    w = OutputWriter("save_numpy", str(tmp_path), "resnet", input_root=str(tmp_path))
    video = str(tmp_path / "v.mp4")
    feats = {"resnet": np.ones((300, 2048), np.float32), "fps": np.array(25.0)}
    paths = w.write(video, feats)

    def no_load(*a, **k):
        raise AssertionError("np.load called by done detection")

    monkeypatch.setattr(np, "load", no_load)
    assert w.state(video, feats).status == "done"
    # same size, other header (a file replaced behind our back): not done
    arr = paths[0]
    data = bytearray(arr.read_bytes())
    i = data.index(b"(300, 2048)")
    data[i:i + 11] = b"(2048, 300)"
    arr.write_bytes(bytes(data))
    assert w.state(video, feats).status == "missing"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_only_temporary_files_of_dead_writers_are_removed(tmp_path):
    folder = tmp_path / "resnet"
    folder.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        # another live writer of clip1's file, a dead writer of it, and a live one on another host
        live_tmp = folder / f".clip1_resnet.npy.{HOST}.{live.pid}.abcd1234.tmp"
        dead_tmp = folder / f".clip1_resnet.npy.{HOST}.{dead}.efgh5678.tmp"
        other_host = folder / f".clip1_resnet.npy.elsewhere.example.{dead}.ijkl9012.tmp"
        for p in (live_tmp, dead_tmp, other_host):
            p.write_bytes(b"partial")
        # writing clip[1]'s outputs: '[1]' is a glob class that matched 'clip1' before
        w = OutputWriter("save_numpy", str(tmp_path), "resnet", input_root=str(tmp_path))
        w.write(str(tmp_path / "clip[1].mp4"), {"resnet": np.zeros((2, 3), np.float32)})
        assert live_tmp.exists() and dead_tmp.exists() and other_host.exists()
        assert (folder / "clip[1]_resnet.npy").exists()
        # writing clip1's own outputs removes only the dead writer's file on this host
        w.write(str(tmp_path / "clip1.mp4"), {"resnet": np.zeros((2, 3), np.float32)})
        assert live_tmp.exists() and other_host.exists() and not dead_tmp.exists()
        assert remove_abandoned_temps(folder / "clip1_resnet.npy") == []
    finally:
        live.kill()
        live.wait()
    # once its writer is gone, the file is abandoned and goes too
    assert remove_abandoned_temps(folder / "clip1_resnet.npy") == [live_tmp]


def test_two_writers_of_one_file_keep_each_others_temporary_files(tmp_path):
    """A second process writing the same output never deletes the first one's temporary file."""
    folder = tmp_path / "resnet"
    folder.mkdir()
    code = (
        "import sys, time, numpy as np; from pathlib import Path; "
        "from video_features.utils.output import atomic_write; "
        "atomic_write(Path(sys.argv[1]), lambda f: (f.write(b'x' * 10), time.sleep(3)))")
    target = folder / "v_resnet.npy"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    slow = subprocess.Popen([sys.executable, "-c", code, str(target)], env=env)
    import time

    deadline = time.time() + 30
    while time.time() < deadline and not [p for p in folder.iterdir() if p.name.endswith(".tmp")]:
        time.sleep(0.05)
    w = OutputWriter("save_numpy", str(tmp_path), "resnet", input_root=str(tmp_path))
    w.write(str(tmp_path / "v.mp4"), {"resnet": np.zeros((2, 3), np.float32)})
    assert slow.wait(timeout=30) == 0  # its rename found its temporary file in place
    assert target.read_bytes() == b"x" * 10


@pytest.mark.parametrize("ft,options,expected", [
    ("i3d", dict(streams=["rgb"], stack_size=16), {"streams", "stack_size", "flow_type", "weights",
                                                   "raft_padding", "step_size", "tail"}),
    ("vggish", dict(postprocess=True), {"postprocess", "keep_priming"}),
])
def test_value_options_cover_what_changes_features(ft, options, expected):
    from video_features.utils.config import value_options

    cfg = make_config(ft, video_paths=["a.mp4"], device="cpu", **options)
    got = value_options(cfg)
    assert expected <= set(got)
    assert {"extraction_fps", "timestamps", "tf32"} <= set(got)
    assert not {"batch_size", "video_paths", "output_path", "progress"} & set(got)
