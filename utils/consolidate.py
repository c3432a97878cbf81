"""Consolidated outputs: one HDF5 file, tar shards, or Parquet files, instead of a few small files
per input.

Every input has one name, its mirrored folder and stem as in the .npy layout (``clips/c3``;
a symlinked file keeps its own name, see ``OutputWriter.video_dir``), and one live copy in the
consolidated output.

``save_hdf5``        ``<output_path>/<feature_type>.h5`` holds one entry per input: an HDF5
                     external link, resolved by h5py, to a group in one of the part files
                     ``<output_path>/<feature_type>/part-NNNNNN.h5`` (one per consolidation
                     batch). The group holds one dataset per output key; its ``meta`` attribute is
                     the JSON record that ``<stem>_meta.json`` holds in the .npy layout, its
                     ``name`` attribute the input's name. Entries sit at the top level, keyed by
                     the name with ``%`` and ``/`` percent-escaped (``clips/c3`` is
                     ``clips%2Fc3``), so ``clips.mp4`` and ``clips/c0.mp4`` cannot collide;
                     ActivityNet/BMT-style code with inputs in one folder reads
                     ``f[stem]["rgb"][()]`` as before. The top file is only an index: it is
                     rebuilt from the parts (atomically) at the end of every consolidation during
                     a run at most once a minute, and at its end.
``save_webdataset``  ``<output_path>/<feature_type>/shard-NNNNNN.tar`` of ``shard_size`` inputs
                     each: members ``<key>.<output key>.npy`` and ``<key>.json`` (the record),
                     the WebDataset convention (a sample is the members sharing a key); the key
                     is the name with ``%`` and ``.`` percent-escaped (``a.b`` is ``a%2Eb``) so
                     that no dot splits it and no two names share one. Beside each tar,
                     ``shard-NNNNNN.json`` lists its samples (name, key, record) and the tar's size.
``save_parquet``     ``<output_path>/<feature_type>.parquet/part-NNNNNN.parquet``, one file per
                     consolidation batch, read as one table by ``pyarrow.parquet.read_table`` or
                     ``pandas.read_parquet`` on the folder. A row per input: ``name``, ``meta``
                     (the record, JSON) and, per output key K, ``K`` (the flattened values, a list
                     in the saved dtype) and ``K_shape``; the array is
                     ``np.asarray(row[K], dtype).reshape(row[K_shape])``. Feature lengths differ
                     per input, so Arrow's fixed-shape tensor type does not fit, and its
                     variable-shape one is not read as arrays by pandas: plain lists are. All
                     parts share one schema (readers take a part's schema for the folder's): a
                     batch with a new key or a wider dtype rewrites the older parts to the
                     widened schema (values unchanged; each row's ``meta`` keeps its own dtype).

Workers never write these files. They save each input as ``save_numpy`` does (atomic files and a
record, so done detection and resuming work unchanged) under the hidden staging folder
``<output_path>/<feature_type>/.staging``; the parent process alone moves finished inputs into
the consolidated output, a batch at a time during the run and the rest at its end, holding a
lock file so that runs on one output folder take turns (readers never need it: no part is
changed in place).

Why nothing is lost or doubled, whatever is killed when:
- A part, shard or index is written to a temporary file and renamed into place, so every file
  under its final name is whole. A kill leaves the previous state, or the new one.
- A batch first removes its inputs from the parts that hold them (a part is rewritten without
  them, or deleted when emptied), then writes its own part; the staged files are deleted only
  after that. An input is therefore always staged, consolidated, or both, and never in two parts.
  HDF5 readers go through the index instead, so there the order is reversed: the new part, then
  the index, and only then are the older copies (no longer linked) removed from their parts; a
  kill in between leaves an older copy that the next consolidation removes.
- An input staged again after it landed (a kill between the part and the clean-up) is recognised
  by its identical record and only cleaned up. The clean-up deletes the record last, so a kill
  in it leaves that record (with fewer arrays), which the next consolidation recognises the same
  way, and never arrays without a record.
- One input's record and arrays are read as one snapshot: the record is read, the arrays are
  opened, and the record must still be the same file afterwards (a worker recomputing the input
  removes the record first). Staged files are deleted only if they are still the files that were
  read, so a recomputation that raced the batch stays staged for the next one.
- A part that cannot be read is moved aside (``.damaged``) with one message; what can be read of
  it is kept, the rest is extracted again. The HDF5 file of earlier versions (groups in the file
  itself) is taken over the same way, group by group.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import tarfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import unquote

import numpy as np

from video_features.utils.output import (META_KEY, OutputState, OutputWriter, atomic_build,
                                         atomic_write, matches_npy, read_meta,
                                         remove_abandoned_temps, temp_name)
from video_features.utils.record import differences

log = logging.getLogger(__name__)

MODES = ("save_hdf5", "save_webdataset", "save_parquet")
STAGING = ".staging"
#: finished inputs the parent lets accumulate in staging before it consolidates them
BATCH = 64
#: array bytes of a Parquet row group (a part holds one batch; long features split it)
ROW_GROUP_BYTES = 128 << 20
#: during a run the HDF5 index is rebuilt at most this often (seconds); always at its end
INDEX_EVERY_S = 60.0
#: the HDF5 index file's root attribute that tells it from an HDF5 file of earlier versions
INDEX_ATTR = "video_features_index"


def staging_root(output_path: str | None, feature_type: str) -> Path:
    return Path(output_path or ".") / feature_type / STAGING


def store_for(writer: OutputWriter) -> "HDF5Store | ShardStore | ParquetStore":
    base = Path(writer.output_path or ".")
    if writer.mode == "save_hdf5":
        return HDF5Store(base, writer.feature_type)
    if writer.mode == "save_parquet":
        return ParquetStore(base, writer.feature_type)
    return ShardStore(base, writer.feature_type, writer.shard_size)


# -- names ---------------------------------------------------------------------------------------
def input_name(writer: OutputWriter, video_path: str) -> str:
    """The input's name in a consolidated output: where it is staged, relative to staging."""
    rel = writer.video_dir(video_path).relative_to(writer.root)
    return (rel / writer.stem(video_path)).as_posix()


