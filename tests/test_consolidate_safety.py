"""Consolidated outputs under ordinary dataset layouts, races and kills: symlinked inputs, names
that nest, recomputed inputs, two runs on one folder, a worker rewriting an input while it is
moved, damaged files, a kill while Parquet parts widen, and real ``kill -9``s of a consolidating
process at many points for all three formats."""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.consolidate_child import SHARD, stage, writer
from video_features.utils import consolidate as cons
from video_features.utils.config import make_config
from video_features.utils.consolidate import (ParquetStore, Staged, hdf5_key, read_hdf5,
                                              read_parquet, read_webdataset, sample_key,
                                              store_for)
from video_features.utils.runner import run

ROOT = Path(__file__).resolve().parent.parent
MODES = ("save_hdf5", "save_webdataset", "save_parquet")


@pytest.fixture(scope="module")
def clip_files(make_video):
    return [make_video(f"safe{i}.mp4", n_frames=3 + i, width=32, height=32, seed=i) for i in range(3)]


def _cfg(paths, out, root, mode, **kw):
    return make_config("null", video_paths=[str(p) for p in paths], device="cpu",
                       output_path=str(out), input_root=str(root), progress=False,
                       on_extraction=mode, shard_size=2, **kw)


def _read(out: Path, mode: str) -> dict[str, dict[str, np.ndarray]]:
    """What a reader of the consolidated output gets, name -> arrays; no name twice."""
    if mode == "save_hdf5":
        return read_hdf5(out / "null.h5")
    if mode == "save_parquet":
        names = pq.read_table(out / "null.parquet", columns=["name"])["name"].to_pylist()
        assert len(names) == len(set(names)), names
        return read_parquet(out / "null.parquet")
    return read_webdataset(out / "null")


def _npy(out: Path, name: str) -> dict[str, np.ndarray]:
    folder = out / "null" / Path(name).parent
    stem = Path(name).name
    return {k: np.load(folder / f"{stem}_{k}.npy") for k in ("null", "fps", "timestamps_ms")}


def _nothing_staged(out: Path) -> None:
    assert not [p for p in (out / "null" / ".staging").rglob("*") if p.is_file()]


# -- 1. symlinked inputs -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_symlinked_inputs_reach_the_output_under_their_own_name(tmp_path, clip_files, mode):
    data = tmp_path / "data"
    (data / "clips").mkdir(parents=True)
    (data / "links").mkdir()
    for i, c in enumerate(clip_files[:2]):
        shutil.copy(c, data / "clips" / f"c{i}.mp4")
    (data / "links" / "alpha.mp4").symlink_to("../clips/c1.mp4")
    os.symlink(data, tmp_path / "mnt")   # the dataset also reached through a symlinked folder
    inputs = [data / "clips/c0.mp4", data / "clips/c1.mp4", data / "links/alpha.mp4"]
    ref = tmp_path / "npy"
    assert run(_cfg(inputs, ref, data, "save_numpy")).count("done") == 3
    out = tmp_path / "out"
    assert run(_cfg(inputs, out, data, mode)).count("done") == 3
    got = _read(out, mode)
    assert set(got) == {"clips/c0", "clips/c1", "links/alpha"}
    for name, arrays in got.items():
        for key, value in _npy(ref, name).items():
            np.testing.assert_array_equal(arrays[key], value)
    _nothing_staged(out)
    # the same files given through the symlinked folder are the same inputs: all skipped
    again = run(_cfg([tmp_path / "mnt" / p.relative_to(data) for p in inputs], out, data, mode))
    assert again.count("skipped") == 3 and again.count("done") == 0


