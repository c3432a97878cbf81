"""Audio decoding: the audio track of any file FFmpeg can read -> mono float samples at 16 kHz.

Everything happens in-process through PyAV (FFmpeg's libraries): no ffmpeg binary, no temporary
.aac/.wav files. The sample path reproduces the reference tool's, which extracted the AAC stream
with ``ffmpeg -acodec copy``, converted it to a 16-bit .wav and read that back:

1. decode the audio stream (any codec FFmpeg knows; .wav files are just another container);
2. convert to signed 16-bit PCM with libswresample, the conversion ffmpeg applies when it writes
   a .wav (``round(x * 32768)`` clipped for float codecs, no dither), then divide by 32768;
3. average the channels (float64, ``np.mean`` over channels);
4. resample to the target rate with resampy's ``kaiser_best`` filter (``resampy.resample``'s
   default, which the original VGGish ``vggish_input.py`` uses), streamed in blocks so that
   memory holds the output and a few thousand input samples, never the whole decoded track.
   The streamed result is bit-identical to one ``resampy.resample`` call on the whole signal.

Encoder priming. AAC (and Opus, MP3) encoders put a few hundred to a couple of thousand samples
of start-up delay before the signal; containers record it (MP4 edit lists), and FFmpeg's decoder
drops it, so the samples line up with the video. The reference tool lost that information when
it copied the stream out to a raw .aac file, so its audio starts with the priming samples (1024
for FFmpeg's AAC encoder: 21-23 ms) and every 0.96 s example is shifted by that much.
``keep_priming=True`` reproduces this (sample-exact for AAC in MP4); the default drops the priming
as every player does.

Which stream: of a file with several audio streams, the one FFmpeg picks by default
(``av_find_best_stream``), or the k-th with ``stream=k`` (the ``audio_stream`` option);
:func:`utils.video.pick_stream` is the one rule for both decoders. Damaged packets are skipped
(as FFmpeg's command line does) and counted: :attr:`AudioInfo.damage` says what was decoded
around, for the output's record.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from video_features.utils.errors import VideoError

log = logging.getLogger(__name__)

#: input samples handed to the resampler at once: bounds per-call overhead and buffer size
_BLOCK = 1 << 16


@dataclass
class AudioInfo:
    """What the decoder learned about an audio stream (filled in while decoding)."""

    codec: str = ""
    sample_rate: int = 0
    channels: int = 0
    #: samples per channel at ``sample_rate`` handed out by the decoder (after priming removal)
    num_samples: int = 0
    #: packets that failed to decode and were skipped (FFmpeg's command line skips them too)
    bad_packets: int = 0
    #: the stream decoded: its index among the file's audio streams, and their number
    stream: int | None = None
    streams: int = 0
    #: why the demuxer stopped before the end ("" where it did not): the rest of the track is lost
    ended_early: str = ""

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate if self.sample_rate else 0.0

    @property
    def damage(self) -> str | None:
        """One line saying what was decoded around, or None for a clean decode."""
        parts = []
        if self.bad_packets:
            s = "s" if self.bad_packets > 1 else ""
            parts.append(f"skipped {self.bad_packets} undecodable audio packet{s}")
        if self.ended_early:
            parts.append(f"the audio stream cannot be read on ({self.ended_early})")
        if not parts:
            return None
        return "; ".join(parts) + f"; decoded {self.duration:.2f} s of audio"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _open(path: str) -> Any:
    import av

    p = Path(path)
    if not p.exists():
        raise VideoError(f"file not found: {path}")
    if p.is_dir():
        raise VideoError(f"{path} is a folder; audio features need a video or audio file")
    if p.stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")
    try:
        return av.open(str(p), "r", metadata_errors="ignore")
    except Exception as exc:  # av.error.* and OSError
        raise VideoError(f"not a readable media file ({_short(exc)})") from None


def iter_pcm16(path: str, keep_priming: bool = False, info: AudioInfo | None = None,
               stream: int | None = None) -> Iterator[np.ndarray]:
    """Decoded audio as 16-bit PCM blocks of shape ``(n, channels)``, int16, in stream order.

    ``stream``: which of the file's audio streams (its index among them); None: the one FFmpeg
    picks by default (``av_find_best_stream``, :func:`utils.video.pick_stream`). A file without
    that stream raises :class:`VideoError` naming how many audio streams it has.

    All blocks share the sample rate and channel count of the stream's first frame (recorded in
    ``info``); frames of a different layout or rate mid-stream are converted to those.
    Raises :class:`VideoError` for a missing/unreadable file, no audio track, or no decodable
    audio at all. Undecodable packets inside a stream are skipped with a warning.
    """
    import av

    info = info if info is not None else AudioInfo()
    container = _open(path)
    try:
        if not container.streams.audio:
            raise VideoError("no audio track")
        from video_features.utils.video import pick_stream

        chosen, info.stream, info.streams = pick_stream(container, "audio", stream)
        ctx = chosen.codec_context
        if ctx is None:
            raise VideoError(f"audio codec {getattr(chosen, 'codec_tag', '') or '?'} cannot be "
                             "decoded by this FFmpeg build")
        info.codec = ctx.name
        if keep_priming:
            # decoder reports the priming/padding to skip instead of dropping it
            ctx.flags2 |= av.codec.context.Flags2.skip_manual
        resamplers: dict[tuple, Any] = {}
        out_layout = out_rate = None
        last_exc: BaseException | None = None

        def convert(frame: Any) -> Iterator[np.ndarray]:
            nonlocal out_layout, out_rate
            if out_rate is None:
                out_layout, out_rate = frame.layout.name, frame.sample_rate
                info.sample_rate = int(out_rate)
                info.channels = len(frame.layout.channels)
            key = (frame.format.name, frame.layout.name, frame.sample_rate)
            rs = resamplers.get(key)
            if rs is None:
                rs = resamplers[key] = av.AudioResampler(format="s16", layout=out_layout,
                                                         rate=out_rate)
            for out in rs.resample(frame):
                yield _packed(out, info.channels)

        try:
            for packet in container.demux(chosen):
                try:
                    frames = packet.decode()
                except av.error.EOFError:
                    break
                except av.error.FFmpegError as exc:
                    info.bad_packets += 1
                    last_exc = exc
                    continue
                for frame in frames:
                    for block in convert(frame):
                        info.num_samples += len(block)
                        yield block
        except av.error.FFmpegError as exc:  # demuxer gave up: truncated/corrupt container
            if info.num_samples == 0:
                raise VideoError(f"no decodable audio ({_short(exc)})") from None
            log.warning("%s: audio stream ends early after %.2f s (%s)", path, info.duration,
                        _short(exc))
            info.ended_early = _short(exc)
        for rs in resamplers.values():  # rate/layout conversions may hold a few samples back
            for out in rs.resample(None):
                block = _packed(out, info.channels)
                info.num_samples += len(block)
                yield block
        if info.num_samples == 0:
            reason = f" ({_short(last_exc)})" if last_exc is not None else ""
            raise VideoError(f"no decodable audio in the audio track{reason}")
        if info.bad_packets:
            log.warning("%s: skipped %d undecodable audio packet(s)", path, info.bad_packets)
    finally:
        container.close()


def _packed(frame: Any, channels: int) -> np.ndarray:
    return frame.to_ndarray().reshape(-1, channels)


def _resampy_internals() -> tuple[Any, Any] | None:
    """resampy's filter table loader and its sequential interpolation kernel, if importable."""
    try:
        from resampy.filters import get_filter
        from resampy.interpn import resample_f_s
    except ImportError:
        return None
    return get_filter, resample_f_s


