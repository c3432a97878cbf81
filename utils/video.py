"""Decoding: a video file or a folder of frames -> chunks of RGB uint8 frames with timestamps.

Decoding is in-process (PyAV, FFmpeg's libraries; no ffmpeg binary) with FFmpeg's own frame
threading, and runs one chunk ahead of the consumer in a background thread, so the network can
work on chunk k while chunk k+1 is decoded. Memory is bounded by ``chunk_size``, never by the
video's length.

Frame selection for ``extraction_fps`` follows FFmpeg's ``fps`` filter (rounding "near"): output
slot ``n`` (time ``n / fps``) shows the latest input frame whose timestamp, rounded to the output
time base, is ``<= n``; frames are dropped or repeated accordingly and the output ends at the
input's duration, rounded. Nothing is re-encoded, so pixels are those of a single decode.

Timestamps (``Chunk.timestamps_ms``, float64): at the native rate, a video frame's presentation
time, ``(pts - first frame's pts) * time_base * 1000``, so variable-frame-rate videos get their
true times (``timestamps="index"`` gives the reference tool's ``n / fps * 1000`` instead; a frame
without a pts falls back to that). With ``extraction_fps`` the output is a regular grid and slot
``n`` is at ``n / extraction_fps * 1000`` in both modes. Folders of frames have no pts: frame
``n`` is at ``n / frames_fps * 1000``.

Truncation is checked when a file is opened, before any frame is decoded: a file that ends before
the packets its container's index declares (e.g. a cut download of a "faststart" mp4, whose index
comes first) is rejected with the time it ends at. Frame counts are not compared, since edit lists
and variable frame rates make them differ from what decodes in good files. Matroska/WebM files
without cues up front (a cut download) are checked when their stream ends: one that stops short of
the end time its track declares (the muxer's DURATION tag) is rejected as truncated. Other
containers without an index (MPEG-TS, raw streams) cannot be checked.

Damaged data inside a stream: a packet the decoder rejects is skipped, as FFmpeg's command line and
players do, and decoding goes on from the next one; the input gets one warning with the number of
skipped packets and where the first one was. Rows keep the presentation times of the frames that
did decode (a gap in ``timestamps_ms``, no shift of later rows; with ``extraction_fps`` the slots
there show the last good frame, as FFmpeg's ``fps`` filter). An input fails only when no frame
decodes at all, or when the container cannot be read past some point (the rest of the video would
be missing: reported with the frame and time it stops at). A source that decoded around skipped
packets says so in ``damage`` (one line, for the output's record and the run's summary).

Which stream: a file with several video streams is decoded from the one FFmpeg picks by default
(``av_find_best_stream``, through PyAV's ``streams.best``: a stream with the DEFAULT disposition
before one without, a hearing/visual-impaired one last, then the one whose probing decoded more
frames (up to 5), then the higher bit rate, then the first), as ffplay and NVIDIA's demuxer do;
``video_stream=k`` picks the k-th video stream instead, and a file without it fails with the
number it has (:func:`pick_stream`). The audio decoder (utils/audio.py) picks by the same rule.
Other tools differ where no stream is DEFAULT or the DEFAULT one is not the first: the ffmpeg
command line maps the video stream with the most pixels plus 5,000,000 for the DEFAULT disposition
(audio: the most channels, the same bonus), OpenCV reads the first video stream.

Orientation (``rotation="auto"``, the default): frames are turned upright as players show them:
a video frame by its display matrix (phones record portrait video as landscape frames with a
90-degree rotation; FFmpeg's autorotate rule, flips included), a frame image by its EXIF
orientation. ``rotation="raw"`` keeps frames as stored.

Memory: a chunk holds at most ``CHUNK_BYTES`` of frames (at least one frame), so a 4K or 8K video
is handed out a frame or a few at a time, whatever ``chunk_size`` asks for.
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

from video_features.utils.errors import VideoError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
TIMESTAMP_MODES = ("pts", "index")
ROTATIONS = ("auto", "raw")
#: frame bytes per chunk at most (as one transfer slot of utils/pipeline.py): chunks of large
#: frames are shorter, so memory stays bounded by the chunk whatever the frame size
CHUNK_BYTES = 32 << 20
#: (transpose, flip rows, flip columns), applied in this order: how a frame is shown upright
UPRIGHT = (False, False, False)


@dataclass
class Chunk:
    frames: np.ndarray          # (n, H, W, 3) uint8 RGB
    timestamps_ms: np.ndarray   # (n,) float64
    first_index: int            # index of frames[0] in the output frame sequence
    #: at the native rate: each frame's time in seconds from the first frame (presentation time
    #: in either timestamp mode; what extraction_fps selects by); None with extraction_fps
    times_s: np.ndarray | None = None


def round_near(x: np.ndarray) -> np.ndarray:
    """Round half away from zero, elementwise (int64)."""
    x = np.asarray(x, dtype=np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


#: FFmpeg rounds exact halves up (integer time bases); a time computed in floats from pts or
#: from an index may land a hair either side of such a half, so every time is nudged up by far
#: less than any real gap (slot numbers stay below ~1e7, where float64 resolves ~1e-9)
TIE = 1e-9


class SlotSelector:
    """FFmpeg's ``fps`` filter as a stream: push the times of consecutive input frames, get back
    which input frame each completed output slot shows.

    Output slot ``n`` (time ``n / out_fps``) shows the latest input frame whose time, rounded to
    the output time base, is ``<= n``. A frame's slots are only known once the next frame (or
    the end of the input) arrives, so the last frame pushed is *held*: in a later ``push`` (or
    in ``finish``) it is referred to as input ``-1``. Vectorised: one call per chunk of frames.
    """

    def __init__(self, out_fps: float):
        self.fps = float(out_fps)
        self.next_slot = 0
        self.holding = False

    def push(self, times_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Times (seconds from the stream start) of the next input frames -> ``(picks, slots)``:
        for each output slot completed by them, the input it shows (an index into this push's
        frames, or -1 for the frame held from before) and the slot number."""
        times_s = np.asarray(times_s, dtype=np.float64)
        if len(times_s) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        s = round_near(times_s * self.fps + TIE)
        base = self.next_slot
        if not self.holding:
            s[0] = base  # nothing is held yet: the first frame's arrival shows nothing
        # arrival k shows the frame before it (k - 1; -1 = the held one) up to its own slot
        ends = np.maximum.accumulate(np.maximum(s, base))
        starts = np.concatenate([[base], ends[:-1]])
        picks = np.repeat(np.arange(len(s)) - 1, ends - starts)
        self.next_slot = int(ends[-1])
        self.holding = True
        return picks, base + np.arange(len(picks), dtype=np.int64)

    def finish(self, end_s: float | None) -> tuple[np.ndarray, np.ndarray]:
        """The held frame's slots up to the input's end (last time + one frame duration; None:
        unknown, one slot) as ``(picks, slots)``; every pick is -1."""
        if not self.holding:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        last = int(round_near(end_s * self.fps + TIE)) if end_s is not None else self.next_slot + 1
        n = max(0, last - self.next_slot)
        slots = self.next_slot + np.arange(n, dtype=np.int64)
        self.next_slot += n
        self.holding = False
        return np.full(n, -1, np.int64), slots


