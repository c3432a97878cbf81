"""Work claims: several runs on one list and output folder do each input once.

Before a run starts an input it creates ``.<stem>.claim`` beside the input's outputs (in every
feature type's folder of the run), holding its host, pid, run id and start time: written under a
temporary name and linked into place, which fails when the claim exists (as ``O_EXCL`` does), so
no claim file is ever seen empty; it remembers the inode it created. Right after taking a claim the run looks again
whether the input is done (another run may have finished it since the plan): then it releases
the claim and reports the input skipped. The run touches its claims every ``claim_timeout / 10``
seconds (the heartbeat; an error of one touch, e.g. ``ESTALE`` on NFS, is logged once per kind
and the beating goes on) and releases each claim as soon as the input's result (done or failed)
is recorded, so only the inputs in flight are held.

An input another run holds is put aside: once the queue is empty the run waits for it, and finds
it done (the other run's outputs, reported as skipped), or takes it over when the holder is gone:
a claim whose process no longer exists (same host) or whose heartbeat is older than
``claim_timeout`` (any host) is stale. A rerun also removes stale claims left beside inputs that
are done (a run killed between writing an input and releasing its claim).

Every removal is owner-checked, so a run never deletes a claim it did not judge or create: a
stale claim is judged from one open file (content and ``fstat`` of the same descriptor), moved
aside by ``rename`` and removed only if the moved file is the judged one (else it is put back
with ``link``, which never overwrites); a release or heartbeat acts only while the file at the
path is still the inode this run created. A run whose claim was taken over (it was judged gone)
logs it once and stops treating the input as held.

Claims need a shared file system that honours ``O_EXCL``, ``rename`` and ``link`` (local disks,
NFSv3+, Lustre, GPFS do).
"""
from __future__ import annotations

import collections
import errno
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from video_features.utils.output import HOST, _pid_alive, remove_abandoned_temps, temp_name

log = logging.getLogger(__name__)

#: the suffix of a claim file
SUFFIX = ".claim"
#: seconds after which a claim file that does not say who holds it is stale
UNSAID_S = 10.0


def claim_file(writer: Any, path: str) -> Path:
    return writer.video_dir(path) / f".{writer.stem(path)}{SUFFIX}"


class _Held:
    """One claim file this run created; the descriptor stays open while it is held, so its inode
    cannot be reused by another file (a new holder's) and "still ours" is an inode test."""

    __slots__ = ("file", "fd", "ino", "lock")

    def __init__(self, file: Path, fd: int):
        self.file, self.fd, self.ino = file, fd, os.fstat(fd).st_ino
        # a touch and the close exclude each other: a closed number may be reused by any file
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                fd, self.fd = self.fd, -1
                try:
                    os.close(fd)
                except OSError:
                    pass


