"""Decoding: a video file or a folder of frames -> chunks of RGB uint8 frames with timestamps.

Decoding is in-process (PyAV, FFmpeg's libraries; no ffmpeg binary) with FFmpeg's own frame
threading, and runs one chunk ahead of the consumer in a background thread, so the network can
work on chunk k while chunk k+1 is decoded. Memory is bounded by ``chunk_size``, never by the
video's length.

Frame selection for ``extraction_fps`` follows FFmpeg's ``fps`` filter (rounding "near"): output
slot ``n`` (time ``n / fps``) shows the latest input frame whose timestamp, rounded to the output
time base, is ``<= n``; frames are dropped or repeated accordingly and the output ends at the
input's duration, rounded. Nothing is re-encoded, so pixels are those of a single decode.

Timestamps: output frame ``n`` is at ``n / fps * 1000`` ms, where ``fps`` is the native rate (as
the reference tool reports frame-wise timestamps) or ``extraction_fps``.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from utils.errors import VideoError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Chunk:
    frames: np.ndarray          # (n, H, W, 3) uint8 RGB
    timestamps_ms: np.ndarray   # (n,) float64
    first_index: int            # index of frames[0] in the output frame sequence


def _round_near(x: float) -> int:
    """Round half away from zero, as FFmpeg's AV_ROUND_NEAR_INF."""
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


def select_by_timestamp(items: Iterator[tuple[float, Any]], out_fps: float,
                        end_time: Callable[[], float | None]) -> Iterator[tuple[int, Any]]:
    """Yield ``(slot, payload)`` for a stream of ``(time_s, payload)`` resampled to ``out_fps``.

    ``time_s`` is relative to the stream start. ``end_time()`` (called once the input is
    exhausted) gives the input's end (last timestamp + one frame duration) or None.
    A payload repeated for several slots is yielded once per slot (same object).
    """
    next_slot = 0
    held: Any = None
    for t, payload in items:
        slot = _round_near(t * out_fps)
        if held is not None:
            # slots before this frame's show the held frame; a held frame whose slot is taken
            # by this one is dropped
            while next_slot < slot:
                yield next_slot, held
                next_slot += 1
        held = payload
    if held is None:
        return
    end = end_time()
    last_slot = _round_near(end * out_fps) if end is not None else next_slot + 1
    while next_slot < last_slot:
        yield next_slot, held
        next_slot += 1


def _natural_key(name: str) -> list[Any]:
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", name)]


