"""Consolidated outputs: one HDF5 file, tar shards, or Parquet files, instead of a few small files
per input.

``save_hdf5``        ``<output_path>/<feature_type>.h5``: one group per input, named by the
                     input's mirrored path (``folder/stem``, as the .npy layout), holding one
                     dataset per output key; the group's ``meta`` attribute is the JSON record
                     that ``<stem>_meta.json`` holds in the .npy layout. ActivityNet/BMT-style
                     code reads ``f[name]["rgb"][()]``.
``save_webdataset``  ``<output_path>/<feature_type>/shard-NNNNNN.tar`` of ``shard_size`` inputs
                     each: members ``<name>.<key>.npy`` and ``<name>.json`` (the record), the
                     WebDataset convention (a sample is the members sharing a name; dots of the
                     file stem become ``_`` so they cannot split it). Beside each tar,
                     ``shard-NNNNNN.json`` lists its samples and their records.
``save_parquet``     ``<output_path>/<feature_type>.parquet/part-NNNNNN.parquet``, one file per
                     consolidation batch, read as one table by ``pyarrow.parquet.read_table`` or
                     ``pandas.read_parquet`` on the folder. A row per input: ``name`` (as the HDF5
                     group), ``meta`` (the record, JSON) and, per output key K, ``K`` (the
                     flattened values, a list in the saved dtype) and ``K_shape``; the array is
                     ``np.asarray(row[K], dtype).reshape(row[K_shape])``. Feature lengths differ
                     per input, so Arrow's fixed-shape tensor type does not fit, and its
                     variable-shape one is not read as arrays by pandas: plain lists are.
                     Parquet files are immutable: an input recomputed with other options is
                     removed from the part that holds it (rewritten without its row, or deleted
                     when emptied) before its new row is written, so no input has two rows. All
                     parts share one schema (readers take a part's schema for the folder's): a
                     batch with a new key or a wider dtype rewrites the older parts to the
                     widened schema (values unchanged; each row's ``meta`` keeps its own dtype).

Workers never write these files. They save each input as ``save_numpy`` does (atomic files and a
record, so done detection and resuming work unchanged) under the hidden staging folder
``<output_path>/<feature_type>/.staging``; the parent process alone moves finished inputs into
the consolidated file, a batch at a time during the run and the rest at its end, holding a lock
file so that two runs on one output folder take turns. Staged files are deleted only after
their data is flushed to the HDF5 file or a shard or part has been renamed into place, so a
killed run loses nothing: the next run finds staged inputs done and consolidates them first.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from video_features.utils.output import META_KEY, OutputState, OutputWriter, atomic_write, read_meta
from video_features.utils.record import differences

log = logging.getLogger(__name__)

MODES = ("save_hdf5", "save_webdataset", "save_parquet")
STAGING = ".staging"
#: finished inputs the parent lets accumulate in staging before it consolidates them
BATCH = 64
#: array bytes of a Parquet row group (a part holds one batch; long features split it)
ROW_GROUP_BYTES = 128 << 20


def staging_root(output_path: str | None, feature_type: str) -> Path:
    return Path(output_path or ".") / feature_type / STAGING


def store_for(writer: OutputWriter) -> "HDF5Store | ShardStore | ParquetStore":
    base = Path(writer.output_path or ".")
    if writer.mode == "save_hdf5":
        return HDF5Store(base, writer.feature_type)
    if writer.mode == "save_parquet":
        return ParquetStore(base, writer.feature_type)
    return ShardStore(base, writer.feature_type, writer.shard_size)


def _name(writer: OutputWriter, video_path: str) -> str:
    """The input's name in a consolidated file: its mirrored folder and stem."""
    rel = writer.video_dir(video_path).relative_to(writer.root)
    return (rel / writer.stem(video_path)).as_posix()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".consolidate.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _staged(writer: OutputWriter) -> Iterator[tuple[str, dict, dict[str, Path]]]:
    """(input path, record, files) of every complete staged input."""
    if not writer.root.is_dir():
        return
    for meta_path in sorted(writer.root.rglob(f"*_{META_KEY}.json")):
        meta = read_meta(meta_path)
        if meta is None or "input" not in meta:
            continue
        files = {k: meta_path.parent / v["file"] for k, v in (meta.get("outputs") or {}).items()}
        if writer._file_state(meta["input"], files).status == "missing":
            continue  # damaged or half-written: its input is extracted again
        yield meta["input"], meta, files