def _escape(name: str, chars: str) -> str:
    out = name.replace("%", "%25")
    for c in chars:
        out = out.replace(c, f"%{ord(c):02X}")
    return out


def hdf5_key(name: str) -> str:
    """The top-level HDF5 name of an input: ``/`` would make groups inside groups."""
    return _escape(name, "/")


def sample_key(name: str) -> str:
    """The WebDataset key of an input: a dot would end the key, so dots are escaped (as ``%``)."""
    return _escape(name, ".")


def _digest(meta: Mapping[str, Any]) -> str:
    """Identifies one extraction: its whole record (options, inputs, timings)."""
    return hashlib.sha1(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


# -- staged inputs -------------------------------------------------------------------------------
def _ident(st: os.stat_result) -> tuple[int, ...]:
    # not ctime: moving a file aside changes it
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@dataclasses.dataclass
class Staged:
    """One staged input as read: its record, and the identity of every file it was read from
    (the record first), so that only those very files are ever deleted."""

    name: str
    meta_path: Path
    meta: dict
    digest: str
    files: dict[str, Path]
    idents: dict[Path, tuple[int, ...]]

    @classmethod
    def read(cls, name: str, meta_path: Path, whole: bool = True) -> "Staged | None":
        """The input's record and files as one snapshot; None when it is incomplete, damaged or
        being rewritten (it is then left alone). With ``whole`` False, an incomplete input is
        read too, with the files it still has (to clean up what a killed clean-up left)."""
        try:
            with open(meta_path, "rb") as f:
                ident = _ident(os.fstat(f.fileno()))
                meta = json.loads(f.read())
            outputs = meta.get("outputs") or {}
            files = {k: meta_path.parent / v["file"] for k, v in outputs.items()}
            idents = {}
            for key, path in files.items():
                try:
                    with open(path, "rb") as f:
                        if whole and not matches_npy(f, outputs[key]):
                            return None
                        idents[path] = _ident(os.fstat(f.fileno()))
                except FileNotFoundError:
                    if whole:
                        return None
            # a worker recomputing the input removes its record before writing any array, so
            # the same record afterwards means that the arrays read are the ones it describes
            if _ident(os.stat(meta_path)) != ident:
                return None
            idents[meta_path] = ident   # last: the record is deleted after the arrays
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return cls(name, meta_path, meta, _digest(meta), files, idents)

    @contextlib.contextmanager
    def open(self) -> Iterator[dict[str, Any] | None]:
        """The array files, open, if they are still the ones read (else None: a worker is
        writing this input again; it stays staged)."""
        with contextlib.ExitStack() as stack:
            opened = {}
            try:
                for key, path in self.files.items():
                    f = stack.enter_context(open(path, "rb"))
                    if _ident(os.fstat(f.fileno())) != self.idents[path]:
                        raise FileNotFoundError(path)
                    opened[key] = f
                if _ident(os.stat(self.meta_path)) != self.idents[self.meta_path]:
                    raise FileNotFoundError(self.meta_path)
            except OSError:
                opened = None
            yield opened

    def remove(self) -> None:
        """Delete the staged files read, leaving any newer ones in place. The record goes last,
        so a kill on the way leaves a record whose input already landed (the next
        consolidation finishes the clean-up), never arrays without a record (which nothing
        could tell from a worker's half-written input)."""
        for path, ident in self.idents.items():
            _remove_if_same(path, ident)
        with contextlib.suppress(OSError):  # empty folders of the staging tree
            folder = self.meta_path.parent
            while folder.name != STAGING:
                folder.rmdir()
                folder = folder.parent


def _still_as_read(batch: list[Staged], written: list[Staged]) -> Iterator[tuple[Staged, dict]]:
    """Each item of ``batch`` whose files are still those read, with them open; an item is
    added to ``written`` once the caller has used it (the others are being written again and
    stay staged)."""
    for item in batch:
        with item.open() as files:
            if files is None:
                continue
            yield item, files
        written.append(item)


def _remove_if_same(path: Path, ident: tuple[int, ...]) -> None:
    """Delete ``path`` only if it is still the file ``ident`` describes: it is moved aside
    first, checked, and put back if it is another (newer) file."""
    aside = temp_name(path)
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        if _ident(os.stat(aside)) != ident:
            with contextlib.suppress(FileExistsError):  # an even newer one is there: it stays
                os.link(aside, path)
    finally:
        os.unlink(aside)


def _staged(writer: OutputWriter) -> list[tuple[str, Path]]:
    """(name, record file) of every staged input, the name taken from where it is staged."""
    root = writer.root
    if not root.is_dir():
        return []
    suffix = f"_{META_KEY}.json"
    out = []
    for dirpath, _, files in os.walk(root):   # one walk of the staging tree
        folder = Path(dirpath)
        rel = folder.relative_to(root)
        out += [((rel / f[:-len(suffix)]).as_posix(), folder / f)
                for f in files if f.endswith(suffix)]
        # files a killed consolidation moved aside, also in folders it left without a record
        if any(f.startswith(".") and f.endswith(".tmp") for f in files):
            remove_abandoned_temps(folder, folder=True)
    return sorted(out, key=lambda item: item[1])


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".consolidate.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _aside(path: Path, why: str) -> Path:
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, aside)
    log.error("%s cannot be read (%s): moved to %s; what could be read of it is kept, the inputs "
              "it held otherwise are extracted again", path, why, aside.name)
    return aside


