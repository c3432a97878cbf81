"""Consolidated outputs: save_hdf5 (one file, a group per input) and save_webdataset (tar
shards), against the save_numpy layout of the same run; resuming, recomputing on other options,
inputs a killed run left staged, two runs sharing one output folder, and dtype=float16."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from video_features.utils.config import make_config
from video_features.utils.consolidate import read_hdf5
from video_features.utils.output import OutputWriter
from video_features.utils.record import run_record
from video_features.utils.runner import run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def videos(make_video):
    return [make_video(f"cons{i}.mp4", n_frames=4 + i, width=64, height=48, seed=i) for i in range(3)]


def _cfg(videos, out, **kw):
    base = dict(video_paths=[str(v) for v in videos], device="cpu", output_path=str(out),
                input_root=str(Path(videos[0]).parent.parent), progress=False)
    base.update(kw)
    return make_config("null", **base)


def _numpy_outputs(videos, tmp_path) -> dict[str, dict[str, np.ndarray]]:
    out = tmp_path / "npy"
    assert run(_cfg(videos, out, on_extraction="save_numpy")).count("done") == len(videos)
    result = {}
    for v in videos:
        stem = Path(v).stem
        folder = out / "null" / Path(v).parent.name
        result[f"{Path(v).parent.name}/{stem}"] = {
            k: np.load(folder / f"{stem}_{k}.npy") for k in ("null", "fps", "timestamps_ms")}
    return result


def test_hdf5_holds_what_save_numpy_writes_and_resumes(videos, tmp_path):
    expect = _numpy_outputs(videos, tmp_path)
    out = tmp_path / "h5"
    summary = run(_cfg(videos, out, on_extraction="save_hdf5"))
    assert summary.count("done") == 3
    got = read_hdf5(out / "null.h5")
    assert set(got) == set(expect)
    for name, arrays in expect.items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(got[name][key], value)
    with h5py.File(out / "null.h5", "r") as f:
        meta = json.loads(f[next(iter(expect))].attrs["meta"])
    assert meta["record"]["feature_type"] == "null" and meta["outputs"]["null"]["shape"]
    staging = out / "null" / ".staging"
    assert not list(staging.rglob("*.npy")) and not list(staging.rglob("*_meta.json"))
    # a second run finds everything in the file
    again = run(_cfg(videos, out, on_extraction="save_hdf5"))
    assert again.count("skipped") == 3 and again.count("done") == 0
    # another frame rate changes the values: recomputed, and its group replaced
    fps = run(_cfg(videos[:1], out, on_extraction="save_hdf5", extraction_fps=10))
    assert fps.count("done") == 1
    name = f"{Path(videos[0]).parent.name}/{Path(videos[0]).stem}"
    replaced = read_hdf5(out / "null.h5")[name]
    assert len(replaced["null"]) != len(expect[name]["null"])
    assert len(read_hdf5(out / "null.h5")) == 3


def test_inputs_a_killed_run_left_staged_are_consolidated_not_recomputed(videos, tmp_path):
    out = tmp_path / "h5"
    cfg = _cfg(videos, out, on_extraction="save_hdf5")
    # what a run killed before its final move leaves: one complete staged input
    writer = OutputWriter.from_config(cfg, run_record(cfg))
    feats = {"null": np.ones((3, 3), np.float32), "fps": np.array(25.0),
             "timestamps_ms": np.arange(3.0) * 40}
    writer.write(str(videos[0]), feats)
    summary = run(cfg)
    assert summary.count("skipped") == 1 and summary.count("done") == 2
    got = read_hdf5(out / "null.h5")
    name = f"{Path(videos[0]).parent.name}/{Path(videos[0]).stem}"
    np.testing.assert_array_equal(got[name]["null"], feats["null"])  # the staged one, kept
    assert len(got) == 3


def test_webdataset_shards_of_shard_size_inputs(videos, tmp_path):
    expect = _numpy_outputs(videos, tmp_path)
    out = tmp_path / "wds"
    assert run(_cfg(videos, out, on_extraction="save_webdataset", shard_size=2)).count("done") == 3
    tars = sorted((out / "null").glob("shard-*.tar"))
    assert [t.name for t in tars] == ["shard-000000.tar", "shard-000001.tar"]
    samples: dict[str, dict] = {}
    for t in tars:
        with tarfile.open(t) as tar:
            for m in tar.getmembers():
                sample, _, rest = m.name.partition(".")
                data = tar.extractfile(m).read()
                samples.setdefault(sample, {})[rest] = data
        index = json.loads(t.with_suffix(".json").read_text())
        assert index["tar"] == t.name and len(index["samples"]) in (1, 2)
    assert set(samples) == set(expect)
    for name, arrays in expect.items():
        assert json.loads(samples[name]["json"])["record"]["feature_type"] == "null"
        for key, value in arrays.items():
            np.testing.assert_array_equal(np.load(io.BytesIO(samples[name][f"{key}.npy"])), value)
    assert run(_cfg(videos, out, on_extraction="save_webdataset", shard_size=2)).count("skipped") == 3


def test_float16_features_keep_float64_times(videos, tmp_path):
    expect = _numpy_outputs(videos[:1], tmp_path)
    out = tmp_path / "half"
    assert run(_cfg(videos[:1], out, on_extraction="save_hdf5", dtype="float16")).count("done") == 1
    (name, arrays), = read_hdf5(out / "null.h5").items()
    assert arrays["null"].dtype == np.float16 and arrays["timestamps_ms"].dtype == np.float64
    np.testing.assert_array_equal(arrays["null"], expect[name]["null"].astype(np.float16))
    # float32 outputs are not float16 ones: recomputed
    assert run(_cfg(videos[:1], out, on_extraction="save_hdf5")).count("done") == 1


def test_two_runs_into_one_output_folder_lose_nothing(videos, tmp_path):
    out = tmp_path / "shared"
    procs = []
    for v in videos[:2]:
        cmd = [sys.executable, str(REPO / "main.py"), "--feature_type", "null", "--device", "cpu",
               "--video_paths", str(v), "--on_extraction", "save_hdf5", "--output_path", str(out),
               f"input_root={Path(v).parent.parent}", "progress=false"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    assert len(read_hdf5(out / "null.h5")) == 2


def test_missing_h5py_is_a_clear_error(monkeypatch, tmp_path, videos):
    import builtins

    real = builtins.__import__

    def no_h5py(name, *a, **k):
        if name == "h5py":
            raise ImportError("No module named 'h5py'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_h5py)
    from video_features.utils.errors import ConfigError
    with pytest.raises(ConfigError, match="pip install h5py"):
        _cfg(videos[:1], tmp_path / "x", on_extraction="save_hdf5")
