"""Consolidated outputs: save_hdf5 (one file, a group per input), save_webdataset (tar shards)
and save_parquet (a folder of part files, a row per input), against the save_numpy layout of the
same run; resuming, recomputing on other options, inputs a killed run left staged, two runs
sharing one output folder, and dtype=float16."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from video_features.utils.config import make_config
from video_features.utils.consolidate import ParquetStore, hdf5_key, read_hdf5, read_parquet
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
        meta = json.loads(f[hdf5_key(next(iter(expect)))].attrs["meta"])
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


def _parquet_rows(folder: Path) -> dict[str, dict]:
    """name -> row of the folder read as one table; no input has two rows."""
    rows = pq.read_table(folder).to_pylist()
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names)), names
    return {r["name"]: r for r in rows}


def _array(row: dict, key: str, dtype: np.dtype) -> np.ndarray:
    """The documented way back from a row to the saved array."""
    return np.asarray(row[key], dtype).reshape(row[f"{key}_shape"])


def _value_types(folder: Path) -> dict[str, np.dtype]:
    schema = pq.read_table(folder).schema
    return {k: np.dtype(schema.field(k).type.value_type.to_pandas_dtype())
            for k in ("null", "fps", "timestamps_ms")}


def test_parquet_holds_what_save_numpy_writes_and_replaces_rows(videos, tmp_path):
    expect = _numpy_outputs(videos, tmp_path)
    out = tmp_path / "pq"
    assert run(_cfg(videos, out, on_extraction="save_parquet")).count("done") == 3
    folder = out / "null.parquet"
    assert sorted(p.name for p in folder.iterdir()) == ["part-000000.parquet"]
    types = _value_types(folder)
    assert types == {"null": np.float32, "fps": np.float64, "timestamps_ms": np.float64}
    rows = _parquet_rows(folder)
    assert set(rows) == set(expect)
    for name, arrays in expect.items():
        assert json.loads(rows[name]["meta"])["record"]["feature_type"] == "null"
        for key, value in arrays.items():
            got = _array(rows[name], key, types[key])
            assert got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(got, value)
    helper = read_parquet(folder)
    for name, arrays in expect.items():
        for key, value in arrays.items():
            assert helper[name][key].dtype == value.dtype
            np.testing.assert_array_equal(helper[name][key], value)
    staging = out / "null" / ".staging"
    assert not list(staging.rglob("*.npy")) and not list(staging.rglob("*_meta.json"))
    # a second run finds every row and writes nothing
    again = run(_cfg(videos, out, on_extraction="save_parquet"))
    assert again.count("skipped") == 3 and again.count("done") == 0
    assert sorted(p.name for p in folder.iterdir()) == ["part-000000.parquet"]
    # another frame rate: recomputed, its old row leaves the part that held it
    assert run(_cfg(videos[:1], out, on_extraction="save_parquet", extraction_fps=10)).count("done") == 1
    assert sorted(p.name for p in folder.iterdir()) == ["part-000000.parquet", "part-000001.parquet"]
    assert pq.read_table(folder / "part-000000.parquet").num_rows == 2
    rows = _parquet_rows(folder)
    assert set(rows) == set(expect)
    name = f"{Path(videos[0]).parent.name}/{Path(videos[0]).stem}"
    assert len(_array(rows[name], "null", np.float32)) != len(expect[name]["null"])
    for other in set(expect) - {name}:
        np.testing.assert_array_equal(_array(rows[other], "null", np.float32), expect[other]["null"])
    # the replacing row is found done by a run with its options
    assert run(_cfg(videos[:1], out, on_extraction="save_parquet", extraction_fps=10)).count("skipped") == 1


def test_parquet_consolidates_inputs_a_killed_run_left_staged(videos, tmp_path):
    out = tmp_path / "pq"
    cfg = _cfg(videos, out, on_extraction="save_parquet")
    writer = OutputWriter.from_config(cfg, run_record(cfg))
    feats = {"null": np.ones((3, 3), np.float32), "fps": np.array(25.0),
             "timestamps_ms": np.arange(3.0) * 40}
    writer.write(str(videos[0]), feats)  # staged, never moved: the run was killed
    summary = run(cfg)
    assert summary.count("skipped") == 1 and summary.count("done") == 2
    rows = _parquet_rows(out / "null.parquet")
    name = f"{Path(videos[0]).parent.name}/{Path(videos[0]).stem}"
    np.testing.assert_array_equal(_array(rows[name], "null", np.float32), feats["null"])
    assert len(rows) == 3 and not list((out / "null" / ".staging").rglob("*.npy"))


def test_parquet_kill_while_replacing_a_row_loses_nothing(videos, tmp_path, monkeypatch):
    out = tmp_path / "pq"
    assert run(_cfg(videos, out, on_extraction="save_parquet")).count("done") == 3
    name = f"{Path(videos[0]).parent.name}/{Path(videos[0]).stem}"
    before = len(_parquet_rows(out / "null.parquet")[name]["null"])

    def killed(*args, **kwargs):
        raise RuntimeError("killed before the new part was renamed into place")
    # other options replace videos[0]'s row; the run dies after its old row was removed
    monkeypatch.setattr(ParquetStore, "_write_part", killed)
    fps10 = _cfg(videos[:1], out, on_extraction="save_parquet", extraction_fps=10)
    with pytest.raises(RuntimeError, match="killed"):
        run(fps10)
    rows = _parquet_rows(out / "null.parquet")
    assert name not in rows and len(rows) == 2  # its old row is gone, its new one not yet in
    assert list((out / "null" / ".staging").rglob("*_meta.json"))  # still staged
    monkeypatch.undo()
    summary = run(fps10)
    assert summary.count("skipped") == 1 and summary.count("done") == 0  # moved, not recomputed
    rows = _parquet_rows(out / "null.parquet")
    assert len(rows) == 3 and len(rows[name]["null"]) != before
    assert not list((out / "null" / ".staging").rglob("*_meta.json"))


def test_parquet_float16_features_keep_float64_times(videos, tmp_path):
    expect = _numpy_outputs(videos, tmp_path)
    out = tmp_path / "half"
    folder = out / "null.parquet"
    assert run(_cfg(videos, out, on_extraction="save_parquet", dtype="float16")).count("done") == 3
    assert _value_types(folder) == {"null": np.float16, "fps": np.float64, "timestamps_ms": np.float64}
    rows = _parquet_rows(folder)
    for name, arrays in expect.items():
        got = _array(rows[name], "null", np.float16)
        assert got.dtype == np.float16 and got.shape == arrays["null"].shape
        np.testing.assert_array_equal(got, arrays["null"].astype(np.float16))
        np.testing.assert_array_equal(_array(rows[name], "timestamps_ms", np.float64),
                                      arrays["timestamps_ms"])
    # float32 outputs are not float16 ones: recomputed; the column widens to hold both
    assert run(_cfg(videos[:1], out, on_extraction="save_parquet")).count("done") == 1
    assert _value_types(folder)["null"] == np.float32
    rows = _parquet_rows(folder)
    assert len(rows) == 3
    name = f"{Path(videos[0]).parent.name}/{Path(videos[0]).stem}"
    for other, arrays in expect.items():
        saved = arrays["null"] if other == name else arrays["null"].astype(np.float16)
        np.testing.assert_array_equal(_array(rows[other], "null", np.float32), saved)
        dtype = json.loads(rows[other]["meta"])["outputs"]["null"]["dtype"]
        assert dtype == ("<f4" if other == name else "<f2")


def test_missing_pyarrow_is_a_clear_error(monkeypatch, tmp_path, videos):
    import builtins

    from video_features.utils.errors import ConfigError

    real = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError("No module named 'pyarrow'")
        return real(name, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(builtins, "__import__", no_pyarrow)
        with pytest.raises(ConfigError, match="pip install pyarrow") as err:
            _cfg(videos[:1], tmp_path / "x", on_extraction="save_parquet")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(pa, "__version__", "15.0.2")  # no float16 in Parquet
    with pytest.raises(ConfigError, match="pyarrow>=16"):
        _cfg(videos[:1], tmp_path / "x", on_extraction="save_parquet")