def _remove_staged(meta_path: Path, files: Mapping[str, Path]) -> None:
    meta_path.unlink(missing_ok=True)  # first: the arrays no longer count as an output
    for path in files.values():
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # empty folders of the staging tree
        folder = meta_path.parent
        while folder.name != STAGING:
            folder.rmdir()
            folder = folder.parent


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:
        from video_features.utils.errors import ConfigError

        raise ConfigError(f"on_extraction=save_hdf5 needs h5py ({exc}); `pip install h5py`") from None
    return h5py


class HDF5Store:
    def __init__(self, output_path: Path, feature_type: str):
        self.path = output_path / f"{feature_type}.h5"
        self._records: dict[str, dict] | None = None

    def refresh(self) -> None:
        self._records = None

    def records(self) -> dict[str, dict]:
        """group name -> its stored record, read once per run."""
        if self._records is None:
            self._records = {}
            if self.path.is_file():
                h5py = _h5py()
                with h5py.File(self.path, "r") as f:
                    def visit(name: str, obj: Any) -> None:
                        if isinstance(obj, h5py.Group) and "meta" in obj.attrs:
                            self._records[name] = json.loads(obj.attrs["meta"]).get("record") or {}
                    f.visititems(visit)
        return self._records

    def add(self, items: list[tuple[str, dict, dict[str, Path]]]) -> None:
        h5py = _h5py()
        with h5py.File(self.path, "a") as f:
            for name, meta, files in items:
                if name in f:
                    del f[name]
                group = f.create_group(name)
                for key, path in files.items():
                    group.create_dataset(key, data=np.load(path, mmap_mode="r", allow_pickle=False))
                group.attrs["meta"] = json.dumps(meta, default=str)  # last: the group is whole
                if self._records is not None:
                    self._records[name] = meta.get("record") or {}
            f.flush()
        with open(self.path, "rb") as fh:
            os.fsync(fh.fileno())


class ShardStore:
    def __init__(self, output_path: Path, feature_type: str, shard_size: int):
        self.folder = output_path / feature_type
        self.shard_size = int(shard_size)
        self._records: dict[str, dict] | None = None

    def _indexes(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.json")) if self.folder.is_dir() else []

    def refresh(self) -> None:
        self._records = None

    def records(self) -> dict[str, dict]:
        if self._records is None:
            self._records = {}
            for index in self._indexes():
                info = read_meta(index) or {}
                if (index.with_suffix(".tar")).is_file():
                    for name, meta in (info.get("samples") or {}).items():
                        self._records[name] = meta.get("record") or {}
        return self._records

    def add(self, items: list[tuple[str, dict, dict[str, Path]]]) -> None:
        indexes = self._indexes()
        number = int(indexes[-1].stem.split("-")[1]) + 1 if indexes else 0
        tar_path = self.folder / f"shard-{number:06d}.tar"

        def dump(f: Any) -> None:
            with tarfile.open(fileobj=f, mode="w") as tar:
                for name, meta, files in items:
                    sample = sample_key(name)
                    for key, path in files.items():
                        tar.add(path, arcname=f"{sample}.{key}.npy")
                    data = json.dumps(meta, default=str).encode()
                    member = tarfile.TarInfo(f"{sample}.json")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))

        atomic_write(tar_path, dump)
        samples = {name: meta for name, meta, _ in items}
        text = json.dumps({"tar": tar_path.name, "samples": samples}, default=str).encode()
        atomic_write(tar_path.with_suffix(".json"), lambda f: f.write(text))  # last: shard complete
        if self._records is not None:
            self._records.update({n: m.get("record") or {} for n, m in samples.items()})


def pyarrow_modules() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or a ConfigError naming the install command."""
    from video_features.utils.errors import ConfigError

    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise ConfigError(f"on_extraction=save_parquet needs pyarrow ({exc}): "
                          "pip install pyarrow") from None
    if int(pyarrow.__version__.split(".")[0]) < 16:  # 16: float16 in Parquet, NumPy 2
        raise ConfigError(f"on_extraction=save_parquet needs pyarrow>=16, not "
                          f"{pyarrow.__version__}: pip install -U pyarrow")
    return pyarrow, pyarrow.parquet


def _list_type(pa: Any, dtype: np.dtype) -> Any:
    # "element" is the name Parquet gives list items, so written and read schemas compare equal
    return pa.list_(pa.field("element", pa.from_numpy_dtype(dtype)))


def _layout(schema: Any) -> dict[str, np.dtype]:
    """output key -> dtype of its values, from a Parquet part's schema."""
    names = set(schema.names)
    return {f.name: np.dtype(f.type.value_type.to_pandas_dtype()) for f in schema
            if f.name not in ("name", "meta") and f"{f.name}_shape" in names}