def select_by_timestamp(items: Iterator[tuple[float, Any]], out_fps: float,
                        end_time: Callable[[], float | None]) -> Iterator[tuple[int, Any]]:
    """Yield ``(slot, payload)`` for a stream of ``(time_s, payload)`` resampled to ``out_fps``
    (:class:`SlotSelector`, one frame at a time).

    ``time_s`` is relative to the stream start. ``end_time()`` (called once the input is
    exhausted) gives the input's end (last timestamp + one frame duration) or None.
    A payload repeated for several slots is yielded once per slot (same object).
    """
    selector = SlotSelector(out_fps)
    held: Any = None
    one = np.zeros(1, np.float64)
    for t, payload in items:
        one[0] = t
        for slot in selector.push(one)[1]:  # every pick is the held frame
            yield int(slot), held
        held = payload
    if held is None:
        return
    for slot in selector.finish(end_time())[1]:
        yield int(slot), held


def display_matrix(frame: Any) -> np.ndarray | None:
    """A decoded frame's display matrix (9 int32 in FFmpeg's ``AV_FRAME_DATA_DISPLAYMATRIX``
    layout, 16.16 fixed point), or None where it carries none."""
    try:
        sd = frame.side_data.get("DISPLAYMATRIX")
    except Exception:  # a PyAV without side data by type name
        return None
    if sd is None:
        return None
    m = np.frombuffer(bytes(sd), dtype=np.int32)
    return m[:9] if len(m) >= 9 else None


