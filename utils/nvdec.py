"""``decoder=nvdec``: video decoding on the GPU's NVDEC engines (PyNvVideoCodec), frames stay on the GPU.

:class:`NvdecPool` runs ``n`` decoding threads in the device process (NVDEC works asynchronously
on the GPU, so threads suffice), each on one video at a time. A thread hands the device loop
chunks of ``(n, 3, H, W)`` uint8 GPU tensors through the same messages as the CPU decoder
processes (utils/pipeline.py), with the same token protocol bounding how many chunks are in
flight; frames per chunk and the decoder's read-ahead follow from a byte budget per session
(:data:`SESSION_BYTES`), so GPU memory does not grow with resolution. Each chunk is a copy out of
the decoder's surfaces, complete before the decoder may reuse them; a video's decoder is ended
when the video ends or fails. Frames are picked for ``extraction_fps`` by
:class:`utils.video.SlotSelector`, the CPU decoder's rule. A video NVDEC cannot open or decode
(codec or profile the engine lacks, e.g. 4:4:4 or some 10-bit streams) is reported as
``fallback`` before any frame is sent, and the pipeline decodes it on the CPU with one log line.

Differences to the CPU decoder: NVDEC's YUV -> RGB conversion is its own (the matrix from the
bitstream, BT.709 when unspecified, and always limited range, so full-range sources come out with
other levels; bench/nvdec_compare.py measures pixel and feature differences on a GPU); timestamps are ``index / fps`` (the stream's
average rate) in both ``timestamps`` modes, since frame pts are not used here, so
variable-frame-rate videos should be decoded with ``decoder=cpu``.

Which stream: PyNvVideoCodec's demuxer (NVIDIA's FFmpegDemuxer) decodes the video stream FFmpeg
picks by default (``av_find_best_stream``), the CPU decoder's default too
(:func:`utils.video.pick_stream`). A video whose chosen stream is another one (``video_stream=k``
naming a stream FFmpeg would not pick, or a demuxer whose stream has another size than the chosen
one) is handed to the CPU decoders as ``fallback``, so both decoders always read the same stream.

Orientation: NVDEC hands out frames as stored. With ``rotation="auto"`` a video whose display
matrix turns it (a phone's portrait video) is turned upright on the GPU by the CPU decoder's rule
(:func:`utils.video.upright_ops`, read from its first frame with PyAV), so both decoders give
frames of the same orientation and size.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import numpy as np

from video_features.utils.transforms import pick_frames
from video_features.utils.video import UPRIGHT, SlotSelector, stream_upright

log = logging.getLogger(__name__)

#: NVDEC sessions per GPU beyond which throughput stops growing (measured: 8 decoders 7,800 f/s)
MAX_SESSIONS = 8
CHUNKS_IN_FLIGHT = 3


def unavailable() -> str | None:
    """Why ``decoder=nvdec`` cannot run here, or None."""
    try:
        import PyNvVideoCodec  # noqa: F401
    except Exception as exc:
        return (f"PyNvVideoCodec cannot be imported ({type(exc).__name__}: {exc}); install it "
                "with pip install pynvvideocodec, or use decoder=cpu")
    return None


#: the engine's answer per (gpu, codec, chroma format, bit depth): asking creates a CUDA context
#: on that GPU, so it is asked once per kind of stream, not per video
_CAPS: dict[tuple, Any] = {}
_CAPS_LOCK = threading.Lock()


def _gpu_index(device: Any) -> int:
    """The CUDA ordinal ``device`` stands for ("cuda" alone: the current device)."""
    if getattr(device, "type", None) != "cuda":
        return 0
    if device.index is not None:
        return device.index
    import torch

    return torch.cuda.current_device()


def _check_caps(nvc: Any, path: str, gpu: int, size: tuple[int, int] | None = None) -> None:
    """Ask the engine before decoding: an unsupported stream then fails here, cleanly, rather
    than inside the decoder's own thread (where an error can end the process). ``size``: the
    (width, height) of the stream the CPU decoder would read; a demuxer that reads a stream of
    another size fails here too (the video then goes to the CPU decoders)."""
    try:
        dmx = nvc.CreateDemuxer(filename=path)
        got = _demuxer_size(dmx)
        if size is not None and got is not None and got != tuple(size):
            raise RuntimeError(f"NVDEC's demuxer reads a {got[0]}x{got[1]} video stream, the "
                               f"chosen one is {size[0]}x{size[1]}")
        key = (gpu, dmx.GetNvCodecId(), dmx.ChromaFormat(), dmx.BitDepth())
        with _CAPS_LOCK:
            caps = _CAPS.get(key)
            if caps is None:
                caps = _CAPS[key] = nvc.GetDecoderCaps(gpu, codec=key[1], chromaformat=key[2],
                                                       bitdepth=key[3])
    except AttributeError:  # a version without these calls: decoding will tell
        return
    if not caps.get("supported", True):
        raise RuntimeError("the GPU's decoder does not support this codec / chroma format / "
                           "bit depth")
    why = _size_refused(caps, *(got or size or (None, None)))
    if why:
        raise RuntimeError(why)


def _size_refused(caps: dict, width: int | None, height: int | None) -> str:
    """Why the GPU's decoder cannot take a ``width`` x ``height`` stream by its capabilities
    (``width_max`` / ``height_max`` / ``width_min`` / ``height_min`` / ``mb_num_max``, each
    checked where the library reports it), or ""."""
    if width is None or height is None:
        return ""
    lo_w, lo_h = caps.get("width_min"), caps.get("height_min")
    hi_w, hi_h = caps.get("width_max"), caps.get("height_max")
    blocks = ((width + 15) // 16) * ((height + 15) // 16)
    if (hi_w and width > hi_w) or (hi_h and height > hi_h) or (
            caps.get("mb_num_max") and blocks > caps["mb_num_max"]):
        return (f"the GPU's decoder takes at most {hi_w}x{hi_h} pixels "
                f"({caps.get('mb_num_max')} macroblocks) of this codec, the video is "
                f"{width}x{height}")
    if (lo_w and width < lo_w) or (lo_h and height < lo_h):
        return (f"the GPU's decoder takes at least {lo_w}x{lo_h} pixels of this codec, the video "
                f"is {width}x{height}")
    return ""


def _demuxer_size(dmx: Any) -> tuple[int, int] | None:
    """(width, height) of the stream the library's demuxer reads, or None where it does not say."""
    try:
        return int(dmx.Width()), int(dmx.Height())
    except Exception:  # noqa: BLE001 - a version without these calls: not checked
        return None


