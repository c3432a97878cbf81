"""Where features go: print | save_numpy | save_pickle, written atomically, with a record.

Layout: ``<output_path>/<feature_type>/<folder of the input>/<stem>_<key>.<npy|pkl>``, where the
folder of the input is its parent relative to ``input_root`` (default: the current folder); an
input outside that root keeps its absolute folder (``/data/x/a.mp4`` ->
``<output_path>/<feature_type>/data/x/a_<key>.npy``). Two inputs with the same file name in
different folders therefore never share an output file, and the layout depends only on each
input's own path, so reruns find earlier results whatever else is in the list.

Beside the arrays, ``<stem>_meta.json`` records what produced them (utils/record.py: the options
that change values, the checkpoints' hashes, the feature type's revision, the tool's version),
every option of the run, each array's file size, shape and dtype, the input's media (the video
and audio stream decoded: codec, size, ``stream`` / ``streams``), and, for an input decoded around
undecodable data, ``"damaged"``: one line saying what was skipped. It is written last, so its
presence means the arrays are complete; an output counts as done only when the record matches
this run and every array's size and header agree with it (no array is loaded to check).

Each file is written to a temporary name in its folder and renamed into place, so a killed run
never leaves a partial feature file. Temporary names carry the host and pid of their writer;
only those of a dead process on this host are ever removed. A write that fails because of the
output folder itself (full, read-only, no permission) raises :class:`OutputError` naming the file,
so the runner can stop the run instead of failing every later input the same way.

``<output_path>/failures.jsonl`` lists the inputs whose latest try failed (see
:func:`update_failure_report`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from video_features.utils.errors import OutputError
from video_features.utils.record import differences

SUFFIX = {"save_numpy": ".npy", "save_pickle": ".pkl"}
#: modes whose inputs are staged as .npy and then moved into one file (utils/consolidate.py)
CONSOLIDATED = ("save_hdf5", "save_webdataset", "save_parquet")
#: outputs that are not features: kept as they are whatever ``dtype`` says
TIME_KEYS = ("fps", "timestamps_ms")
META_KEY = "meta"
HOST = socket.gethostname()
#: options that are not part of an output's record of the run (they can be huge)
_UNRECORDED = ("video_paths", "file_with_video_paths")
#: the failure report in the output folder
FAILURES = "failures.jsonl"


@dataclass
class OutputState:
    """Whether an input's outputs can be reused: ``done``, ``missing`` (nothing usable: compute)
    or ``mismatch`` (complete, but made differently: ``reasons`` says how)."""

    status: str
    reasons: list[str]


class OutputWriter:
    def __init__(self, on_extraction: str, output_path: str | None, feature_type: str,
                 input_root: str | None = None, record: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None, dtype: str = "float32",
                 shard_size: int = 1000):
        self.mode = on_extraction
        self.feature_type = feature_type
        self.output_path = output_path
        self.dtype = dtype
        self.shard_size = shard_size
        self.root = Path(output_path or ".") / feature_type
        if self.consolidated:  # workers stage; the parent moves inputs into the one file
            from video_features.utils.consolidate import staging_root

            self.root = staging_root(output_path, feature_type)
        self.input_root = Path(input_root or os.getcwd()).expanduser().resolve()
        self.record = dict(record or {})
        self.config = {k: v for k, v in (config or {}).items() if k not in _UNRECORDED}
        self._store = None
        #: set once a write failed because of the output folder itself: the run should stop
        self.unwritable: OutputError | None = None

    @classmethod
    def from_config(cls, cfg: Any, record: Mapping[str, Any] | None = None) -> "OutputWriter":
        return cls(cfg.on_extraction, cfg.output_path, cfg.feature_type, cfg.get("input_root"),
                   record, dict(cfg), cfg.get("dtype", "float32"), cfg.get("shard_size", 1000))

    @property
    def saves(self) -> bool:
        return self.mode in SUFFIX or self.consolidated

    @property
    def consolidated(self) -> bool:
        return self.mode in CONSOLIDATED

    @property
    def store(self) -> Any:
        """The HDF5 file or the shards (consolidated modes)."""
        if self._store is None:
            from video_features.utils.consolidate import store_for

            self._store = store_for(self)
        return self._store

    def refresh(self) -> None:
        """Forget what was read of the consolidated output, so the next ``state`` sees what
        other runs (or this run's consolidation) have written since."""
        if self._store is not None:
            self._store.refresh()

    def video_dir(self, video_path: str) -> Path:
        """The input's output folder: its real folder (symlinked folders resolved) relative to
        ``input_root``. A symlinked file keeps its own name and folder (``links/a.mp4 ->
        ../clips/c3.mp4`` is ``links/a``), so every input given is one output, named as given."""
        folder = Path(os.path.abspath(Path(video_path).expanduser())).parent.resolve()
        try:
            rel = folder.relative_to(self.input_root)
        except ValueError:
            rel = Path(*folder.parts[1:])  # absolute folder without its anchor
        return self.root / rel

    def stem(self, video_path: str) -> str:
        p = Path(video_path.rstrip("/\\"))
        return p.name if Path(video_path).is_dir() else p.stem

    def paths_for(self, video_path: str, keys: Iterable[str]) -> dict[str, Path]:
        folder = self.video_dir(video_path)
        stem = self.stem(video_path)
        suffix = SUFFIX.get(self.mode, ".npy")
        return {k: folder / f"{stem}_{k}{suffix}" for k in keys}

    def meta_path(self, video_path: str) -> Path:
        return self.video_dir(video_path) / f"{self.stem(video_path)}_{META_KEY}.json"

    def state(self, video_path: str, keys: Iterable[str]) -> OutputState:
        """Can the existing outputs of ``video_path`` be reused by this run? Reads the record and
        the array headers only."""
        if not self.saves:
            return OutputState("missing", ["outputs are printed, not saved"])
        keys = list(keys)
        staged = self._file_state(video_path, keys)
        if self.consolidated and staged.status == "missing":
            from video_features.utils.consolidate import consolidated_state

            return consolidated_state(self, video_path, keys)
        return staged

    def _file_state(self, video_path: str, keys: Iterable[str]) -> OutputState:
        meta = read_meta(self.meta_path(video_path))
        if meta is None:
            return OutputState("missing", ["no complete output"])
        paths = self.paths_for(video_path, keys)
        files = meta.get("outputs") or {}
        for key, path in paths.items():
            info = files.get(key)
            if info is None or not _matches_file(path, info):
                return OutputState("missing", [f"{path.name} is missing or damaged"])
        diffs = differences(meta.get("record") or {}, self.record)
        return OutputState("mismatch", diffs) if diffs else OutputState("done", [])

    def is_done(self, video_path: str, keys: Iterable[str]) -> bool:
        return self.state(video_path, keys).status == "done"

    def write(self, video_path: str, feats: Mapping[str, np.ndarray],
              info: Mapping[str, Any] | None = None) -> list[Path]:
        """Write every array, then the record (``info``: facts of this extraction, e.g. frames
        and wall time, stored with it). Returns the files written. If any write fails, the
        arrays already written for this input are removed: without their record they are no
        output, and on a full disk they only take space."""
        if not self.saves:
            print_features(video_path, feats)
            return []
        written: list[Path] = []
        try:
            return self._write(video_path, feats, info, written)
        except BaseException as exc:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            if isinstance(exc, OutputError):
                self.unwritable = exc
            raise

    def _write(self, video_path: str, feats: Mapping[str, np.ndarray],
               info: Mapping[str, Any] | None, written: list[Path]) -> list[Path]:
        meta_path = self.meta_path(video_path)
        # an old record must not vouch for arrays that are being replaced
        meta_path.unlink(missing_ok=True)
        outputs = {}
        for key, path in self.paths_for(video_path, feats.keys()).items():
            value = np.asarray(feats[key])
            if self.dtype == "float16" and key not in TIME_KEYS and value.dtype == np.float32:
                value = value.astype(np.float16)
            atomic_write(path, lambda f, v=value: _dump(f, v, self.mode))
            outputs[key] = {"file": path.name, "bytes": path.stat().st_size,
                            "shape": list(value.shape), "dtype": value.dtype.str}
            written.append(path)
        from video_features.utils.video import media_info

        info = dict(info or {})
        damaged = info.pop("damaged", None)
        # "id": this write, so that two extractions with equal records and timings still differ
        # (consolidation tells a staged input that already landed by its whole meta)
        meta = {"id": os.urandom(8).hex(), "input": str(Path(video_path).expanduser().resolve()),
                "media": media_info(video_path, self.config.get("video_stream"),
                                    self.config.get("audio_stream")),
                "record": self.record, "outputs": outputs, "config": self.config,
                **({"extraction": info} if info else {}),
                # decoded around undecodable data: one line saying what was skipped (absent for
                # a clean input)
                **({"damaged": str(damaged)} if damaged else {})}
        text = json.dumps(meta, indent=1, default=str).encode()
        atomic_write(meta_path, lambda f: f.write(text))
        written.append(meta_path)
        return written


def read_meta(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _matches_file(path: Path, info: Mapping[str, Any]) -> bool:
    """The file has the recorded size and, for .npy, a header with the recorded shape/dtype."""
    try:
        if path.suffix != ".npy":
            return path.stat().st_size == info.get("bytes")
        with open(path, "rb") as f:
            return matches_npy(f, info)
    except OSError:
        return False


def matches_npy(f: Any, info: Mapping[str, Any]) -> bool:
    """The open .npy file ``f`` has the recorded size, shape and dtype (read from its header;
    ``f`` is left at its start)."""
    try:
        if os.fstat(f.fileno()).st_size != info.get("bytes"):
            return False
        f.seek(0)
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
        f.seek(0)
        return list(shape) == list(info.get("shape", [])) and dtype.str == info.get("dtype")
    except (OSError, ValueError):
        return False


def _dump(f: Any, value: np.ndarray, mode: str) -> None:
    if mode == "save_pickle":
        pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    else:
        np.save(f, value, allow_pickle=False)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _open_temp(path: Path) -> tuple[int, str]:
    """A new temporary file for ``path`` in its folder: (fd, name)."""
    return tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{HOST}.{os.getpid()}.", suffix=".tmp",
                            dir=path.parent)


def _folder_error(exc: BaseException, path: Path, tmp: str) -> OutputError | None:
    """``exc`` as an :class:`OutputError` when it says the folder of ``path`` cannot take the
    file (full, read-only, no permission), not when it is about another file (e.g. one read
    while dumping)."""
    if not isinstance(exc, OSError) or exc.errno not in OutputError.STATES:
        return None
    if exc.filename is not None and str(exc.filename) not in (str(path), tmp):
        return None
    return OutputError(path, exc.errno)


def atomic_write(path: Path, dump: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file named ``.<name>.<host>.<pid>.<random>.tmp`` in the
    same folder, fsync it, rename it into place. Abandoned temporary files of ``path`` (their
    writer, on this host, is gone) are removed first. A full, read-only or unwritable folder
    raises :class:`OutputError` naming ``path``; the temporary file is removed in every case."""
    def build(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "wb") as f:
            dump(f)
            f.flush()
            os.fsync(f.fileno())

    _atomic(path, build)


def atomic_build(path: Path, build: Callable[[str], None],
                 before_rename: Callable[[str], None] | None = None) -> None:
    """:func:`atomic_write` for writers that need a file name (h5py): ``build(tmp)`` writes the
    temporary file, which is then fsynced and renamed to ``path``; ``before_rename(tmp)`` runs
    between the two (e.g. to write an index that describes the new file)."""
    def step(fd: int, tmp: str) -> None:
        os.close(fd)
        build(tmp)
        fd2 = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd2)
        finally:
            os.close(fd2)
        if before_rename is not None:
            before_rename(tmp)

    _atomic(path, step)


def _atomic(path: Path, build: Callable[[int, str], None]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_temps(path)
        fd, tmp = _open_temp(path)
    except OSError as exc:  # making the folder or the file: about the folder, whatever the name
        if exc.errno not in OutputError.STATES:
            raise
        raise OutputError(path, exc.errno) from exc
    try:
        build(fd, tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        err = _folder_error(exc, path, tmp)
        if err is None:
            raise
        raise err from exc


def temp_name(path: Path) -> Path:
    """A private name beside ``path`` that :func:`remove_abandoned_temps` clears once this
    process is gone (for files moved aside before they are deleted)."""
    return path.with_name(f"{_temp_prefix(path)}{HOST}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a small file in it (removed at once), so that a read-only,
    unwritable or full output folder ends the run before any work, naming the folder."""
    probe = folder / ".write-check"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_abandoned_temps(probe)
        fd, tmp = _open_temp(probe)
        try:
            os.write(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as exc:
        raise OutputError(folder, exc.errno, exc.strerror or str(exc), folder=True) from exc


@contextlib.contextmanager
def _locked(lock: Path, target: Path) -> Any:
    """Hold ``lock`` (a file beside ``target``); a folder that cannot take it fails as writing
    ``target`` would."""
    try:
        f = open(lock, "a")
    except OSError as exc:
        raise OutputError(target, exc.errno, exc.strerror or str(exc)) from exc
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_failure_report(output_path: str | None, feature_type: str, planned: Iterable[str],
                          failures: list[dict]) -> Path | None:
    """Bring ``<output_path>/failures.jsonl`` up to date after a run: a JSON line per input whose
    latest try failed. This run's ``failures`` replace the lines of every input it planned (an
    input that now succeeded loses its line); lines of inputs it did not plan (another shard of a
    job array, another list, another feature type) are kept as they are, so no run's failures
    vanish unless their inputs were tried again. Rewritten atomically under a lock, as job-array
    tasks share the file. Returns the file, or None when nothing fails any more (it is removed)."""
    folder = Path(output_path or ".")
    path = folder / FAILURES
    if not failures and not path.exists():
        return None
    mine = {(feature_type, input_key(p)) for p in planned}
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / f".{FAILURES}.lock", path):
        try:
            old = path.read_bytes()
        except FileNotFoundError:
            old = b""
        lines = []
        for line in old.splitlines():
            try:
                entry = json.loads(line)
                key = (entry.get("feature_type"), entry.get("path"))
            except (ValueError, AttributeError):  # not ours to judge: kept as it is
                key = None
            if line.strip() and key not in mine:
                lines.append(line)
        lines += [json.dumps(f, default=str).encode() for f in failures]
        text = b"".join(line + b"\n" for line in lines)
        if not lines:
            path.unlink(missing_ok=True)
            return None
        if text != old:
            atomic_write(path, lambda f: f.write(text))
    return path


def input_key(video_path: str) -> str:
    """An input as the failure report names it: its absolute path, as in its record."""
    return str(Path(video_path).expanduser().resolve())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_abandoned_temps(path: Path, folder: bool = False) -> list[Path]:
    """Remove temporary files of exactly ``path`` whose writer provably died: written on this
    host by a process id that no longer exists. Others' live temporary files are never touched
    (no glob pattern, so names with ``[`` or ``*`` match only themselves). With ``folder``,
    those of every file in the folder ``path``. A temporary folder (``flow_format=jpg`` fills
    one before renaming it into place) goes with its contents."""
    prefix = "." if folder else _temp_prefix(path)
    removed = []
    try:
        entries = list(os.scandir(path if folder else path.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        # target (folder mode: and host) may hold dots, then pid, random
        parts = name[len(prefix):-len(".tmp")].rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        if parts[0] != HOST and not (folder and parts[0].endswith(f".{HOST}")):
            continue
        pid = int(parts[1])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except FileNotFoundError:
            pass
    return removed


def print_features(video_path: str, feats: Mapping[str, np.ndarray]) -> None:
    lines = [f"== {video_path}"]
    for key, value in feats.items():
        arr = np.asarray(value)
        lines.append(f"{key}: shape={tuple(arr.shape)} dtype={arr.dtype}")
        lines.append(np.array2string(arr, threshold=40, edgeitems=3, precision=4))
    print("\n".join(lines), flush=True)