class StreamResampler:
    """resampy ``kaiser_best`` resampling of a signal that arrives in pieces.

    ``push`` returns the output samples that are already fully determined; ``flush`` the rest.
    The concatenated output equals ``resampy.resample(whole_signal, sr_orig, sr_new)`` bit for
    bit: output sample ``j`` is interpolated at input time ``j * sr_orig / sr_new`` computed the
    same way, from the same input samples, in the same order; only the input buffer is shifted
    by a whole number of samples, which leaves every filter phase unchanged.
    """

    def __init__(self, sr_orig: int, sr_new: int, filter: str = "kaiser_best") -> None:
        if sr_orig <= 0 or sr_new <= 0:
            raise ValueError(f"invalid sample rates {sr_orig} -> {sr_new}")
        self.sr_orig, self.sr_new = int(sr_orig), int(sr_new)
        self.filter = filter
        self._n_in = 0          # input samples pushed so far
        self._n_out = 0         # output samples returned so far
        self._buf = np.zeros(0, np.float64)
        self._buf_start = 0     # absolute input index of _buf[0]
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._identity = self.sr_orig == self.sr_new
        internals = None if self._identity else _resampy_internals()
        self._streaming = internals is not None
        if self._identity:
            return
        if not self._streaming:  # unknown resampy layout: resample everything at the end
            log.debug("resampy internals not found; resampling the whole signal at once")
            return
        get_filter, self._kernel = internals
        ratio = float(self.sr_new) / self.sr_orig
        win, self._precision, _ = get_filter(filter)
        if ratio < 1:
            win = ratio * win
        self._win = win
        self._delta = np.diff(win, append=win[-1])
        self._scale = min(1.0, ratio)
        self._inc = 1.0 / ratio
        # input samples either side of an output time that the filter can reach, plus margin
        self._half = len(win) // max(1, int(self._scale * self._precision)) + 2

    def push(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        self._n_in += len(x)
        if self._identity:
            return x
        self._pending.append(x)
        self._pending_len += len(x)
        if not self._streaming or self._pending_len < _BLOCK:
            return np.zeros(0, np.float64)
        self._absorb()
        # outputs whose right-hand filter support lies inside what has arrived
        ready = int(np.ceil((self._n_in - self._half) / self._inc))
        return self._emit(ready)

    def flush(self) -> np.ndarray:
        if self._identity:
            return np.zeros(0, np.float64)
        self._absorb()
        if not self._streaming:
            import resampy

            if len(self._buf) == 0 or int(len(self._buf) * self.sr_new / self.sr_orig) < 1:
                return np.zeros(0, np.float64)
            return resampy.resample(self._buf, self.sr_orig, self.sr_new, filter=self.filter)
        # same output length rule as resampy.resample
        total = int(self._n_in * float(self.sr_new) / float(self.sr_orig))
        return self._emit(total)

    def _absorb(self) -> None:
        if self._pending:
            self._buf = np.concatenate([self._buf, *self._pending])
            self._pending, self._pending_len = [], 0

    def _emit(self, end: int) -> np.ndarray:
        if end <= self._n_out:
            return np.zeros(0, np.float64)
        t = np.arange(self._n_out, end) * self._inc          # as resampy computes t_out
        y = np.zeros(len(t), np.float64)
        self._kernel(self._buf, t - self._buf_start, self._win, self._delta, self._precision,
                     self._scale, y)
        self._n_out = end
        keep_from = max(self._buf_start, int(end * self._inc) - self._half)
        self._buf = self._buf[keep_from - self._buf_start:]
        self._buf_start = keep_from
        return y


def iter_audio(path: str, target_sr: int = 16000, keep_priming: bool = False,
               dtype: Any = np.float32, info: AudioInfo | None = None,
               stream: int | None = None) -> Iterator[np.ndarray]:
    """Mono samples at ``target_sr`` in consecutive 1-D blocks, as they are decoded.

    Concatenated, the blocks are :func:`load_audio`'s result. Memory stays bounded by the block
    size; the consumer decides what to keep. ``stream``: as :func:`iter_pcm16`.
    """
    info = info if info is not None else AudioInfo()
    resampler: StreamResampler | None = None
    for block in iter_pcm16(path, keep_priming=keep_priming, info=info, stream=stream):
        if resampler is None:
            resampler = StreamResampler(info.sample_rate, target_sr)
        mono = (block / 32768.0).mean(axis=1)   # float64, as the reference: int16 / 32768, mean
        out = resampler.push(mono)
        if len(out):
            yield out.astype(dtype, copy=False)
    if resampler is not None:
        out = resampler.flush()
        if len(out):
            yield out.astype(dtype, copy=False)


def load_audio(path: str, target_sr: int = 16000, keep_priming: bool = False,
               dtype: Any = np.float32, info: AudioInfo | None = None,
               stream: int | None = None) -> np.ndarray:
    """The whole audio track of ``path`` as mono ``dtype`` samples at ``target_sr`` Hz.

    Raises :class:`utils.errors.VideoError` with a one-line reason for a missing or unreadable
    file, a file without an audio track, or an audio track without decodable samples.
    """
    blocks = list(iter_audio(path, target_sr, keep_priming=keep_priming, dtype=dtype, info=info,
                             stream=stream))
    if not blocks:
        return np.zeros(0, dtype)
    return np.concatenate(blocks)


def pcm_source_description(info: AudioInfo) -> str:
    """Short human description used in logs and error messages."""
    ch = {1: "mono", 2: "stereo"}.get(info.channels, f"{info.channels} ch")
    return f"{info.codec} {info.sample_rate} Hz {ch}, {info.duration:.2f} s"


__all__ = ["AudioInfo", "StreamResampler", "iter_pcm16", "iter_audio", "load_audio",
           "pcm_source_description"]