def upright_ops(matrix: Any) -> tuple[bool, bool, bool]:
    """A display matrix -> ``(transpose, flip rows, flip columns)`` that show the frame as
    players do: FFmpeg's autorotate rule (fftools), which inserts ``transpose=clock`` for a
    phone's portrait video (matrix rotation -90), ``cclock_flip`` / ``clock_flip`` when the
    matrix also mirrors, h/v flips for 180 degrees and a mirror-only matrix. Angles that are not
    a multiple of 90 degrees are left as stored (FFmpeg rotates those with padding)."""
    if matrix is None:
        return UPRIGHT
    m0, m1, m3, m4 = (float(matrix[i]) / 65536.0 for i in (0, 1, 3, 4))
    sx, sy = math.hypot(m0, m3), math.hypot(m1, m4)
    if sx == 0.0 or sy == 0.0:
        return UPRIGHT
    # clockwise degrees, as fftools' get_rotation(): -round(av_display_rotation_get(matrix))
    theta = float(math.floor(math.degrees(math.atan2(m1 / sy, m0 / sx)) + 0.5))
    theta -= 360.0 * math.floor(theta / 360.0 + 0.9 / 360.0)
    if abs(theta - 90.0) < 1.0:
        return (True, False, not m3 > 0)    # clock, or cclock_flip (a plain transpose)
    if abs(theta - 180.0) < 1.0:
        return (False, m4 < 0, m0 < 0)      # vflip, hflip
    if abs(theta - 270.0) < 1.0:
        return (True, True, m3 < 0)         # cclock, or clock_flip
    if abs(theta) < 1.0:
        return (False, m4 < 0, False)       # a mirror-only matrix: vflip
    return UPRIGHT


def upright(img: np.ndarray, ops: tuple[bool, bool, bool]) -> np.ndarray:
    """An (H, W, C) frame turned by :func:`upright_ops`' result (contiguous)."""
    transpose, rows, cols = ops
    if transpose:
        img = img.transpose(1, 0, 2)
    if rows:
        img = img[::-1]
    if cols:
        img = img[:, ::-1]
    return np.ascontiguousarray(img)


def stream_upright(path: str, video_stream: int | None = None) -> tuple[bool, bool, bool]:
    """How the frames of the video at ``path`` are turned upright (:func:`upright_ops` of the
    first decodable frame of its video stream, :func:`pick_stream`'s); for decoders that do not
    apply it themselves."""
    import av

    try:
        with av.open(str(path), "r", metadata_errors="ignore") as c:
            for frame in c.decode(pick_stream(c, "video", video_stream)[0]):
                return upright_ops(display_matrix(frame))
    except Exception:  # unreadable: the decoder's own error says why
        pass
    return UPRIGHT


def _duration_tag(text: Any) -> float | None:
    """Matroska's per-track ``DURATION`` tag (``HH:MM:SS.nnnnnnnnn``) in seconds, or None."""
    try:
        h, m, sec = str(text).strip().split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec)
    except (ValueError, AttributeError):
        return None


def _natural_key(name: str) -> list[Any]:
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", name)]


STREAM_KINDS = ("video", "audio")