def _schema(pa: Any, layout: Mapping[str, np.dtype]) -> Any:
    fields = [pa.field("name", pa.string()), pa.field("meta", pa.string())]
    shape = _list_type(pa, np.dtype(np.int64))
    for key, dtype in layout.items():
        fields += [pa.field(key, _list_type(pa, dtype)), pa.field(f"{key}_shape", shape)]
    return pa.schema(fields)


class ParquetStore:
    def __init__(self, output_path: Path, feature_type: str):
        self.path = output_path / f"{feature_type}.parquet"
        self._records: dict[str, dict] | None = None
        #: part file name -> (its stat, {input name: record}): a part is read again only when
        #: it changed, e.g. another run on this output folder rewrote it
        self._index: dict[str, tuple[tuple[int, ...], dict[str, dict]]] = {}

    def _parts(self) -> dict[Path, dict[str, dict]]:
        """Every part and the records of its rows."""
        _, pq = pyarrow_modules()
        found = {}
        for part in sorted(self.path.glob("part-*.parquet")) if self.path.is_dir() else []:
            try:
                st = part.stat()
                stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
                cached = self._index.get(part.name)
                if cached is None or cached[0] != stamp:
                    table = pq.read_table(part, columns=["name", "meta"])
                    rows = {n: json.loads(m).get("record") or {}
                            for n, m in zip(table["name"].to_pylist(), table["meta"].to_pylist())}
                    cached = self._index[part.name] = (stamp, rows)
            except FileNotFoundError:  # another run's batch emptied it
                continue
            found[part] = cached[1]
        self._index = {p.name: self._index[p.name] for p in found}
        return found

    def refresh(self) -> None:
        self._records = None

    def records(self) -> dict[str, dict]:
        if self._records is None:
            self._records = {}
            for rows in self._parts().values():
                self._records.update(rows)
        return self._records

    def add(self, items: list[tuple[str, dict, dict[str, Path]]]) -> None:
        pa, pq = pyarrow_modules()
        parts = self._parts()  # again, under the lock: another run may have changed parts
        old = _layout(pq.read_schema(next(iter(parts)))) if parts else {}
        layout = dict(old)
        for _, meta, _ in items:
            for key, info in (meta.get("outputs") or {}).items():
                dtype = np.dtype(info["dtype"])
                layout[key] = np.result_type(layout[key], dtype) if key in layout else dtype
        schema = _schema(pa, layout)
        names = {name for name, _, _ in items}
        # old rows go first: a kill before the new part is in place leaves the input staged
        for part, rows in parts.items():
            if rows.keys() & names or layout != old:
                self._rewrite(part, rows.keys() - names, names, schema)
        numbers = [int(p.stem.split("-")[1]) for p in parts]
        self._new_part(self.path / f"part-{max(numbers, default=-1) + 1:06d}.parquet", items, schema)
        if self._records is not None:
            self._records.update({n: m.get("record") or {} for n, m, _ in items})

    def _rewrite(self, part: Path, keep: set[str], drop: set[str], schema: Any) -> None:
        """``part`` without the rows named in ``drop``, in ``schema``; deleted if none remain."""
        pa, pq = pyarrow_modules()
        if not keep:
            part.unlink(missing_ok=True)
            return
        import pyarrow.compute as pc

        dropped = pa.array(sorted(drop), pa.string())

        def dump(f: Any) -> None:
            with pq.ParquetFile(part) as source, pq.ParquetWriter(f, schema) as out:
                for i in range(source.num_row_groups):
                    table = source.read_row_group(i)
                    table = table.filter(pc.invert(pc.is_in(table["name"], dropped)))
                    columns = [table[c.name].cast(c.type) if c.name in table.column_names
                               else pa.chunked_array([pa.nulls(table.num_rows, c.type)]) for c in schema]
                    out.write_table(pa.Table.from_arrays(columns, schema=schema))

        atomic_write(part, dump)

    def _new_part(self, path: Path, items: list[tuple[str, dict, dict[str, Path]]], schema: Any) -> None:
        pa, pq = pyarrow_modules()
        layout = _layout(schema)

        def group(rows: list[tuple[str, dict, dict[str, np.ndarray]]]) -> Any:
            columns = [pa.array([n for n, _, _ in rows], pa.string()),
                       pa.array([json.dumps(m, default=str) for _, m, _ in rows], pa.string())]
            for key, dtype in layout.items():
                arrays = [a.get(key) for _, _, a in rows]
                flat = [np.asarray(x, dtype).ravel() for x in arrays if x is not None]
                offsets = np.cumsum([0] + [0 if x is None else x.size for x in arrays], dtype=np.int64)
                values = pa.array(np.concatenate(flat) if flat else np.empty(0, dtype))
                missing = np.array([x is None for x in arrays])
                columns.append(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values,
                                                        _list_type(pa, dtype), mask=pa.array(missing)))
                columns.append(pa.array([None if x is None else list(x.shape) for x in arrays],
                                        _list_type(pa, np.dtype(np.int64))))
            return pa.Table.from_arrays(columns, schema=schema)

        def dump(f: Any) -> None:
            with pq.ParquetWriter(f, schema) as out:
                rows, size = [], 0
                for name, meta, files in items:
                    arrays = {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in files.items()}
                    rows.append((name, meta, arrays))
                    size += sum(a.nbytes for a in arrays.values())
                    if size >= ROW_GROUP_BYTES:
                        out.write_table(group(rows))
                        rows, size = [], 0
                if rows:
                    out.write_table(group(rows))

        atomic_write(path, dump)