#: bytes of decoded RGB frames one NVDEC session may hold on the GPU: the chunks handed on
#: (CHUNKS_IN_FLIGHT), the one being made and the decoder's buffer of frames decoded ahead.
#: Frames per chunk and buffered frames follow from it and the stream's size, so memory does not
#: grow with resolution (MAX_SESSIONS sessions: 4 GiB at most); the decoder's own surfaces
#: (NV12, a few dozen) are not counted.
SESSION_BYTES = 512 << 20
#: buffered frames beyond one chunk where the budget allows, so the decoder keeps working ahead
_MIN_BUFFER = 16


def frame_plan(width: int, height: int, chunk_frames: int) -> tuple[int, int]:
    """(frames per chunk, frames the decoder buffers) for ``width`` x ``height`` RGB frames
    within :data:`SESSION_BYTES`; never less than one frame per chunk nor a buffer smaller
    than one chunk (a batch must fit the decoder's buffer)."""
    fit = SESSION_BYTES // max(1, 3 * width * height)
    # out of the decoder: the chunks handed on, the one being made and its turned / picked copy;
    # two chunks buffered ahead; one frame held for the frame selection
    chunk = max(1, min(chunk_frames, (fit - 1) // (CHUNKS_IN_FLIGHT + 4)))
    room = fit - (CHUNKS_IN_FLIGHT + 2) * chunk - 1
    return chunk, max(chunk, min(max(2 * chunk, _MIN_BUFFER), room))


def frames_held(chunk: int, buffer: int) -> int:
    """The most decoded frames one session holds with that plan."""
    return (CHUNKS_IN_FLIGHT + 2) * chunk + buffer + 1


def _open(path: str, gpu: int, buffer: int, size: tuple[int, int] | None = None) -> Any:
    import PyNvVideoCodec as nvc

    _check_caps(nvc, path, gpu, size)
    kwargs = dict(gpu_id=gpu, use_device_memory=True, output_color_type=nvc.OutputColorType.RGBP)
    if hasattr(nvc, "ThreadedDecoder"):  # prefetches in the background: made for sequential reads
        return nvc.ThreadedDecoder(path, buffer, **kwargs)
    return nvc.SimpleDecoder(path, **kwargs)


def _frame_rate(path: str, total: int | None = None, video_stream: int | None = None,
                ) -> tuple[float, float | None, int, int]:
    """The video stream's average frame rate, read with PyAV as the CPU decoder reads it, the
    output rate that ``total`` evenly spaced frames take (None without ``total``), and the
    stream's width and height (as stored). ``video_stream``: the stream the CPU decoder would
    read (:func:`utils.video.pick_stream`); one that NVIDIA's demuxer does not read (it takes
    FFmpeg's default choice) raises, so the video goes to the CPU decoders."""
    from video_features.utils.video import open_frames, pick_stream

    with open_frames(path, video_stream=video_stream) as src:
        rate = src.native_fps
        count = src.frame_count() if total else None
        codec = src._stream.codec_context
        width, height = codec.width, codec.height
        if src.streams > 1:
            _, default, _ = pick_stream(src._container, "video")
            if src.stream != default:
                raise RuntimeError(f"NVDEC's demuxer reads only the video stream FFmpeg picks by "
                                   f"default ({default} of {src.streams}), not video_stream="
                                   f"{src.stream}")
    if total and not count:
        raise RuntimeError("extraction_total: the container does not declare the video's length")
    return rate, (total * rate / count if total else None), width, height


def _planar(frame: Any) -> Any:
    """One RGBP frame as ``(3, H, W)``: the library may give the three planes stacked as
    ``(3H, W)``, which is the same memory."""
    if frame.dim() == 2 and frame.shape[0] % 3 == 0:
        return frame.reshape(3, frame.shape[0] // 3, frame.shape[1])
    if frame.dim() == 3 and frame.shape[0] == 3:
        return frame
    raise RuntimeError(f"a decoded frame has shape {tuple(frame.shape)}, not planar RGB")


class _Source:
    """One video on NVDEC: chunks of selected frames with their timestamps. ``close`` (also
    called once the frames run out) ends the decoder's thread."""

    def __init__(self, path: str, device: Any, needs: dict, chunk_frames: int):
        import torch

        self.torch, self.device = torch, torch.device(device)
        # the library's own average_fps may be an integer
        total = needs.get("extraction_total")
        video_stream = needs.get("video_stream")
        rate, total_fps, width, height = _frame_rate(path, total, video_stream)
        self.native_fps = rate
        self.out_fps = needs.get("extraction_fps") or total_fps
        self.total = total
        self.fps = float(self.out_fps) if self.out_fps else rate
        self.selector = SlotSelector(self.out_fps) if self.out_fps else None
        self.chunk, self.buffer = frame_plan(width, height, chunk_frames)
        self.index = 0
        self.held = None
        #: (transpose, flip rows, flip columns) that turn the frames upright (utils/video.py)
        self.ops = (stream_upright(path, video_stream) if needs.get("rotation", "auto") == "auto"
                    else UPRIGHT)
        self._convert: Any = None  # DLPack, or the array interface: chosen at the first frame
        # copies out of the decoder's surfaces run here, and are waited for before the decoder
        # may reuse them
        self._copy = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.dec = None
        # opened last: nothing after it can fail and leave the decoder's thread running
        self.dec = _open(path, _gpu_index(self.device), self.buffer, (width, height))

    def close(self) -> None:
        """End the decoder (its thread and buffers); safe to call more than once."""
        dec, self.dec = self.dec, None
        if dec is not None and hasattr(dec, "end"):
            try:
                dec.end()
            except Exception as exc:  # ending must not hide how the video ended
                log.debug("NVDEC decoder end(): %s: %s", type(exc).__name__, exc)

    def _capped(self, picks: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """extraction_total: no slot past the last one (the declared length may be short)."""
        if self.total is None:
            return picks, slots
        keep = slots < self.total
        return picks[keep], slots[keep]

    def read(self) -> Any:
        """The next decoded frames as one ``(n, 3, H, W)`` uint8 tensor of ours (None at the
        end, when the decoder is ended)."""
        if self.dec is None:
            return None
        frames = self.dec.get_batch_frames(self.chunk)
        if not frames:
            self.close()
            return None
        return self.upright(self._own(frames))

    def _from_interface(self, frame: Any) -> Any:
        if hasattr(frame, "__cuda_array_interface__"):
            return self.torch.as_tensor(frame, device=self.device)
        return self.torch.from_numpy(np.asarray(frame))

    def _views(self, frames: list) -> list:
        """Tensors viewing the decoder's frames (no copy), each ``(3, H, W)``."""
        convert = self._convert
        if convert is None:  # try DLPack on the first frame only; else the array interface
            try:
                first = self.torch.from_dlpack(frames[0])
                self._convert = self.torch.from_dlpack
            except Exception as dl_exc:
                try:
                    first = self._from_interface(frames[0])
                except Exception as exc:
                    raise RuntimeError(f"decoded frames are readable neither by DLPack "
                                       f"({dl_exc}) nor by their array interface ({exc})") from exc
                log.debug("NVDEC frames: DLPack failed (%s), using the array interface", dl_exc)
                self._convert = self._from_interface
            return [_planar(first)] + [_planar(self._convert(f)) for f in frames[1:]]
        return [_planar(convert(f)) for f in frames]

    def _own(self, frames: list) -> Any:
        """The decoder's frames copied at once into one ``(n, 3, H, W)`` tensor of ours; the
        copy is complete when this returns, so the decoder may then reuse its surfaces."""
        views = self._views(frames)
        out = self.torch.empty((len(views), *views[0].shape), dtype=views[0].dtype,
                               device=self.device)
        if self._copy is None:
            self.torch.stack(views, out=out)
            return out
        # ordered after this thread's stream (where ``out`` was allocated), then waited for: a
        # surface is never read after the next get_batch_frames / end() lets the decoder reuse it
        self._copy.wait_stream(self.torch.cuda.current_stream(self.device))
        with self.torch.cuda.stream(self._copy):
            self.torch.stack(views, out=out)
        done = self.torch.cuda.Event()
        done.record(self._copy)
        done.synchronize()
        return out

    def upright(self, frames: Any) -> Any:
        """``(n, 3, H, W)`` frames turned as :func:`utils.video.upright` turns ``(H, W, 3)``."""
        if self.ops == UPRIGHT:
            return frames
        transpose, rows, cols = self.ops
        if transpose:
            frames = frames.transpose(2, 3)
        if rows:
            frames = frames.flip(2)
        if cols:
            frames = frames.flip(3)
        return frames.contiguous()

    def select(self, frames: Any) -> tuple[Any, np.ndarray, np.ndarray]:
        n = len(frames)
        times = (self.index + np.arange(n)) / self.native_fps
        self.index += n
        if self.selector is None:
            return frames, times * 1000.0, times
        picks, slots = self._capped(*self.selector.push(times))
        out = pick_frames(self.held, frames, picks)
        self.held = frames[-1].clone()
        return out, slots / self.fps * 1000.0, times

    def finish(self) -> tuple[Any, np.ndarray] | None:
        if self.selector is None or self.held is None:
            return None
        picks, slots = self._capped(*self.selector.finish(self.index / self.native_fps))
        return pick_frames(self.held, self.held[None][:0], picks), slots / self.fps * 1000.0

class _GpuDecoder:
    def __init__(self, proc: Any, tasks: Any, free: Any):
        self.proc, self.tasks, self.free = proc, tasks, free
        self.gen = 0
        self.vid: int | None = None


class NvdecPool:
    """``n`` NVDEC decoding threads for one device; messages go to ``out`` as
    ``(kind, index, gen, vid, ...)`` with ``index`` counted from ``first_index``."""

    def __init__(self, n: int, device: Any, needs: dict, chunk_frames: int, first_index: int):
        import torch

        device = torch.device(device)
        if device.type == "cuda":  # "cuda" means this thread's GPU; the decoding threads' is GPU 0
            device = torch.device("cuda", _gpu_index(device))
        self.n = n
        self.first = first_index
        self.out: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.decoders: list[_GpuDecoder] = []
        for i in range(n):
            tasks, free = queue.Queue(), queue.Queue()
            for k in range(CHUNKS_IN_FLIGHT):
                free.put(k)
            t = threading.Thread(target=self._main, name=f"nvdec{i}", daemon=True,
                                 args=(first_index + i, tasks, free, device, needs, chunk_frames))
            self.decoders.append(_GpuDecoder(t, tasks, free))
            t.start()

    def _take(self, free: Any) -> int | None:
        while not self._stop.is_set():
            try:
                return free.get(timeout=0.2)
            except queue.Empty:
                continue
        return None

    def _main(self, index: int, tasks: Any, free: Any, device: Any, needs: dict,
              chunk_frames: int) -> None:
        import torch

        if device.type == "cuda":
            torch.cuda.set_device(device)
        while not self._stop.is_set():
            try:
                task = tasks.get(timeout=0.2)
            except queue.Empty:
                continue
            if task is None:
                return
            vid, path = task
            tag = (index, 0, vid)
            with torch.inference_mode():
                handed_over = self._decode(tag, path, free, device, needs, chunk_frames)
            if not handed_over:  # else the CPU decoder that takes it over says when it is done
                self.out.put(("done", *tag))

    def _decode(self, tag: tuple, path: str, free: Any, device: Any, needs: dict,
                chunk_frames: int) -> bool:
        """Decode one video; True when it was handed over to the CPU decoders."""
        src = None
        try:
            # NVDEC must open the stream and decode its first frames, else: the CPU decodes it
            try:
                src = _Source(path, device, needs, chunk_frames)
                first = src.read()
                if first is None:
                    raise RuntimeError("no frames decoded")
            except Exception as exc:
                self.out.put(("fallback", *tag, f"{type(exc).__name__}: {str(exc).strip()[:200]}"))
                return True
            self.out.put(("open", *tag, src.fps))
            frames = first
            sent = 0
            try:
                while frames is not None:
                    picked, stamps, times = src.select(frames)
                    sent += self._send(tag, free, picked, stamps, times, sent)
                    frames = src.read()
                tail = src.finish()
                if tail is not None and len(tail[1]):
                    self._send(tag, free, tail[0], tail[1], None, sent)
                self.out.put(("end", *tag, src.index / src.native_fps))
            except Exception as exc:
                self.out.put(("error", *tag, "video", f"NVDEC decoding failed after {src.index} "
                                                      f"frames ({type(exc).__name__}: {exc})"))
            return False
        finally:  # the decoder's thread and buffers go with the video, however it ended
            if src is not None:
                src.close()

    def _send(self, tag: tuple, free: Any, frames: Any, stamps: np.ndarray, times: Any,
              first: int) -> int:
        if len(stamps) == 0:
            return 0
        token = self._take(free)
        if token is None:
            raise RuntimeError("stopped")
        self.out.put(("gpu_chunk", *tag, token, frames, np.asarray(stamps, np.float64), first,
                      times))
        return len(stamps)

    def idle(self) -> list[int]:
        return [i for i, d in enumerate(self.decoders) if d.vid is None]

    def assign(self, i: int, vid: int, path: str) -> None:
        self.decoders[i].vid = vid
        self.decoders[i].tasks.put((vid, path))

    def current(self, index: int, gen: int) -> _GpuDecoder | None:
        i = index - self.first
        return self.decoders[i] if 0 <= i < self.n else None

    def close(self) -> None:
        for d in self.decoders:
            d.tasks.put(None)
        self._stop.set()
        for d in self.decoders:
            d.proc.join(timeout=5)