def stream_count_text(kind: str, n: int) -> str:
    """"2 video streams (0 and 1)"-style: how many streams of ``kind`` a file has."""
    if n == 0:
        return f"no {kind} stream"
    if n == 1:
        return f"1 {kind} stream (index 0)"
    ids = "0 and 1" if n == 2 else f"0 to {n - 1}"
    return f"{n} {kind} streams ({ids})"


def pick_stream(container: Any, kind: str, index: int | None = None) -> tuple[Any, int, int]:
    """The stream of ``kind`` ("video" or "audio") to decode, as ``(stream, position among the
    file's streams of that kind, how many it has)``.

    ``index`` None: the one FFmpeg picks by default, ``av_find_best_stream`` itself (PyAV's
    ``streams.best``): the highest disposition score (one point for the DEFAULT disposition,
    one for not being marked hearing- or visual-impaired), then the one whose probing decoded
    more frames (counted up to 5), then the higher bit rate, then the more probed frames; on a
    full tie the first. Audio streams without channels or a sample rate are never picked by it;
    where it picks none, the first stream of the kind is taken. ``index`` k: the k-th stream of
    the kind; a file with fewer (or none) raises :class:`VideoError` naming how many it has.
    """
    if kind not in STREAM_KINDS:
        raise ValueError(f"kind must be one of {', '.join(STREAM_KINDS)}, not {kind!r}")
    streams = list(getattr(container.streams, kind))
    n = len(streams)
    if n == 0:
        raise VideoError(f"no {kind} stream in file")
    if index is None:
        best = container.streams.best(kind) if n > 1 else None
        pos = next((i for i, s in enumerate(streams)
                    if best is not None and s.index == best.index), 0)
    elif not 0 <= int(index) < n:
        raise VideoError(f"{kind}_stream={index}: the file has {stream_count_text(kind, n)}")
    else:
        pos = int(index)
    return streams[pos], pos, n