# -- stores --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Entry:
    """An input in a consolidated output: the part holding it, its record, the digest of its
    whole meta, and the output keys it has."""

    part: Path
    record: dict
    digest: str
    keys: frozenset


class _Store:
    """Parts (files or shards) that are only ever replaced whole, read through a cache keyed by
    their stat, so that seeing what other runs added costs a stat per part."""

    folder: Path   # where the parts are
    glob: str      # their names
    prefix: str    # "part" / "shard"
    suffix: str
    #: a batch's inputs leave older parts before its part is written (readers read the parts
    #: themselves); False: after an index that no longer points at them is in place
    drops_first = True

    #: part path -> (its stamp, its entries), shared by the stores of a process (a run plans
    #: again with new writers while it waits for inputs other runs hold)
    _cache: dict[str, tuple[tuple, dict[str, Entry]]] = {}

    def __init__(self) -> None:
        self._entries: dict[str, Entry] | None = None
        #: parts that failed to read at the last look, and why
        self._failed: dict[Path, str] = {}
        self._warned: set[str] = set()

    def _stamp(self, part: Path) -> tuple:
        st = part.stat()
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _read(self, part: Path) -> dict[str, Entry]:
        raise NotImplementedError

    def parts(self) -> dict[Path, dict[str, Entry]]:
        """Every readable part and its entries (unreadable ones are left out, said once)."""
        found = {}
        self._failed = {}
        names = sorted(self.folder.glob(self.glob)) if self.folder.is_dir() else []
        for part in names:
            try:
                stamp = self._stamp(part)
                cached = self._cache.get(str(part))
                if cached is None or cached[0] != stamp:
                    cached = self._cache[str(part)] = (stamp, self._read(part))
            except FileNotFoundError:   # another run's batch emptied it
                continue
            except Exception as exc:    # noqa: BLE001 - damaged: any reader error
                self._failed[part] = f"{type(exc).__name__}: {exc}"
                if part.name not in self._warned:
                    self._warned.add(part.name)
                    log.warning("%s cannot be read (%s): its inputs count as missing until the "
                                "next consolidation moves it aside", part, exc)
                continue
            found[part] = cached[1]
        prefix, kept = str(self.folder / self.prefix), {str(p) for p in found}
        for key in [k for k in self._cache if k.startswith(prefix) and k.endswith(self.suffix)]:
            if key not in kept:
                del self._cache[key]
        return found

    def refresh(self) -> None:
        self._entries = None

    def entries(self) -> dict[str, Entry]:
        """name -> its entry; were an input in two parts, the newer part's copy counts."""
        if self._entries is None:
            self._entries = {}
            for rows in self.parts().values():   # in part order: newer ones last
                self._entries.update(rows)
        return self._entries

    def records(self) -> dict[str, dict]:
        return {n: e.record for n, e in self.entries().items()}

    def next_path(self, parts: Iterable[Path]) -> Path:
        numbers = [int(p.name[len(self.prefix) + 1:].split(".")[0]) for p in parts]
        return self.folder / f"{self.prefix}-{max(numbers, default=-1) + 1:06d}{self.suffix}"

    # -- under the consolidation lock --
    def repair(self) -> None:
        """Bring the parts to a consistent state after a kill or damage (see the subclasses);
        the base: damaged parts are moved aside, and an input in two parts keeps the newer."""
        self.parts()
        for part, why in self._failed.items():
            self._salvage(_aside(part, why))
        remove_abandoned_temps(self.folder, folder=True)   # of killed consolidations
        if self.drops_first:
            self._drop_superseded()

    def _drop_superseded(self) -> None:
        """An input in two parts (a kill between writing a part and cleaning the older ones)
        keeps the newer copy."""
        seen: dict[str, Path] = {}
        older: dict[Path, set[str]] = {}
        for part, rows in self.parts().items():
            for name in rows:
                if name in seen:
                    older.setdefault(seen[name], set()).add(name)
                seen[name] = part
        for part, names in older.items():
            self._drop(part, names)
        self.refresh()

    def _salvage(self, damaged: Path) -> None:
        """Keep what can be read of a damaged part (formats that can say; default: nothing)."""

    def add(self, batch: list[Staged]) -> list[Staged]:
        """Move ``batch`` in: its inputs leave the parts that hold them, then one new part takes
        those that are still as read. Returns those written."""
        names = {s.name for s in batch}
        parts = self.parts()
        for part, rows in parts.items():
            if self.drops_first and rows.keys() & names:
                self._drop(part, rows.keys() & names)
        written = self._write(self.next_path(parts), batch)
        self.refresh()
        return written

    def _drop(self, part: Path, names: set[str]) -> None:
        raise NotImplementedError

    def _write(self, path: Path, batch: list[Staged]) -> list[Staged]:
        raise NotImplementedError

    def publish(self, final: bool) -> None:
        """Bring derived files (the HDF5 index) up to date."""