def sample_key(name: str) -> str:
    """A WebDataset sample key: the name up to the first dot of its file part is the key, so
    dots become ``_``."""
    return name.replace(".", "_")


def consolidated_state(writer: OutputWriter, video_path: str) -> OutputState:
    """Is ``video_path`` in the consolidated file, made as this run makes it?"""
    name = _name(writer, video_path)
    record = writer.store.records().get(name)
    if record is None:
        return OutputState("missing", ["no complete output"])
    diffs = differences(record, writer.record)
    return OutputState("mismatch", diffs) if diffs else OutputState("done", [])


def consolidate(writer: OutputWriter, final: bool = True) -> int:
    """Move complete staged inputs into the consolidated output; returns how many moved. A
    webdataset shard takes ``shard_size`` inputs; with ``final`` the rest makes a last, shorter
    shard."""
    if writer.mode not in MODES:
        return 0
    with _locked(Path(writer.output_path or ".") / writer.feature_type):
        staged = []
        for video_path, meta, files in _staged(writer):
            name = _name(writer, video_path)
            staged.append((name, meta, files, writer.meta_path(video_path)))
        moved = 0
        step = writer.shard_size if writer.mode == "save_webdataset" else BATCH
        for start in range(0, len(staged), step):
            part = staged[start:start + step]
            if len(part) < step and writer.mode == "save_webdataset" and not final:
                break
            writer.store.add([(n, m, f) for n, m, f, _ in part])
            for _, _, files, meta_path in part:
                _remove_staged(meta_path, files)
            moved += len(part)
    if moved:
        log.info("%s: %d input(s) consolidated into %s", writer.feature_type, moved,
                 getattr(writer.store, "path", None) or writer.store.folder)
    return moved


def read_hdf5(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """All inputs of an HDF5 output: name -> {key: array} (for small files and tests)."""
    h5py = _h5py()
    out: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Group) and "meta" in obj.attrs:
                out[name] = {k: obj[k][()] for k in obj.keys() if isinstance(obj[k], h5py.Dataset)}
        f.visititems(visit)
    return out


def read_parquet(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """All inputs of a Parquet output folder: name -> {key: array} (for small outputs and tests)."""
    _, pq = pyarrow_modules()
    table = pq.read_table(path)
    out: dict[str, dict[str, np.ndarray]] = {}
    for i, name in enumerate(table["name"].to_pylist()):
        arrays = {}
        for key, dtype in _layout(table.schema).items():
            values = table[key][i]
            if values.is_valid:
                shape = table[f"{key}_shape"][i].as_py()
                flat = values.values.to_numpy(zero_copy_only=False)
                arrays[key] = flat.astype(dtype, copy=False).reshape(shape)
        out[name] = arrays
    return out


def atomic_json(path: Path, value: Any) -> None:
    text = json.dumps(value, default=str).encode()
    atomic_write(path, lambda f: f.write(text))
