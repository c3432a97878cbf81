"""Sliding windows (stacks) over a stream of frames that arrives in chunks.

Works on numpy arrays and torch tensors alike (frames on the first axis), so an extractor can
window frames that are already resized on the device: overlapping stacks (step < size) then
share the decoded and preprocessed frames instead of recomputing them.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

TAILS = ("drop", "pad")


def _cat(parts: Sequence[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(list(parts))


class SlidingWindows:
    """Push chunks in, take complete windows out.

    A window holds ``size`` consecutive frames; the next starts ``step`` frames later. With
    ``tail='drop'`` (the reference tool's behaviour) frames after the last complete window are
    ignored; with ``tail='pad'`` one more window starting at the next step position is emitted,
    completed by repeating its last real frame. Each window comes with the timestamps of its
    frames (padded slots repeat the last timestamp) and the number of real frames in it.
    """

    def __init__(self, size: int, step: int, tail: str = "drop"):
        if size < 1 or step < 1:
            raise ValueError("size and step must be >= 1")
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}")
        self.size, self.step, self.tail = size, step, tail
        self._frames: list[Any] = []
        self._ts: list[np.ndarray] = []
        self._n = 0          # frames buffered
        self._skip = 0       # frames still to discard before the next window starts (step > size)

    def _trim_front(self, k: int) -> None:
        frames, ts = _cat(self._frames), np.concatenate(self._ts)
        self._frames, self._ts = [frames[k:]], [ts[k:]]
        self._n -= k

    def push(self, frames: Any, timestamps: np.ndarray) -> list[tuple[Any, np.ndarray, int]]:
        """Add frames; return the windows completed by them as ``(frames, timestamps, n_real)``."""
        timestamps = np.asarray(timestamps, dtype=np.float64)
        if self._skip:
            k = min(self._skip, len(timestamps))
            frames, timestamps = frames[k:], timestamps[k:]
            self._skip -= k
        if len(timestamps) == 0:
            return []
        self._frames.append(frames)
        self._ts.append(timestamps)
        self._n += len(timestamps)
        out = []
        while self._n >= self.size:
            allf, allt = _cat(self._frames), np.concatenate(self._ts)
            self._frames, self._ts = [allf], [allt]
            out.append((allf[: self.size], allt[: self.size], self.size))
            drop = min(self.step, self._n)
            self._skip = self.step - drop
            self._trim_front(drop)
        return out

    def finish(self) -> list[tuple[Any, np.ndarray, int]]:
        """The padded tail window, if ``tail='pad'`` and real frames are left over."""
        if self.tail != "pad" or self._n == 0:
            return []
        frames, ts = _cat(self._frames), np.concatenate(self._ts)
        n = len(ts)
        idx = np.minimum(np.arange(self.size), n - 1)
        self._frames, self._ts, self._n = [], [], 0
        return [(frames[idx] if isinstance(frames, np.ndarray) else frames[list(idx)], ts[idx], n)]


def stack_windows(windows: list[tuple[Any, np.ndarray, int]]) -> tuple[Any, np.ndarray] | None:
    """Windows ``(frames, timestamps, n_real)`` -> ``(stacks, stamps)``: the windows stacked on a
    new first axis (torch or numpy, like its inputs) and each stack's ``(first, last real)``
    frame timestamps, ``(T, 2)`` (see ``Extractor.row_times``). None when there are no windows."""
    if not windows:
        return None
    parts = [frames for frames, _, _ in windows]
    if isinstance(parts[0], np.ndarray):
        stacks = np.stack(parts)
    else:
        import torch

        stacks = torch.stack(parts)
    return stacks, np.array([(ts[0], ts[n_real - 1]) for _, ts, n_real in windows],
                            dtype=np.float64).reshape(-1, 2)