# -- HDF5 ----------------------------------------------------------------------------------------
def h5py_module() -> Any:
    """h5py, or a ConfigError naming the install command."""
    from video_features.utils.errors import require

    return require("h5py", "on_extraction=save_hdf5")


def _h5_entries(h5py: Any, f: Any, part: Path) -> dict[str, Entry]:
    rows = {}
    for key, group in f.items():
        if isinstance(group, h5py.Group) and "meta" in group.attrs:
            meta = json.loads(group.attrs["meta"])
            name = group.attrs.get("name", unquote(key))
            rows[name] = Entry(part, meta.get("record") or {}, _digest(meta),
                               frozenset(k for k, v in group.items() if isinstance(v, h5py.Dataset)))
    return rows


class HDF5Store(_Store):
    prefix, suffix, glob = "part", ".h5", "part-*.h5"
    # readers follow the index's links: an older copy stays until the index points elsewhere
    drops_first = False

    def __init__(self, output_path: Path, feature_type: str):
        super().__init__()
        self.path = output_path / f"{feature_type}.h5"
        self.folder = output_path / feature_type
        self._published: tuple | None = None
        self._published_at = 0.0

    def _read(self, part: Path) -> dict[str, Entry]:
        h5py = h5py_module()
        with h5py.File(part, "r", locking=False) as f:
            return _h5_entries(h5py, f, part)

    def repair(self) -> None:
        self._adopt_top_file()
        super().repair()

    def _adopt_top_file(self) -> None:
        """``<feature_type>.h5`` is this store's index, rebuilt from the parts; an HDF5 file of
        an earlier version (groups in the file) becomes a part, group by group; a file that does
        not open is moved aside (if it was the index, nothing is lost)."""
        if not self.path.is_file():
            return
        h5py = h5py_module()
        try:
            with h5py.File(self.path, "r", locking=False) as f:
                if INDEX_ATTR in f.attrs:
                    return
        except Exception as exc:   # noqa: BLE001 - any HDF5 error: it does not open
            _aside(self.path, f"{type(exc).__name__}: {exc}")
            return
        log.warning("%s is an HDF5 file of an earlier version: its inputs move into %s/",
                    self.path, self.folder.name)
        kept = self._copy_groups(self.path, self.next_path(self.parts()))
        log.warning("%s: %d input(s) moved into a part file", self.path, kept)
        self.refresh()
        self._published = None
        self.publish(final=True)   # replaces the old file with the index

    def _salvage(self, damaged: Path) -> None:
        kept = self._copy_groups(damaged, self.next_path(self.parts()))
        if kept:
            log.warning("%d input(s) of %s were read and kept", kept, damaged.name)

    def _copy_groups(self, source: Path, target: Path) -> int:
        """Copy every input group of ``source`` (at any depth, as earlier versions nested them)
        that can be read into the new part ``target``; returns how many."""
        h5py = h5py_module()
        groups: list[str] = []
        try:
            src = h5py.File(source, "r", locking=False)
        except Exception:   # noqa: BLE001 - nothing can be read
            return 0
        with src:
            with contextlib.suppress(Exception):
                src.visititems(lambda n, o: groups.append(n)
                               if isinstance(o, h5py.Group) and "meta" in o.attrs else None)
            kept = 0

            def build(tmp: str) -> None:
                nonlocal kept
                with h5py.File(tmp, "w") as out:
                    for name in groups:
                        try:
                            group = src[name]
                            data = {k: v[()] for k, v in group.items() if isinstance(v, h5py.Dataset)}
                            meta = group.attrs["meta"]
                            json.loads(meta)
                        except Exception:   # noqa: BLE001 - this input is extracted again
                            continue
                        name = group.attrs.get("name", name)
                        g = out.create_group(hdf5_key(name))
                        for k, v in data.items():
                            g.create_dataset(k, data=v)
                        g.attrs["name"] = name
                        g.attrs["meta"] = meta
                        kept += 1

            if groups:
                atomic_build(target, build)
        return kept

    def _drop(self, part: Path, names: set[str]) -> None:
        h5py = h5py_module()
        with h5py.File(part, "r", locking=False) as src:
            keep = [k for k, g in src.items() if g.attrs.get("name", unquote(k)) not in names]
            if not keep:
                part.unlink(missing_ok=True)
                return

            def build(tmp: str) -> None:
                with h5py.File(tmp, "w") as out:
                    for k in keep:
                        src.copy(src[k], out, name=k)

            atomic_build(part, build)

    def _write(self, path: Path, batch: list[Staged]) -> list[Staged]:
        h5py = h5py_module()
        written: list[Staged] = []

        def build(tmp: str) -> None:
            with h5py.File(tmp, "w") as f:
                for item, files in _still_as_read(batch, written):
                    group = f.create_group(hdf5_key(item.name))
                    for key, fh in files.items():
                        group.create_dataset(key, data=np.load(fh, allow_pickle=False))
                    group.attrs["name"] = item.name
                    group.attrs["meta"] = json.dumps(item.meta, default=str)

        atomic_build(path, build)
        if not written:
            path.unlink(missing_ok=True)
        return written

    def publish(self, final: bool) -> None:
        """Rebuild ``<feature_type>.h5``, an external link per input to its group, when the parts
        changed (during a run at most every INDEX_EVERY_S)."""
        entries = self.entries()
        state = tuple(sorted((n, e.part.name) for n, e in entries.items()))
        if state == self._published and self.path.is_file():
            return
        if not final and time.monotonic() - self._published_at < INDEX_EVERY_S:
            return
        h5py = h5py_module()
        base = self.folder.name

        def build(tmp: str) -> None:
            with h5py.File(tmp, "w") as f:
                f.attrs[INDEX_ATTR] = f"an index: each input is a link into {base}/part-*.h5"
                for name, entry in sorted(entries.items()):
                    key = hdf5_key(name)
                    f[key] = h5py.ExternalLink(f"{base}/{entry.part.name}", f"/{key}")

        if entries or self.path.exists():
            atomic_build(self.path, build)
        self._published, self._published_at = state, time.monotonic()
        self._drop_superseded()   # no longer linked