class Claims:
    """The claims of one run: taking, heartbeat, release."""

    def __init__(self, writers: Iterable[Any], timeout: float):
        self.writers = [w for w in writers if w.saves]
        self.timeout = float(timeout)
        #: input -> the claim this run created in each folder
        self.held: dict[str, list[_Held]] = {}
        self.me = {"host": HOST, "pid": os.getpid(), "run": uuid.uuid4().hex[:12]}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._logged: set[tuple[str, int | None]] = set()   # heartbeat errors said once
        self._beat = threading.Thread(target=self._heartbeat, name="claims-heartbeat", daemon=True)
        self._beat.start()

    def files(self, path: str) -> list[Path]:
        return [claim_file(w, path) for w in self.writers]

    def take(self, path: str) -> bool:
        """Claim ``path`` in every folder, or in none (False: another live run holds it)."""
        got: list[_Held] = []
        try:
            for f in self.files(path):
                held = self._take_one(f)
                if held is None:
                    break
                got.append(held)
        finally:
            if len(got) < len(self.writers):   # in none: not taken, or an error
                for h in got:
                    _remove_own(h)
        if len(got) < len(self.writers):
            return False
        with self._lock:
            self.held[path] = got
        return True

    def holder(self, path: str) -> str:
        """Who holds ``path`` (for log lines), or ""."""
        for f in self.files(path):
            info = _read(f)
            if info:
                return f"{info.get('host')}:{info.get('pid')}"
        return ""

    def _take_one(self, f: Path) -> _Held | None:
        """Create ``f`` (taking over a stale one), or None: a live holder has it. The claim is
        written under a temporary name and linked into place (``link`` fails when ``f`` exists,
        as ``O_EXCL`` does), so a claim file always says who holds it: a run killed while
        claiming leaves no empty claim that others could only judge by its age."""
        f.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            tmp = temp_name(f)
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            try:
                os.write(fd, json.dumps({**self.me, "started": time.time()}).encode())
                _link(tmp, f)
            except FileExistsError:
                os.close(fd)
                if not _remove_if_stale(f, self.timeout):
                    return None
                continue       # the stale claim is gone: try to create ours again
            except BaseException:   # e.g. a full disk: no claim, and no temporary file
                os.close(fd)
                raise
            finally:
                os.unlink(tmp)
            if os.fstat(fd).st_ino != os.stat(f).st_ino:   # no hard links: f was written anew
                os.close(fd)
                fd = os.open(f, os.O_RDWR)
            return _Held(f, fd)
        return None

    def release(self, path: str) -> None:
        """Remove this run's claims of ``path`` (only files that are still this run's own)."""
        with self._lock:
            held = self.held.pop(path, [])
        for h in held:
            _remove_own(h)

    def release_all(self) -> None:
        for path in list(self.held):
            self.release(path)

    def close(self) -> None:
        self._stop.set()
        self._beat.join()
        self.release_all()

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.5, self.timeout / 10)):
            try:
                self.beat()
            except Exception as exc:  # without a heartbeat our claims would be taken over
                self._once(exc, "claims: the heartbeat failed: %s")

    def beat(self) -> None:
        """Touch every claim this run still owns (one round of the heartbeat)."""
        with self._lock:
            items = [(path, h) for path, hs in self.held.items() for h in hs]
        for path, h in items:
            try:
                with h.lock:
                    if h.fd < 0:   # released meanwhile
                        continue
                    try:
                        here = os.stat(h.file).st_ino
                    except FileNotFoundError:  # moved aside to be judged: a touch may save it
                        here = h.ino
                    if here == h.ino:
                        os.utime(h.fd)
                if here != h.ino:
                    self._lost(path, h)
            except OSError as exc:    # e.g. ESTALE on NFS: the next beat may work
                self._once(exc, "claims: touching a claim failed (the heartbeat goes on; said "
                                "once per kind of error): %s")

    def _lost(self, path: str, h: _Held) -> None:
        with self._lock:
            hs = self.held.get(path)
            if not hs or h not in hs:
                return         # released meanwhile: the new file is someone else's, rightly
            hs.remove(h)
        h.close()
        log.warning("%s was taken over by %s (this run was judged gone); it is no longer held "
                    "by this run", h.file, _holder_text(_read(h.file)))

    def _once(self, exc: BaseException, msg: str) -> None:
        key = (type(exc).__name__, getattr(exc, "errno", None))
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg, exc)


class _Gone(Exception):
    """The claim file is not there (any more)."""


def _link(tmp: Path, f: Path) -> None:
    """``tmp`` linked as ``f``; FileExistsError if ``f`` exists. Where the file system has no
    hard links, ``f`` is created with ``O_EXCL`` and written (a kill in between leaves an empty
    claim, which is stale after UNSAID_S)."""
    try:
        os.link(tmp, f)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, Path(tmp).read_bytes())
        finally:
            os.close(fd)


def _judge(fd: int, timeout: float) -> bool:
    """Whether the claim open at ``fd`` is stale: content and age from the same file."""
    age = time.time() - os.fstat(fd).st_mtime
    chunks = []
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:        # not readable by this user: judged by its age
        return age > timeout
    try:
        info = json.loads(b"".join(chunks))
    except ValueError:
        info = None
    if not isinstance(info, dict):
        # claims are linked into place whole, so this one's writer died while making it (or
        # an older version was killed between creating and writing it): no holder to wait for
        return age > min(timeout, UNSAID_S)
    try:
        pid = int(info.get("pid") or 0)
    except (TypeError, ValueError):
        pid = 0
    if info.get("host") == HOST and pid > 0 and not _pid_alive(pid):
        return True
    return age > timeout


def _remove_if_stale(f: Path, timeout: float, doing: str = "taking over") -> bool:
    """Remove the claim ``f`` if it is stale (logged as ``doing``). True: ``f`` is free now
    (removed, or gone already); False: a live holder's claim (or one that changed while being
    judged) is there."""
    try:
        try:
            fd = os.open(f, os.O_RDONLY)
        except PermissionError:   # another user's claim: judged by its age alone
            fd = os.open(f, getattr(os, "O_PATH", os.O_RDONLY))
    except FileNotFoundError:
        return True
    aside = None
    try:   # the descriptor stays open until verified: the judged inode cannot be reused meanwhile
        judged = os.fstat(fd).st_ino
        if not _judge(fd, timeout):
            return False
        aside = _move_aside(f, judged)
        if aside is None:      # a new claim replaced the judged one: it is put back
            return False
        if not _judge(fd, timeout):   # its holder beat after all: give it back
            _put_back(aside, f)
            aside = None
            return False
    except _Gone:
        return True
    finally:
        os.close(fd)
    log.warning("%s %s: its holder %s is gone", doing, f, _holder_text(_read(aside)))
    aside.unlink(missing_ok=True)
    return True


def _remove_own(h: _Held) -> bool:
    """Remove ``h``'s file if it is still the one this run created (else leave it)."""
    aside = None
    try:
        if os.stat(h.file).st_ino == h.ino:   # else: taken over, the file there is another's
            aside = _move_aside(h.file, h.ino)
    except (_Gone, FileNotFoundError):
        pass
    finally:
        h.close()              # only after the check: until then our inode cannot be reused
    if aside is None:
        return False
    aside.unlink(missing_ok=True)
    return True


