"""Work claims: several runs on one list and output folder do each input once.

Before a run starts an input it creates ``.<stem>.claim`` beside the input's outputs (in every
feature type's folder of the run) with ``O_CREAT | O_EXCL``, holding its host, pid and start
time; the run touches its claims every ``claim_timeout / 10`` seconds (the heartbeat) and removes
them when the input is finished. An input another run holds is put aside: once the queue is
empty the run waits for it, and finds it done (the other run's outputs, reported as skipped),
or takes it over when the holder is gone: a claim whose process no longer exists (same host) or
whose heartbeat is older than ``claim_timeout`` (any host) is stale. A takeover renames the stale
claim away before creating its own, so two runs taking over at once cannot both win.

Claims need a shared file system that honours ``O_EXCL`` and ``rename`` (local disks, NFSv3+,
Lustre, GPFS do).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from video_features.utils.output import HOST, _pid_alive

log = logging.getLogger(__name__)


class Claims:
    """The claims of one run: taking, heartbeat, release."""

    def __init__(self, writers: Iterable[Any], timeout: float):
        self.writers = [w for w in writers if w.saves]
        self.timeout = float(timeout)
        self.held: dict[str, list[Path]] = {}
        self.me = {"host": HOST, "pid": os.getpid(), "run": uuid.uuid4().hex[:12]}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="claims-heartbeat", daemon=True)
        self._beat.start()

    def files(self, path: str) -> list[Path]:
        return [w.video_dir(path) / f".{w.stem(path)}.claim" for w in self.writers]

    def take(self, path: str) -> bool:
        """Claim ``path`` in every folder, or in none (False: another live run holds it)."""
        got: list[Path] = []
        for f in self.files(path):
            if not self._take_one(f):
                for g in got:
                    g.unlink(missing_ok=True)
                return False
            got.append(f)
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

    def _take_one(self, f: Path) -> bool:
        f.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale(f) or not _remove_stale(f):
                    return False
                continue       # the stale claim is gone: try to create ours again
            with os.fdopen(fd, "w") as out:
                json.dump({**self.me, "started": time.time()}, out)
            return True
        return False

    def _stale(self, f: Path) -> bool:
        info = _read(f)
        try:
            age = time.time() - f.stat().st_mtime
        except FileNotFoundError:
            return True
        if info is None:           # being written right now, or garbage: judged by its age
            return age > self.timeout
        if info.get("host") == HOST and not _pid_alive(int(info.get("pid", 0))):
            return True
        return age > self.timeout

    def release(self, path: str) -> None:
        with self._lock:
            files = self.held.pop(path, [])
        for f in files:
            f.unlink(missing_ok=True)

    def release_all(self) -> None:
        for path in list(self.held):
            self.release(path)

    def close(self) -> None:
        self._stop.set()
        self.release_all()

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.5, self.timeout / 10)):
            with self._lock:
                files = [f for fs in self.held.values() for f in fs]
            for f in files:
                try:
                    os.utime(f)
                except FileNotFoundError:  # taken over (we were judged gone): the other run has it
                    pass


def _read(f: Path) -> dict | None:
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def _remove_stale(f: Path) -> bool:
    """Move a stale claim out of the way; False when someone else moved or renewed it first."""
    before = _inode(f)
    aside = f.with_name(f"{f.name}.stale.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(f, aside)
    except FileNotFoundError:
        return True                # gone already: free to create
    if _inode(aside) != before:    # a fresh claim replaced the stale one meanwhile: put it back
        try:
            os.link(aside, f)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    log.warning("taking over %s: its holder %s is gone", f, _read(aside) or "(unreadable)")
    aside.unlink(missing_ok=True)
    return True


def _inode(f: Path) -> int | None:
    try:
        return f.stat().st_ino
    except FileNotFoundError:
        return None


class InputQueue:
    """The inputs of a run still to start, for the dispatchers (``popleft`` / ``appendleft`` /
    truthiness, like a deque): an input is handed out only once this run holds its claim; those
    another run holds are put aside in ``elsewhere``. Without claims it is a plain queue."""

    def __init__(self, paths: Iterable[str], claims: Claims | None = None):
        self._items = collections.deque(paths)
        self.claims = claims
        self._ready: collections.deque[str] = collections.deque()
        self.elsewhere: list[str] = []

    def _advance(self) -> None:
        while not self._ready and self._items:
            path = self._items.popleft()
            if self.claims is None or self.claims.take(path):
                self._ready.append(path)
            else:
                log.info("%s is being extracted by another run (%s): later", path,
                         self.claims.holder(path) or "?")
                self.elsewhere.append(path)

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