# -- WebDataset shards ---------------------------------------------------------------------------
def _members(names: Iterable[str]) -> dict[str, list[str]]:
    """tar member names grouped by sample key (the name up to the first dot of its last part)."""
    out: dict[str, list[str]] = {}
    for m in names:
        folder, _, base = m.rpartition("/")
        key = (folder + "/" if folder else "") + base.partition(".")[0]
        out.setdefault(key, []).append(m)
    return out


class ShardStore(_Store):
    prefix, suffix, glob = "shard", ".json", "shard-*.json"

    def __init__(self, output_path: Path, feature_type: str, shard_size: int):
        super().__init__()
        self.folder = output_path / feature_type
        self.shard_size = int(shard_size)

    def _stamp(self, index: Path) -> tuple:
        return super()._stamp(index) + super()._stamp(index.with_suffix(".tar"))

    def _read(self, index: Path) -> dict[str, Entry]:
        info = json.loads(index.read_bytes())
        if not index.with_suffix(".tar").is_file():
            raise FileNotFoundError(index.with_suffix(".tar"))
        return {name: Entry(index, meta.get("record") or {}, _digest(meta),
                            frozenset((meta.get("outputs") or {}).keys()))
                for name, meta in (info.get("samples") or {}).items()}

    @staticmethod
    def _keys(info: Mapping[str, Any]) -> dict[str, str]:
        """name -> sample key (shards of earlier versions turned dots into ``_``)."""
        keys = info.get("keys") or {}
        return {n: keys.get(n) or n.replace(".", "_") for n in info.get("samples") or {}}

    def repair(self) -> None:
        """A tar without its index (killed before the index landed: its inputs are still staged)
        is deleted; a tar that is not the size its index says (killed between a rewritten index
        and its tar) is cut down to the index's samples."""
        for index in sorted(self.folder.glob(self.glob)) if self.folder.is_dir() else []:
            if not index.with_suffix(".tar").exists():   # its data is gone: recomputed
                log.warning("%s: its tar is missing; its inputs are extracted again", index)
                index.unlink(missing_ok=True)
        for tar in sorted(self.folder.glob("shard-*.tar")) if self.folder.is_dir() else []:
            index = tar.with_suffix(".json")
            info = read_meta(index)
            if info is None:
                if not index.exists():
                    log.warning("%s has no index (a run was killed before writing it): removed; "
                                "its inputs are still staged", tar)
                    tar.unlink(missing_ok=True)
                continue
            if info.get("tar_bytes") not in (None, tar.stat().st_size):
                self._rebuild(index, info, set())
        super().repair()

    def _drop(self, index: Path, names: set[str]) -> None:
        info = read_meta(index) or {}
        self._rebuild(index, info, names)

    def _rebuild(self, index: Path, info: Mapping[str, Any], drop: set[str]) -> None:
        """Write ``index``'s shard again with its samples less ``drop``: the new tar is written
        aside, the index saying its size lands first, then the tar; emptied shards go."""
        tar_path = index.with_suffix(".tar")
        samples = {n: m for n, m in (info.get("samples") or {}).items() if n not in drop}
        keys = {n: k for n, k in self._keys(info).items() if n in samples}
        if not samples:
            index.unlink(missing_ok=True)   # first: the shard no longer counts
            tar_path.unlink(missing_ok=True)
            return
        wanted = set(keys.values())

        def build(tmp: str) -> None:
            with tarfile.open(tar_path) as src, tarfile.open(tmp, "w") as out:
                for m in src.getmembers():
                    if _members([m.name]).keys() & wanted:
                        out.addfile(m, src.extractfile(m))

        def write_index(tmp: str) -> None:
            self._write_index(index, tar_path, samples, keys, os.path.getsize(tmp))

        atomic_build(tar_path, build, before_rename=write_index)

    @staticmethod
    def _write_index(index: Path, tar_path: Path, samples: Mapping[str, Any],
                     keys: Mapping[str, str], size: int) -> None:
        text = json.dumps({"tar": tar_path.name, "tar_bytes": size, "keys": dict(keys),
                           "samples": dict(samples)}, default=str).encode()
        atomic_write(index, lambda f: f.write(text))

    def _write(self, index: Path, batch: list[Staged]) -> list[Staged]:
        tar_path = index.with_suffix(".tar")
        written: list[Staged] = []

        def build(tmp: str) -> None:
            with tarfile.open(tmp, "w") as tar:
                for item, files in _still_as_read(batch, written):
                    key = sample_key(item.name)
                    for k, fh in files.items():
                        member = tarfile.TarInfo(f"{key}.{k}.npy")
                        member.size = os.fstat(fh.fileno()).st_size
                        member.mtime = int(time.time())
                        tar.addfile(member, fh)
                    data = json.dumps(item.meta, default=str).encode()
                    member = tarfile.TarInfo(f"{key}.json")
                    member.size = len(data)
                    member.mtime = int(time.time())
                    tar.addfile(member, io.BytesIO(data))

        atomic_build(tar_path, build)
        if not written:
            tar_path.unlink(missing_ok=True)
            return written
        # last: the shard is complete (a tar without its index is an aborted one)
        self._write_index(index, tar_path, {s.name: s.meta for s in written},
                          {s.name: sample_key(s.name) for s in written}, tar_path.stat().st_size)
        return written