def _move_aside(f: Path, ino: int) -> Path | None:
    """Rename ``f`` aside; the new path if the moved file is inode ``ino``, else None (the file
    is put back). _Gone: nothing was there."""
    aside = temp_name(f)   # a kill before it is removed: cleaned up as an abandoned temp file
    try:
        os.rename(f, aside)
    except FileNotFoundError:
        raise _Gone from None
    try:
        moved = os.stat(aside).st_ino
    except FileNotFoundError:
        raise _Gone from None
    if moved != ino:           # another claim replaced it meanwhile: not ours to remove
        _put_back(aside, f)
        return None
    return aside


def _put_back(aside: Path, f: Path) -> None:
    """Move ``aside`` back to ``f`` without overwriting what may be there now."""
    try:
        os.link(aside, f)
    except FileExistsError:    # yet another claim is at f: it holds the input now
        log.warning("%s: a claim moved aside could not be put back (another claim is there)", f)
    except OSError as exc:     # no hard links here: a rename back could overwrite, so not that
        log.warning("%s: a claim moved aside could not be put back: %s", f, exc)
    aside.unlink(missing_ok=True)


def _read(f: Path) -> dict | None:
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _holder_text(info: dict | None) -> str:
    if not info:
        return "(unreadable)"
    return f"{info.get('host')}:{info.get('pid')} (run {info.get('run')})"


def remove_stale_claims(writers: Iterable[Any], paths: Iterable[str], timeout: float) -> list[Path]:
    """Remove the stale claims beside ``paths`` (inputs found done: nobody needs to claim them)
    in every saving writer's folder; a live holder's claim is left alone. Returns those removed."""
    by_folder: dict[Path, list[Path]] = collections.defaultdict(list)
    for path in paths:
        for w in writers:
            if w.saves:
                f = claim_file(w, path)
                by_folder[f.parent].append(f)
    removed = []
    for folder, files in by_folder.items():
        try:   # one listing per folder, not a stat per input (reruns of long lists)
            with os.scandir(folder) as it:
                present = {e.name for e in it if e.name.endswith(SUFFIX)}
        except FileNotFoundError:
            continue
        remove_abandoned_temps(folder, folder=True)   # claims a killed run was moving aside
        for f in files:
            if f.name in present and _remove_if_stale(f, timeout, "removing the stale claim") \
                    and not os.path.lexists(f):
                removed.append(f)
    return removed


class InputQueue:
    """The inputs of a run still to start, for the dispatchers (``popleft`` / ``appendleft`` /
    truthiness, like a deque): an input is handed out only once this run holds its claim; those
    another run holds are put aside in ``elsewhere``. Without claims it is a plain queue.

    ``done(path)``, if given, says whether an input just claimed is done already (another run
    finished it after the plan): its claim is released at once and ``skipped(path)`` is called
    instead of handing it out."""

    def __init__(self, paths: Iterable[str], claims: Claims | None = None,
                 done: Callable[[str], bool] | None = None,
                 skipped: Callable[[str], None] | None = None):
        self._items = collections.deque(paths)
        self.claims = claims
        self.done = done
        self.skipped = skipped
        self._ready: collections.deque[str] = collections.deque()
        self.elsewhere: list[str] = []

    def _advance(self) -> None:
        while not self._ready and self._items:
            path = self._items.popleft()
            if self.claims is None:
                self._ready.append(path)
            elif self.claims.take(path):
                if self.done is not None and self._done(path):
                    self.claims.release(path)
                    log.info("%s was extracted by another run meanwhile: skipped", path)
                    if self.skipped is not None:
                        self.skipped(path)
                    continue
                self._ready.append(path)
            else:
                log.info("%s is being extracted by another run (%s): later", path,
                         self.claims.holder(path) or "?")
                self.elsewhere.append(path)

    def _done(self, path: str) -> bool:
        try:
            return bool(self.done(path))
        except OSError as exc:  # cannot tell: extracting it again is the safe side
            log.warning("could not check whether %s is done already: %s", path, exc)
            return False

    def __len__(self) -> int:
        self._advance()
        return len(self._ready) + len(self._items)

    def __bool__(self) -> bool:
        self._advance()
        return bool(self._ready)

    def popleft(self) -> str:
        self._advance()
        return self._ready.popleft()

    def appendleft(self, path: str) -> None:
        """Put back an input this run holds (a retry)."""
        self._ready.appendleft(path)

    def drain(self) -> list[str]:
        """Every input not yet handed out, claimed or not (e.g. to report them not started)."""
        out = list(self._ready) + list(self._items)
        for path in self._ready:
            if self.claims is not None:
                self.claims.release(path)
        self._ready.clear()
        self._items.clear()
        return out