# -- 2. names that nest --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_an_input_named_like_a_folder_of_inputs_loses_nothing(tmp_path, clip_files, mode):
    data = tmp_path / "data"
    (data / "clips").mkdir(parents=True)
    shutil.copy(clip_files[0], data / "clips.mp4")
    shutil.copy(clip_files[1], data / "clips" / "c0.mp4")
    shutil.copy(clip_files[2], data / "clips" / "null.mp4")   # "null" is also an output key
    inputs = [data / "clips/c0.mp4", data / "clips.mp4", data / "clips/null.mp4"]
    ref = tmp_path / "npy"
    assert run(_cfg(inputs, ref, data, "save_numpy")).count("done") == 3
    out = tmp_path / "out"
    assert run(_cfg(inputs, out, data, mode)).count("done") == 3
    # recomputing the input named like the folder must not touch the others
    assert run(_cfg(inputs[1:2], out, data, mode, extraction_fps=5)).count("done") == 1
    got = _read(out, mode)
    assert set(got) == {"clips", "clips/c0", "clips/null"}
    for name in ("clips/c0", "clips/null"):
        for key, value in _npy(ref, name).items():
            np.testing.assert_array_equal(got[name][key], value)
    assert run(_cfg(inputs[:1] + inputs[2:], out, data, mode)).count("skipped") == 2


def test_an_input_missing_a_key_in_the_hdf5_output_is_not_done(tmp_path, clip_files):
    out = tmp_path / "out"
    root = Path(clip_files[0]).parent
    assert run(_cfg(clip_files[:2], out, root, "save_hdf5")).count("done") == 2
    part, = (out / "null").glob("part-*.h5")
    with h5py.File(part, "a") as f:
        del f[Path(clip_files[0]).stem]["timestamps_ms"]
    summary = run(_cfg(clip_files[:2], out, root, "save_hdf5"))
    assert summary.count("done") == 1 and summary.count("skipped") == 1
    assert set(read_hdf5(out / "null.h5")[Path(clip_files[0]).stem]) == {"null", "fps", "timestamps_ms"}