# -- Parquet -------------------------------------------------------------------------------------
def pyarrow_modules() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or a ConfigError naming the install command."""
    from video_features.utils.errors import ConfigError, require

    parquet = require("pyarrow.parquet", "on_extraction=save_parquet", pip="pyarrow")
    import pyarrow
    if int(pyarrow.__version__.split(".")[0]) < 16:  # 16: float16 in Parquet, NumPy 2
        raise ConfigError(f"on_extraction=save_parquet needs pyarrow>=16, not "
                          f"{pyarrow.__version__}: pip install -U pyarrow")
    return pyarrow, parquet


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
    for key, dtype in sorted(layout.items()):
        fields += [pa.field(key, _list_type(pa, dtype)), pa.field(f"{key}_shape", shape)]
    return pa.schema(fields)


def _widen(layout: dict[str, np.dtype], more: Mapping[str, np.dtype]) -> dict[str, np.dtype]:
    out = dict(layout)
    for key, dtype in more.items():
        out[key] = np.result_type(out[key], dtype) if key in out else np.dtype(dtype)
    return out


class ParquetStore(_Store):
    prefix, suffix, glob = "part", ".parquet", "part-*.parquet"

    def __init__(self, output_path: Path, feature_type: str):
        super().__init__()
        self.path = self.folder = output_path / f"{feature_type}.parquet"
        #: part name -> (its stamp, its layout)
        self._layouts: dict[str, tuple[tuple, dict[str, np.dtype]]] = {}

    def _read(self, part: Path) -> dict[str, Entry]:
        _, pq = pyarrow_modules()
        table = pq.read_table(part, columns=["name", "meta"])
        rows = {}
        for n, m in zip(table["name"].to_pylist(), table["meta"].to_pylist()):
            meta = json.loads(m)
            rows[n] = Entry(part, meta.get("record") or {}, _digest(meta),
                            frozenset((meta.get("outputs") or {}).keys()))
        return rows

    def _layout_of(self, part: Path) -> dict[str, np.dtype]:
        _, pq = pyarrow_modules()
        stamp = self._stamp(part)
        cached = self._layouts.get(part.name)
        if cached is None or cached[0] != stamp:
            cached = self._layouts[part.name] = (stamp, _layout(pq.read_schema(part)))
        return cached[1]

    def repair(self) -> None:
        """Parts of mixed schemas (a run killed while widening them) are all widened."""
        super().repair()
        parts = self.parts()
        layouts = {p: self._layout_of(p) for p in parts}
        target: dict[str, np.dtype] = {}
        for layout in layouts.values():
            target = _widen(target, layout)
        for part, layout in layouts.items():
            if layout != target:
                self._rewrite(part, set(), target)
        self.refresh()

    def add(self, batch: list[Staged]) -> list[Staged]:
        parts = self.parts()   # under the lock: another run may have changed parts
        target: dict[str, np.dtype] = {}
        for part in parts:
            target = _widen(target, self._layout_of(part))
        for item in batch:
            target = _widen(target, {k: np.dtype(v["dtype"])
                                     for k, v in (item.meta.get("outputs") or {}).items()})
        names = {s.name for s in batch}
        # old rows go first: a kill before the new part is in place leaves the input staged
        for part, rows in parts.items():
            if rows.keys() & names or self._layout_of(part) != target:
                self._rewrite(part, rows.keys() & names, target)
        written = self._write_part(self.next_path(parts), batch, target)
        self.refresh()
        return written

    def _drop(self, part: Path, names: set[str]) -> None:
        self._rewrite(part, names, self._layout_of(part))

    def _rewrite(self, part: Path, drop: set[str], layout: Mapping[str, np.dtype]) -> None:
        """``part`` without the rows named in ``drop``, in ``layout``; deleted if none remain."""
        pa, pq = pyarrow_modules()
        import pyarrow.compute as pc

        # its rows as last read (under the lock, just before): no listing of every part again
        if drop and not (self._cache.get(str(part), (None, {}))[1].keys() - drop):
            part.unlink(missing_ok=True)
            return
        schema = _schema(pa, layout)
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

    def _write_part(self, path: Path, batch: list[Staged], layout: Mapping[str, np.dtype]) -> list[Staged]:
        pa, pq = pyarrow_modules()
        schema = _schema(pa, layout)
        written: list[Staged] = []

        def group(rows: list[tuple[str, dict, dict[str, np.ndarray]]]) -> Any:
            columns = [pa.array([n for n, _, _ in rows], pa.string()),
                       pa.array([json.dumps(m, default=str) for _, m, _ in rows], pa.string())]
            for key, dtype in sorted(layout.items()):
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
                for item, files in _still_as_read(batch, written):
                    arrays = {k: np.load(fh, allow_pickle=False) for k, fh in files.items()}
                    rows.append((item.name, item.meta, arrays))
                    size += sum(a.nbytes for a in arrays.values())
                    if size >= ROW_GROUP_BYTES:
                        out.write_table(group(rows))
                        rows, size = [], 0
                if rows:
                    out.write_table(group(rows))

        atomic_write(path, dump)
        if not written:
            path.unlink(missing_ok=True)
        return written


# -- the run's side ------------------------------------------------------------------------------
def consolidated_state(writer: OutputWriter, video_path: str, keys: Iterable[str] = ()) -> OutputState:
    """Is ``video_path`` in the consolidated output, with every key, made as this run makes it?"""
    entry = writer.store.entries().get(input_name(writer, video_path))
    if entry is None:
        return OutputState("missing", ["no complete output"])
    lacking = sorted(set(keys) - entry.keys)
    if lacking:
        return OutputState("missing", [f"{', '.join(lacking)} missing from its consolidated output"])
    diffs = differences(entry.record, writer.record)
    return OutputState("mismatch", diffs) if diffs else OutputState("done", [])


def consolidate(writer: OutputWriter, final: bool = True) -> int:
    """Move complete staged inputs into the consolidated output; returns how many moved. A
    webdataset shard takes ``shard_size`` inputs; with ``final`` the rest makes a last, shorter
    shard."""
    if writer.mode not in MODES:
        return 0
    store = writer.store
    if not writer.root.is_dir() and not store.folder.is_dir() and not getattr(store, "path", store.folder).exists():
        return 0   # nothing there yet
    moved = 0
    with _locked(Path(writer.output_path or ".") / writer.feature_type):
        store.refresh()
        store.repair()
        have = store.entries()
        todo = []
        for name, meta_path in _staged(writer):
            item = Staged.read(name, meta_path)
            landed = have.get(name)
            if item is None:
                # half-written, damaged or being rewritten: left to its worker, unless it is
                # what a kill during the clean-up of a landed input left
                rest = Staged.read(name, meta_path, whole=False) if landed else None
                if rest is not None and rest.digest == landed.digest:
                    rest.remove()
                continue
            if landed is not None and landed.digest == item.digest:
                item.remove()   # it landed before a kill stopped the clean-up
                continue
            todo.append(item)
        step = writer.shard_size if writer.mode == "save_webdataset" else BATCH
        for start in range(0, len(todo), step):
            batch = todo[start:start + step]
            if len(batch) < step and writer.mode == "save_webdataset" and not final:
                break
            for item in store.add(batch):
                item.remove()
                moved += 1
        store.publish(final)
    if moved:
        log.info("%s: %d input(s) consolidated into %s", writer.feature_type, moved,
                 getattr(store, "path", None) or store.folder)
    return moved


def read_hdf5(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """All inputs of an HDF5 output: name -> {key: array} (for small files and tests)."""
    h5py = h5py_module()
    out: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(path, "r", locking=False) as f:
        for key in f:
            group = f[key]
            name = group.attrs.get("name", unquote(key))
            out[name] = {k: v[()] for k, v in group.items() if isinstance(v, h5py.Dataset)}
    return out


def read_webdataset(folder: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """All inputs of a WebDataset output folder: name -> {key: array} (for small outputs and
    tests); an input found in two shards is an error."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for index in sorted(Path(folder).glob("shard-*.json")):
        info = json.loads(index.read_bytes())
        names = {k: n for n, k in ShardStore._keys(info).items()}
        with tarfile.open(index.with_suffix(".tar")) as tar:
            for key, members in _members(tar.getnames()).items():
                name = names.get(key)
                if name is None:
                    continue   # not in the index: a rewrite was cut short
                if name in out:
                    raise ValueError(f"{name} is in two shards")
                out[name] = {m.rpartition("/")[2].partition(".")[2][:-len(".npy")]:
                             np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False)
                             for m in members if m.endswith(".npy")}
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