class FrameSource:
    """Frames of one input. Use as ``with open_frames(...) as src: for chunk in src.chunks(n)``."""

    def __init__(self, path: str, extraction_fps: float | None = None, frames_fps: float = 25.0):
        self.path = str(path)
        self.extraction_fps = extraction_fps
        self._container = None
        p = Path(path)
        if not p.exists():
            raise VideoError(f"file not found: {path}")
        if p.is_dir():
            self.kind = "frames"
            self._files = sorted((f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES),
                                 key=lambda f: _natural_key(f.name))
            if not self._files:
                raise VideoError(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            self.native_fps = float(frames_fps)
            self.num_frames_hint = len(self._files)
        else:
            self.kind = "video"
            if p.stat().st_size == 0:
                raise VideoError("empty file (0 bytes)")
            self._open_container()
        self.fps = float(extraction_fps) if extraction_fps else self.native_fps

    # -- video container -------------------------------------------------------------------
    def _open_container(self) -> None:
        import av

        try:
            self._container = av.open(self.path, "r", metadata_errors="ignore")
        except Exception as exc:  # av.error.* and OSError
            raise VideoError(f"not a readable video ({_short(exc)})") from None
        if not self._container.streams.video:
            self._container.close()
            raise VideoError("no video stream in file")
        vs = self._container.streams.video[0]
        vs.thread_type = "AUTO"
        rate = vs.average_rate or vs.guessed_rate or vs.base_rate
        if not rate or float(rate) <= 0:
            self._container.close()
            raise VideoError("video stream has no frame rate")
        self._stream = vs
        self.native_fps = float(rate)
        self.num_frames_hint = vs.frames or None
        if not self.num_frames_hint and vs.duration and vs.time_base:
            self.num_frames_hint = int(round(float(vs.duration * vs.time_base) * self.native_fps))

    def _video_items(self) -> Iterator[tuple[float, Any]]:
        """(seconds since stream start, av.VideoFrame) in presentation order."""
        import av

        vs = self._stream
        tb = vs.time_base
        start = None
        n = 0
        self._last_time = None
        try:
            for frame in self._container.decode(vs):
                if frame.pts is None:
                    t = n / self.native_fps
                else:
                    if start is None:
                        start = frame.pts
                    t = float((frame.pts - start) * tb)
                self._last_time = t
                n += 1
                yield t, frame
        except av.error.FFmpegError as exc:
            if n == 0:
                raise VideoError(f"no decodable video frames ({_short(exc)})") from None
            raise VideoError(f"corrupt or truncated video stream after {n} frames "
                             f"({_short(exc)})") from None
        if n == 0:
            raise VideoError("no decodable video frames")
        hint = self.num_frames_hint
        if hint and n < 0.9 * hint - 1:
            raise VideoError(f"truncated video: only {n} of the {hint} frames the container "
                             "declares could be decoded")

    def _frame_items(self) -> Iterator[tuple[float, Any]]:
        for i, f in enumerate(self._files):
            self._last_time = i / self.native_fps
            yield i / self.native_fps, f

    def _end_time(self) -> float | None:
        if getattr(self, "_last_time", None) is None:
            return None
        return self._last_time + 1.0 / self.native_fps

    @staticmethod
    def _to_rgb(payload: Any) -> np.ndarray:
        if isinstance(payload, Path):
            from PIL import Image

            try:
                with Image.open(payload) as im:
                    return np.asarray(im.convert("RGB"))
            except Exception as exc:
                raise VideoError(f"cannot read frame image {payload.name} ({_short(exc)})") from None
        return payload.to_ndarray(format="rgb24")

    def frames(self) -> Iterator[tuple[int, np.ndarray]]:
        """(output index, RGB frame) one by one; repeated frames share one array."""
        items = self._video_items() if self.kind == "video" else self._frame_items()
        if self.extraction_fps:
            cache: tuple[Any, np.ndarray] | None = None
            for slot, payload in select_by_timestamp(items, self.fps, self._end_time):
                if cache is None or cache[0] is not payload:
                    cache = (payload, self._to_rgb(payload))
                yield slot, cache[1]
        else:
            for i, (_, payload) in enumerate(items):
                yield i, self._to_rgb(payload)

    def _chunks_sync(self, chunk_size: int) -> Iterator[Chunk]:
        buf: list[np.ndarray] = []
        first = 0
        shape = None
        for idx, img in self.frames():
            if shape is None:
                shape = img.shape
            elif img.shape != shape:
                raise VideoError(f"frame {idx} has size {img.shape[1]}x{img.shape[0]}, "
                                 f"earlier frames {shape[1]}x{shape[0]}")
            if not buf:
                first = idx
            buf.append(img)
            if len(buf) == chunk_size:
                yield self._make_chunk(buf, first)
                buf = []
        if buf:
            yield self._make_chunk(buf, first)

    def _make_chunk(self, buf: list[np.ndarray], first: int) -> Chunk:
        ts = (np.arange(first, first + len(buf), dtype=np.float64) / self.fps) * 1000.0
        return Chunk(np.stack(buf), ts, first)

    def chunks(self, chunk_size: int, prefetch: bool = True) -> Iterator[Chunk]:
        """Chunks of up to ``chunk_size`` frames; decoding runs one chunk ahead in a thread."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if not prefetch:
            yield from self._chunks_sync(chunk_size)
            return
        q: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        done = object()

        def work() -> None:
            try:
                for ch in self._chunks_sync(chunk_size):
                    while not stop.is_set():
                        try:
                            q.put(ch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as exc:  # handed to the consumer, raised there
                q.put(exc)

        t = threading.Thread(target=work, name="decode", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
                t.join(timeout=0.05)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_frames(path: str, extraction_fps: float | None = None,
                frames_fps: float = 25.0) -> FrameSource:
    """Open a video file or a folder of frames; raises VideoError with a one-line reason."""
    return FrameSource(path, extraction_fps, frames_fps)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.replace(os.getcwd() + os.sep, "")
    return text[:200]