# -- 3. WebDataset: one live sample per input ----------------------------------------------------
def test_webdataset_keeps_one_sample_per_input(tmp_path, clip_files, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(clip_files[0], data / "a.b.mp4")
    shutil.copy(clip_files[1], data / "a_b.mp4")
    shutil.copy(clip_files[2], data / "c.mp4")
    inputs = [data / "a.b.mp4", data / "a_b.mp4", data / "c.mp4"]
    out = tmp_path / "out"
    assert run(_cfg(inputs, out, data, "save_webdataset")).count("done") == 3
    assert sample_key("a.b") == "a%2Eb" != sample_key("a_b")
    first = _read(out, "save_webdataset")
    assert set(first) == {"a.b", "a_b", "c"}
    assert len(first["a.b"]["null"]) != len(first["a_b"]["null"])
    # recomputed with other options: its old sample leaves its shard
    assert run(_cfg(inputs[:1], out, data, "save_webdataset", extraction_fps=5)).count("done") == 1
    got = _read(out, "save_webdataset")
    assert set(got) == {"a.b", "a_b", "c"} and len(got["a.b"]["null"]) != len(first["a.b"]["null"])
    # a kill after a shard landed but before its staged inputs were removed
    monkeypatch.setattr(Staged, "remove", lambda self: None)
    assert run(_cfg(inputs[2:], out, data, "save_webdataset", extraction_fps=5)).count("done") == 1
    monkeypatch.undo()
    assert list((out / "null" / ".staging").rglob("*_meta.json"))
    summary = run(_cfg(inputs[2:], out, data, "save_webdataset", extraction_fps=5))
    assert summary.count("skipped") == 1
    assert set(_read(out, "save_webdataset")) == {"a.b", "a_b", "c"}
    _nothing_staged(out)


# -- 4. two runs on one HDF5 folder --------------------------------------------------------------
def test_planning_and_reading_while_another_process_consolidates(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    w = writer("save_hdf5", str(out), str(root))
    for i in range(4):
        stage(w, str(root / f"v{i}.mp4"), 1, rows=64)
    cons.consolidate(w)
    child = subprocess.Popen([sys.executable, "-m", "tests.consolidate_child", "save_hdf5",
                              str(out), str(root), "6"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout.readline().strip() == "go"
    looks = 0
    while child.poll() is None:
        mine = writer("save_hdf5", str(out), str(root))
        for i in range(4):
            assert mine.state(str(root / f"v{i}.mp4"), ["null", "fps"]).status == "done"
        with h5py.File(out / "null.h5", "r") as f:   # the index, as a reader opens it
            for i in range(4):
                assert (f[f"v{i}"]["null"][()] == 1).all()
        cons.consolidate(mine)   # and take turns moving inputs in
        looks += 1
    assert child.returncode == 0, child.stderr.read()[-2000:]
    assert looks >= 5
    cons.consolidate(w)
    got = read_hdf5(out / "null.h5")
    assert {f"v{i}" for i in range(4)} | {f"mine{i}" for i in range(SHARD)} == set(got)


# -- 5. a worker rewrites an input while it is being moved ---------------------------------------
def _version_in_store(out: Path, mode: str, name: str) -> tuple[int, int]:
    """(version the record says, version the arrays hold) of ``name`` in the output."""
    w = writer(mode, str(out), str(out))
    entry = store_for(w).entries()[name]
    if mode == "save_hdf5":
        with h5py.File(entry.part, "r") as f:
            g = f[hdf5_key(name)]
            return json.loads(g.attrs["meta"])["extraction"]["v"], int(g["null"][0, 0])
    if mode == "save_parquet":
        table = pq.read_table(entry.part).to_pylist()
        row, = [r for r in table if r["name"] == name]
        return json.loads(row["meta"])["extraction"]["v"], int(row["null"][0])
    index = json.loads(entry.part.read_text())
    key = index["keys"][name]
    with tarfile.open(entry.part.with_suffix(".tar")) as tar:
        meta = json.loads(tar.extractfile(f"{key}.json").read())
        return meta["extraction"]["v"], int(np.load(io.BytesIO(tar.extractfile(f"{key}.null.npy").read()))[0, 0])


def _one_shard_staged(tmp_path: Path, mode: str):
    """A shard's worth of inputs (v0, v1, ...) staged at version 1: (output folder, writer,
    input paths)."""
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    w = writer(mode, str(out), str(root))
    paths = [str(root / f"v{i}.mp4") for i in range(SHARD)]
    for p in paths:
        stage(w, p, 1, rows=4)
    return out, w, paths


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("when", ["after_read", "before_remove"])
def test_a_recomputation_racing_the_move_is_kept(tmp_path, monkeypatch, mode, when):
    out, w, paths = _one_shard_staged(tmp_path, mode)
    hooked = {"done": False}

    def worker_rewrites():
        if not hooked["done"]:
            hooked["done"] = True
            stage(w, paths[0], 2, rows=5)   # a worker of another run recomputes v0

    if when == "after_read":
        real = Staged.read

        def read(cls, name, meta_path, **kw):
            item = real(name, meta_path, **kw)
            if name == "v0":
                worker_rewrites()
            return item
        monkeypatch.setattr(Staged, "read", classmethod(read))
    else:
        real_remove = Staged.remove

        def remove(self):
            if self.name == "v0":
                worker_rewrites()
            real_remove(self)
        monkeypatch.setattr(Staged, "remove", remove)
    cons.consolidate(w)
    assert hooked["done"]
    # version 2 is still staged, whole; whatever landed is consistent (record = arrays)
    assert w.state(paths[0], ["null", "fps"]).status == "done"
    staged = Staged.read("v0", w.meta_path(paths[0]))
    assert staged is not None and staged.meta["extraction"]["v"] == 2
    if when == "before_remove":
        assert _version_in_store(out, mode, "v0") == (1, 1)
    monkeypatch.undo()
    cons.consolidate(w)
    assert _version_in_store(out, mode, "v0") == (2, 2)
    assert sorted(_read(out, mode)) == ["v0", "v1", "v2"]
    _nothing_staged(out)


class _Killed(BaseException):
    """Stands for a kill: nothing after it runs."""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("deleted", [0, 1, 2])
def test_a_kill_during_the_clean_up_leaves_nothing_behind(tmp_path, monkeypatch, mode, deleted):
    """Killed after ``deleted`` of a landed input's staged files were deleted: the next
    consolidation finishes the clean-up, whatever file it stopped at."""
    out, w, paths = _one_shard_staged(tmp_path, mode)
    real, calls = cons._remove_if_same, []

    def remove_if_same(path, ident):
        if len(calls) == deleted:
            raise _Killed
        calls.append(path.name)
        real(path, ident)
    monkeypatch.setattr(cons, "_remove_if_same", remove_if_same)
    with pytest.raises(_Killed):
        cons.consolidate(w)
    monkeypatch.undo()
    left = sorted(p.name for p in (out / "null" / ".staging").rglob("*") if p.is_file())
    assert "v0_meta.json" in left   # the record is the last file deleted
    assert w.state(paths[0], ["null", "fps"]).status == "done"
    cons.consolidate(w)
    _nothing_staged(out)
    got = _read(out, mode)
    assert sorted(got) == ["v0", "v1", "v2"]
    assert all((got[n]["null"] == 1).all() for n in got)


# -- 6. damaged files ----------------------------------------------------------------------------
def _legacy_h5(path: Path, names: list[str], root: Path, good_meta: dict) -> None:
    """An HDF5 output as earlier versions wrote it: groups nested by folder, in the file."""
    with h5py.File(path, "w") as f:
        for name in names:
            g = f.create_group(name)
            g.create_dataset("null", data=np.full((2, 3), 7, np.float32))
            g.create_dataset("fps", data=np.array(25.0))
            g.create_dataset("timestamps_ms", data=np.zeros((2, 2)))
            g.attrs["meta"] = json.dumps(good_meta)


def test_an_hdf5_file_of_an_earlier_version_is_taken_over_and_a_damaged_one_moved_aside(
        tmp_path, clip_files, caplog):
    root = Path(clip_files[0]).parent
    out = tmp_path / "out"
    ref = run(_cfg(clip_files, tmp_path / "first", root, "save_hdf5"))
    assert ref.count("done") == 3
    part, = (tmp_path / "first" / "null").glob("part-*.h5")
    with h5py.File(part, "r") as f:
        meta = json.loads(f[Path(clip_files[0]).stem].attrs["meta"])
    # a file of an earlier version holding two of the three inputs
    out.mkdir()
    _legacy_h5(out / "null.h5", [Path(c).stem for c in clip_files[:2]], root, meta)
    summary = run(_cfg(clip_files, out, root, "save_hdf5"))
    assert summary.count("skipped") == 2 and summary.count("done") == 1
    got = read_hdf5(out / "null.h5")
    assert set(got) == {Path(c).stem for c in clip_files}
    assert (got[Path(clip_files[0]).stem]["null"] == 7).all()   # kept, not recomputed
    # the top file is now only an index; garbage in its place is moved aside, nothing is lost
    (out / "null.h5").write_bytes(b"not an hdf5 file" * 100)
    with caplog.at_level("ERROR"):
        again = run(_cfg(clip_files, out, root, "save_hdf5"))
    assert again.count("skipped") == 3
    assert "null.h5 cannot be read" in caplog.text and "moved to null.h5.damaged-" in caplog.text
    assert set(read_hdf5(out / "null.h5")) == set(got)
    # a damaged part: moved aside, its inputs extracted again
    for p in (out / "null").glob("part-*.h5"):
        p.write_bytes(p.read_bytes()[:300])
    caplog.clear()
    with caplog.at_level("ERROR"):
        third = run(_cfg(clip_files, out, root, "save_hdf5"))
    assert third.count("done") == 3 and "cannot be read" in caplog.text
    assert list((out / "null").glob("part-*.h5.damaged-*"))
    assert set(read_hdf5(out / "null.h5")) == set(got)


def test_a_truncated_hdf5_file_of_an_earlier_version_keeps_what_can_be_read(tmp_path, clip_files):
    root = Path(clip_files[0]).parent
    out = tmp_path / "out"
    out.mkdir()
    meta = {"record": {}, "outputs": {}}
    _legacy_h5(out / "null.h5", [f"x{i}" for i in range(40)], root, meta)
    data = (out / "null.h5").read_bytes()
    (out / "null.h5").write_bytes(data[: len(data) * 2 // 3])   # killed mid-append
    summary = run(_cfg(clip_files, out, root, "save_hdf5"))
    assert summary.count("done") == 3 and not summary.errors
    got = read_hdf5(out / "null.h5")
    assert {Path(c).stem for c in clip_files} <= set(got)
    assert list(out.glob("null.h5.damaged-*"))


# -- 7. a kill while Parquet parts widen ---------------------------------------------------------
def test_parquet_parts_left_with_mixed_types_are_widened(tmp_path, monkeypatch):
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    half = writer("save_parquet", str(out), str(root))
    half.dtype = "float16"
    for i in range(2):   # two float16 parts
        stage(half, str(root / f"h{i}.mp4"), 3, rows=2)
        cons.consolidate(half)
    real = ParquetStore._rewrite
    calls = []

    def killed_after_one(self, part, drop, layout):
        if calls:
            raise KeyboardInterrupt("killed while widening")
        calls.append(part)
        real(self, part, drop, layout)
    monkeypatch.setattr(ParquetStore, "_rewrite", killed_after_one)
    full = writer("save_parquet", str(out), str(root))
    stage(full, str(root / "f.mp4"), 4, rows=2)
    with pytest.raises(KeyboardInterrupt):
        cons.consolidate(full)
    schemas = {str(pq.read_schema(p).field("null").type) for p in (out / "null.parquet").glob("*.parquet")}
    assert len(schemas) == 2   # the condition: one part widened, one not
    monkeypatch.undo()
    cons.consolidate(writer("save_parquet", str(out), str(root)))
    parts = sorted((out / "null.parquet").glob("*.parquet"))
    assert {str(pq.read_schema(p)) for p in parts} == {str(pq.read_schema(parts[0]))}
    got = read_parquet(out / "null.parquet")
    assert sorted(got) == ["f", "h0", "h1"]
    assert got["h0"]["null"].dtype == np.float32 and (got["h0"]["null"] == 3).all()
    assert (got["f"]["null"] == 4).all()


# -- 6. real kill -9 of a consolidating process, many times, every format ------------------------
def _check_invariant(out: Path, mode: str, root: Path, latest: dict[str, int]) -> None:
    """Every file opens; every input's latest version is staged whole or consolidated (with
    the record matching the arrays); no input is in two parts (HDF5: every link of the index
    resolves to a whole copy; an older copy may wait in its part until the index moved on)."""
    w = writer(mode, str(out), str(root))
    store = store_for(w)
    parts = store.parts()
    assert not store._failed, store._failed
    seen: dict[str, Path] = {}
    for part, rows in parts.items():
        for name in rows:
            assert mode == "save_hdf5" or name not in seen, f"{name} in {seen[name].name} and {part.name}"
            seen[name] = part
    if mode == "save_hdf5" and (out / "null.h5").exists():
        with h5py.File(out / "null.h5", "r") as f:
            assert cons.INDEX_ATTR in f.attrs
            for key in f:
                g = f[key]
                assert json.loads(g.attrs["meta"])["extraction"]["v"] == int(g["null"][0, 0])
    for name, version in latest.items():
        staged = Staged.read(name, w.meta_path(str(root / f"{name}.mp4")))
        if staged is not None and staged.meta["extraction"]["v"] == version:
            continue
        assert name in seen, f"{name} (version {version}) is neither staged nor consolidated"
        assert _version_in_store(out, mode, name) == (version, version)


@pytest.mark.parametrize("mode", MODES)
def test_kill_9_while_consolidating_loses_and_doubles_nothing(tmp_path, mode):
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    w = writer(mode, str(out), str(root))
    rng = random.Random(mode)
    latest = {f"v{i:02d}": 1 for i in range(9)}
    for name in latest:
        stage(w, str(root / f"{name}.mp4"), 1)
    kills = 0
    while kills < 20:
        child = subprocess.Popen([sys.executable, "-m", "tests.consolidate_child", mode, str(out),
                                  str(root)], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert child.stdout.readline().strip() == "go"
        time.sleep(rng.uniform(0.0, 0.15))
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            kills += 1
        child.wait()
        _check_invariant(out, mode, root, latest)
        for name in rng.sample(sorted(latest), 3):   # recomputed: a newer version is staged
            latest[name] += 1
            stage(w, str(root / f"{name}.mp4"), latest[name])
    cons.consolidate(writer(mode, str(out), str(root)))
    _check_invariant(out, mode, root, latest)
    got = _read(out, mode)
    assert set(got) == set(latest)
    for name, version in latest.items():
        assert (got[name]["null"] == version).all()
    _nothing_staged(out)
    assert not [p for p in out.rglob("*.tmp")]
