"""A stand-in for PyNvVideoCodec with its decoder interface, decoding with PyAV on the CPU.

It lets the tests run the decoder=nvdec plumbing (threads, chunk hand-over, frame selection,
fallback to the CPU) on machines without a GPU; the pixels are PyAV's, so outputs must equal the
CPU decoder's exactly. A file whose name contains "unsupported" cannot be opened, as a codec
NVDEC lacks. As NVIDIA's demuxer (av_find_best_stream), it reads the video stream FFmpeg picks by
default.

As the real threaded decoder, it hands out views of its own surfaces, which it reuses: the frames
of one get_batch_frames call are overwritten by the next call, and scrambled by end(). ``calls``
records what the tests check (capability queries, decoders made, end() calls, DLPack tries);
``options`` changes how frames come out: ``stacked_planes`` gives RGBP frames as ``(3H, W)``,
``dlpack=False`` frames whose DLPack export fails (read through ``__array__`` instead),
``device="cuda"`` surfaces in GPU memory."""
from __future__ import annotations

import enum
from types import SimpleNamespace

import av
import torch

calls: dict = {"caps": [], "decoders": [], "ends": 0, "dlpack_tries": 0}
options: dict = {"stacked_planes": False, "dlpack": True, "device": "cpu"}


class OutputColorType(enum.Enum):
    NATIVE = 0
    RGB = 1
    RGBP = 2


class _Demuxer:
    def __init__(self, filename):
        with av.open(str(filename)) as c:
            ctx = c.streams.best("video").codec_context
            self._codec, self._fmt = ctx.name, ctx.pix_fmt or ""
            self._size = (ctx.width, ctx.height)

    def GetNvCodecId(self):
        return self._codec

    def ChromaFormat(self):
        return next((k for k in ("444", "422", "420") if k in self._fmt), "400")

    def BitDepth(self):
        return 10 if "10" in self._fmt else 8

    def Width(self):
        return self._size[0]

    def Height(self):
        return self._size[1]


def CreateDemuxer(filename):
    return _Demuxer(filename)


#: the size limits GetDecoderCaps reports (the library's keys; NVDEC's H.264 limits)
LIMITS = {"width_min": 48, "height_min": 16, "width_max": 4096, "height_max": 4096,
          "mb_num_max": 65536}


def GetDecoderCaps(gpuid=0, codec=None, chromaformat=None, bitdepth=8):
    calls["caps"].append((gpuid, codec, chromaformat, bitdepth))
    return {"supported": True, "num_decoder_engines": 1, **LIMITS}


class _Frame:
    """A frame whose DLPack export fails (as with a mismatched DLPack version)."""

    def __init__(self, t):
        self._t = t

    def __dlpack__(self, *a, **k):
        calls["dlpack_tries"] += 1
        raise BufferError("DLPack export not available")

    def __dlpack_device__(self):
        calls["dlpack_tries"] += 1
        raise BufferError("DLPack export not available")

    def __array__(self, dtype=None, copy=None):
        return self._t.numpy()


class ThreadedDecoder:
    def __init__(self, path, buffer_size, gpu_id=0, use_device_memory=True,
                 output_color_type=OutputColorType.NATIVE):
        if "unsupported" in str(path):
            raise RuntimeError("CUVID: codec not supported on this GPU")
        calls["decoders"].append({"path": str(path), "buffer_size": buffer_size, "gpu_id": gpu_id})
        self._buffer = buffer_size
        self._container = av.open(str(path))
        stream = self._container.streams.best("video")
        self._rate = float(stream.average_rate)
        self._frames = self._container.decode(stream)
        self._planar = output_color_type == OutputColorType.RGBP
        self._surfaces = None  # (buffer_size, H, W, 3) uint8, reused by every call
        self._ended = False

    def get_stream_metadata(self):
        return SimpleNamespace(average_fps=int(self._rate))  # an integer, as the library's

    def get_batch_frames(self, n):
        if self._ended:
            raise RuntimeError("decoder ended")
        if n > self._buffer:
            raise ValueError(f"batch of {n} frames > buffer of {self._buffer}")
        out = []
        for frame in self._frames:
            img = frame.to_ndarray(format="rgb24")
            if self._surfaces is None:
                self._surfaces = torch.empty((self._buffer, *img.shape), dtype=torch.uint8,
                                             device=options.get("device", "cpu"))
            surface = self._surfaces[len(out)]
            surface.copy_(torch.from_numpy(img))  # overwrites what the last call handed out
            t = surface.permute(2, 0, 1).contiguous() if self._planar else surface
            if self._planar:  # planar frames live in the surface too
                surface.view(-1)[:t.numel()].copy_(t.reshape(-1))
                t = surface.view(-1)[:t.numel()].view(t.shape)
                if options["stacked_planes"]:
                    t = t.view(3 * t.shape[1], t.shape[2])
            out.append(t if options["dlpack"] else _Frame(t))
            if len(out) == n:
                break
        return out

    def end(self):
        calls["ends"] += 1
        self._ended = True
        if self._surfaces is not None:
            self._surfaces.fill_(7)  # released surfaces: whatever the engine writes next
        self._container.close()