class FrameSource:
    """Frames of one input. Use as ``with open_frames(...) as src: for chunk in src.chunks(n)``."""

    def __init__(self, path: str, extraction_fps: float | None = None, frames_fps: float = 25.0,
                 timestamps: str = "pts", threads: int = 0, extraction_total: int | None = None,
                 rotation: str = "auto", video_stream: int | None = None):
        if extraction_fps and extraction_total:
            raise ValueError("extraction_fps and extraction_total are mutually exclusive")
        if timestamps not in TIMESTAMP_MODES:
            raise ValueError(f"timestamps must be one of {', '.join(TIMESTAMP_MODES)}, "
                             f"not {timestamps!r}")
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {', '.join(ROTATIONS)}, not {rotation!r}")
        self.path = str(path)
        self.extraction_fps = extraction_fps
        self.timestamps = timestamps
        self.rotation = rotation
        #: the video stream asked for (its index among the file's video streams; None: FFmpeg's
        #: default choice); once open, ``stream`` is the one decoded and ``streams`` their count
        self.video_stream = video_stream
        self.stream: int | None = None
        self.streams = 0
        #: one line saying what was decoded around (skipped packets), once the frames are read;
        #: None for an input that decoded cleanly
        self.damage: str | None = None
        self._image_size: tuple | None = None  # a frame folder's first image (H, W, 3)
        self.threads = int(threads)  # FFmpeg decoding threads; 0: FFmpeg's choice (all cores)
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
        else:
            self.kind = "video"
            if p.stat().st_size == 0:
                raise VideoError("empty file (0 bytes)")
            self._open_container()
        #: at most this many frames are yielded (extraction_total), else None
        self.total = int(extraction_total) if extraction_total else None
        if self.total:
            # evenly spaced frames: the rate that spreads ``total`` slots over the input, as the
            # reference tool's re-encoding at total * fps / frame count
            n = self.frame_count()
            if not n:
                self.close()
                raise VideoError("extraction_total: the container does not declare the video's "
                                 "length or frame count; use extraction_fps instead")
            extraction_fps = self.total * self.native_fps / n
            self.extraction_fps = extraction_fps
        self.fps = float(extraction_fps) if extraction_fps else self.native_fps

    def frame_count(self) -> int | None:
        """Frames of the input as its container declares them (the index's count, else the
        declared duration times the frame rate); None where it declares neither."""
        if self.kind == "frames":
            return len(self._files)
        if self._stream.frames:
            return int(self._stream.frames)
        declared = self._declared_s()
        return max(1, int(round(declared * self.native_fps))) if declared else None

    # -- video container -------------------------------------------------------------------
    def _open_av(self) -> None:
        import av

        try:
            self._container = av.open(self.path, "r", metadata_errors="ignore")
        except Exception as exc:  # av.error.* and OSError
            raise VideoError(f"not a readable video ({_short(exc)})") from None
        if not self._container.streams.video:
            audio_only = bool(self._container.streams.audio)
            self.close()
            hint = " (only audio: the audio feature types, vggish and clap, read it)"
            raise VideoError("no video stream in file" + (hint if audio_only else ""))
        # reopened (after the truncation probe): the stream chosen the first time
        want = self.video_stream if self.stream is None else self.stream
        try:
            self._stream, self.stream, self.streams = pick_stream(self._container, "video", want)
        except VideoError:
            self.close()
            raise
        self._stream.thread_type = "AUTO"
        if self.threads:
            self._stream.codec_context.thread_count = self.threads

    def _open_container(self) -> None:
        self._open_av()
        vs = self._stream
        rate = vs.average_rate or vs.guessed_rate or vs.base_rate
        if not rate or float(rate) <= 0:
            self.close()
            raise VideoError("video stream has no frame rate")
        self.native_fps = float(rate)
        try:
            self._check_complete()
        except VideoError:
            self.close()
            raise

    # -- truncation, checked before any frame is decoded -----------------------------------
    def _check_complete(self) -> None:
        entries = _index_entries(self._stream)
        missing = self._index_shortfall(entries) if entries is not None else self._probe_shortfall()
        if missing:
            raise VideoError(f"truncated video: {missing}")

    def _declared_s(self) -> float | None:
        vs = self._stream
        if vs.duration and vs.time_base:
            return float(vs.duration * vs.time_base)
        if self._container.duration:
            return self._container.duration / 1e6
        return None

    def _ends_at(self, ends_s: float) -> str:
        declared = self._declared_s()
        text = f"the file ends at {max(0.0, ends_s):.1f} s"
        return text + (f" of the declared {declared:.1f} s" if declared else "")

    def _index_shortfall(self, entries: Any) -> str | None:
        """The index lists each packet's byte range: is every byte of the video stream's there?

        Only the video stream is checked: it is all this class decodes. Demuxers that build their
        index while reading (MPEG-TS, Matroska with cues at the end) list only packets already
        read, which are present, so they pass.
        """
        vs = self._stream
        size = os.path.getsize(self.path)
        # an unknown position (-1) never counts; Matroska cues have size 0: their cluster must at
        # least start inside the file
        missing = [e for e in entries if e.pos + (e.size or 1) > size]
        if not missing:
            return None
        needed = max(e.pos + (e.size or 1) for e in missing)
        ref = vs.start_time if vs.start_time is not None else entries[0].timestamp
        ends_s = float((min(e.timestamp for e in missing) - ref) * vs.time_base)
        return f"{self._ends_at(ends_s)} (it has {size} of the {needed} bytes its index declares)"

    def _probe_shortfall(self) -> str | None:
        """For PyAV without ``index_entries``: demux the last GOP of an mp4/mov video stream.

        The seek uses the sample table read at open; packets whose bytes are missing end the
        demux early (or come back cut short), so a complete file reaches the declared end and a
        cut one does not. Only packets are read (at most about one GOP, nothing decoded), and the
        container is reopened afterwards so that decoding starts exactly as without the probe.
        Any other container, or a failing seek, is not checked.
        """
        import av

        c, vs, tb = self._container, self._stream, self._stream.time_base
        if "mov" not in c.format.name.split(",") or not vs.duration or not tb:
            return None
        start = vs.start_time or 0
        end = start + vs.duration
        frame = max(1, int(1 / (self.native_fps * tb)))  # one frame in time_base units
        try:
            c.seek(max(start, end - frame), stream=vs, backward=True)
        except (av.error.FFmpegError, OSError, ValueError):
            return None
        reached: int | None = None
        cut = False
        try:
            for pkt in c.demux(vs):
                if pkt.size == 0 or pkt.pts is None:  # the flush packet
                    continue
                if pkt.is_corrupt:  # its bytes run past the end of the file
                    cut = True
                    break
                pkt_end = pkt.pts + (pkt.duration or 0)
                reached = pkt_end if reached is None else max(reached, pkt_end)
        except av.error.FFmpegError:
            cut = True  # a read error before the end
        self.close()  # the streams' fields are gone with it: only tb, start, end are used below
        self._open_av()
        # two frames of slack: rounding of the declared duration and of the last frame's length
        if not cut and reached is not None and reached >= end - 2 * frame:
            return None
        if reached is None:  # not even the last keyframe's packet is there
            declared = self._declared_s()
            return f"the file ends before its last keyframe (declared length {declared:.1f} s)"
        return f"{self._ends_at(float((reached - start) * tb))} (its last packets are missing)"

    def _video_items(self) -> Iterator[tuple[float, Any]]:
        """(seconds since stream start, av.VideoFrame) in presentation order."""
        import av

        vs = self._stream
        tb = vs.time_base
        start = None
        n = 0
        bad = 0            # packets the decoder rejected (skipped, as FFmpeg's command line does)
        first_bad = first_where = ""
        self._last_time = None
        self._last_duration: float | None = None
        packets = self._container.demux(vs)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError as exc:  # the container cannot be read on: the rest is lost
                if n == 0:
                    raise VideoError(f"no decodable video frames ({_short(exc)})") from None
                raise VideoError(f"corrupt or truncated video: the file cannot be read past frame "
                                 f"{n} ({self._last_time:.2f} s) ({_short(exc)})") from None
            try:
                frames = packet.decode()
            except av.error.EOFError:
                break
            except av.error.FFmpegError as exc:
                bad += 1
                if bad == 1:
                    where = f" after frame {n - 1}, {self._last_time:.2f} s" if n else ""
                    first_bad = f"the first{where}: {_short(exc)}"
                    first_where = f" (the first{where or ' before any frame'})"
                continue
            for frame in frames:
                if frame.pts is None:
                    t = n / self.native_fps
                else:
                    if start is None:
                        start = frame.pts
                    t = float((frame.pts - start) * tb)
                self._last_time = t
                # the last frame's own length ends the stream, as in FFmpeg's fps filter
                dur = getattr(frame, "duration", None)
                self._last_duration = float(dur * tb) if dur and tb else None
                n += 1
                yield t, frame
        if n == 0:
            raise VideoError("no decodable video frames" + (
                f" ({bad} packet(s) rejected by the decoder, {first_bad})" if bad else ""))
        if bad:
            log.warning("%s: skipped %d undecodable video packet(s) (%s); decoded %d frames "
                        "around them", self.path, bad, first_bad, n)
            self.damage = (f"skipped {bad} undecodable video packet{'s' if bad > 1 else ''}"
                           f"{first_where}; decoded {n} frames")
        self._check_declared_end(start)

    def _check_declared_end(self, first_pts: int | None) -> None:
        """Matroska/WebM: the stream must reach the end its track declares (the muxer's
        ``DURATION`` tag, absolute in the file's timeline), else the file was cut. Files whose
        cues come first were checked when opened; this catches the usual layout, cues last."""
        if "matroska" not in self._container.format.name.split(","):
            return
        tags = {k.upper(): v for k, v in (self._stream.metadata or {}).items()}
        declared = _duration_tag(tags.get("DURATION") or next(
            (v for k, v in tags.items() if k.startswith("DURATION")), None))
        if not declared or self.end_time() is None:
            return
        tb = self._stream.time_base
        reached = (float(first_pts * tb) if first_pts is not None and tb else 0.0) + self.end_time()
        # a few frames of slack: the last frame's length is a guess where the file does not say
        if reached < declared - max(3.0 / self.native_fps, 0.1):
            raise VideoError(f"truncated video: the stream ends at {reached:.2f} s of the "
                             f"{declared:.2f} s its container declares")

    def _frame_items(self) -> Iterator[tuple[float, Any]]:
        for i, f in enumerate(self._files):
            self._last_time = i / self.native_fps
            yield i / self.native_fps, f

    def end_time(self) -> float | None:
        """Seconds from the first frame to the end of the last one read (None before any)."""
        if getattr(self, "_last_time", None) is None:
            return None
        return self._last_time + (getattr(self, "_last_duration", None) or 1.0 / self.native_fps)

    def _to_rgb(self, payload: Any) -> np.ndarray:
        if isinstance(payload, Path):
            return self._read_image(payload)
        img = payload.to_ndarray(format="rgb24")
        if self.rotation == "auto":
            ops = upright_ops(display_matrix(payload))
            if ops != UPRIGHT:
                img = upright(img, ops)
        return img

    def _read_image(self, path: Path) -> np.ndarray:
        from PIL import Image, ImageOps

        try:
            with Image.open(path) as im:
                shown = ImageOps.exif_transpose(im) if self.rotation == "auto" else im
                img = np.asarray(shown.convert("RGB"))
        except Exception as exc:
            raise VideoError(f"cannot read frame image {path.name} ({_short(exc)})") from None
        if self._image_size is None:
            self._image_size = img.shape
        elif img.shape != self._image_size:
            h, w = self._image_size[:2]
            raise VideoError(f"frame image {path.name} is {img.shape[1]}x{img.shape[0]}, the "
                             f"images before it {w}x{h}: every image of a frame folder must have "
                             "the same size")
        return img

    def timed_frames(self) -> Iterator[tuple[int, float, np.ndarray]]:
        """(output index, timestamp ms, RGB frame) one by one; repeated frames share one array."""
        items = self._video_items() if self.kind == "video" else self._frame_items()
        if self.extraction_fps:
            cache: tuple[Any, np.ndarray] | None = None
            for slot, payload in select_by_timestamp(items, self.fps, self.end_time):
                if self.total is not None and slot >= self.total:
                    break  # a declared length a little short of the decoded one
                if cache is None or cache[0] is not payload:
                    cache = (payload, self._to_rgb(payload))
                yield slot, slot / self.fps * 1000.0, cache[1]
            if cache is None and self.end_time() is not None:
                # FFmpeg's fps filter gives no frame either: say why rather than "no frames"
                raise VideoError(f"no frame at {self.fps:g} fps: the input lasts "
                                 f"{self.end_time():.3f} s, less than half a frame interval at "
                                 "that rate; use a higher extraction_fps or the native rate")
        else:
            # items' times are pts-based for videos (index / fps without a pts) and
            # index / frames_fps for frame folders
            by_pts = self.timestamps == "pts"
            for i, (t, payload) in enumerate(items):
                self.time_s = t  # read by consumers that select frames themselves
                yield i, (t if by_pts else i / self.fps) * 1000.0, self._to_rgb(payload)

    def _chunks_sync(self, chunk_size: int) -> Iterator[Chunk]:
        buf: list[np.ndarray] = []
        stamps: list[float] = []
        times: list[float] = []
        native = not self.extraction_fps
        first = 0
        shape = None

        def chunk() -> Chunk:
            return Chunk(np.stack(buf), np.asarray(stamps, dtype=np.float64), first,
                         np.asarray(times, dtype=np.float64) if native else None)

        for idx, ts, img in self.timed_frames():
            if shape is None:
                shape = img.shape
                chunk_size = max(1, min(chunk_size, CHUNK_BYTES // img.nbytes))
            check_same_size(img, shape, idx)
            if not buf:
                first = idx
            buf.append(img)
            stamps.append(ts)
            if native:
                times.append(self.time_s)
            if len(buf) == chunk_size:
                yield chunk()
                buf, stamps, times = [], [], []
        if buf:
            yield chunk()

    def chunks(self, chunk_size: int, prefetch: bool = True) -> Iterator[Chunk]:
        """Chunks of up to ``chunk_size`` frames (fewer where they would exceed ``CHUNK_BYTES``);
        decoding runs one chunk ahead in a thread."""
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


def open_frames(path: str, extraction_fps: float | None = None, frames_fps: float = 25.0,
                timestamps: str = "pts", threads: int = 0,
                extraction_total: int | None = None, rotation: str = "auto",
                video_stream: int | None = None) -> FrameSource:
    """Open a video file or a folder of frames; raises VideoError with a one-line reason.

    ``timestamps``: "pts" (presentation times) or "index" (``n / fps``, the reference tool's).
    ``extraction_total``: that many evenly spaced frames (instead of a rate).
    ``rotation``: "auto" (frames upright as players show them) or "raw" (as stored).
    ``video_stream``: which of a file's video streams (:func:`pick_stream`; None: FFmpeg's
    default choice).
    """
    return FrameSource(path, extraction_fps, frames_fps, timestamps, threads, extraction_total,
                       rotation, video_stream)


def _index_entries(stream: Any) -> Any:
    """The stream's demuxer index (``Stream.index_entries``, in PyAV 18), or None where this
    PyAV does not expose it (then the seek probe checks instead)."""
    return getattr(stream, "index_entries", None)


def check_same_size(img: np.ndarray, shape: tuple, idx: int) -> None:
    """Every frame of an input must have the first frame's size (a frame folder may not)."""
    if img.shape != shape:
        raise VideoError(f"frame {idx} has size {img.shape[1]}x{img.shape[0]}, "
                         f"earlier frames {shape[1]}x{shape[0]}")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.replace(os.getcwd() + os.sep, "")
    return text[:200]


def media_info(path: str, video_stream: int | None = None,
               audio_stream: int | None = None) -> dict[str, Any]:
    """What the output record says of its input: file size, container, duration, and the codec
    and geometry of the video and audio stream that are decoded (:func:`pick_stream` with
    ``video_stream`` / ``audio_stream``), with that stream's index among the file's streams of
    its kind (``stream``) and their number (``streams``); ``stream`` is None where the file
    lacks the one asked for. A frame folder: its image count. Empty when the file cannot be
    read (the input is then failing anyway)."""
    p = Path(path)
    try:
        if p.is_dir():
            return {"kind": "frame folder", "images": sum(1 for f in p.iterdir() if f.is_file())}
        import av

        info: dict[str, Any] = {"bytes": p.stat().st_size}
        with av.open(str(p), "r", metadata_errors="ignore") as c:
            info["container"] = c.format.name
            if c.duration is not None:
                info["duration_s"] = round(c.duration / 1_000_000, 3)
            for kind, want in (("video", video_stream), ("audio", audio_stream)):
                n = len(getattr(c.streams, kind))
                if not n:
                    continue
                try:
                    s, pos, _ = pick_stream(c, kind, want)
                except VideoError:
                    info[kind] = {"stream": None, "streams": n}
                    continue
                ctx = s.codec_context
                if kind == "video":
                    info[kind] = {"codec": ctx.name, "width": ctx.width, "height": ctx.height,
                                  "fps": float(s.average_rate) if s.average_rate else None,
                                  "frames": s.frames or None}
                else:
                    info[kind] = {"codec": ctx.name, "sample_rate": ctx.sample_rate,
                                  "channels": ctx.layout.nb_channels}
                info[kind].update(stream=pos, streams=n)
        return info
    except Exception:  # unreadable: the input's own error says why
        return {}
