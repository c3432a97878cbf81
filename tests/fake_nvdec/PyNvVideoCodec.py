"""A stand-in for PyNvVideoCodec with its decoder interface, decoding with PyAV on the CPU.

It lets the tests run the decoder=nvdec plumbing (threads, chunk hand-over, frame selection,
fallback to the CPU) on machines without a GPU; the pixels are PyAV's, so outputs must equal the
CPU decoder's exactly. A file whose name contains "unsupported" cannot be opened, as a codec
NVDEC lacks."""
from __future__ import annotations

import enum
from types import SimpleNamespace

import av
import torch


class OutputColorType(enum.Enum):
    NATIVE = 0
    RGB = 1
    RGBP = 2


class ThreadedDecoder:
    def __init__(self, path, buffer_size, gpu_id=0, use_device_memory=True,
                 output_color_type=OutputColorType.NATIVE):
        if "unsupported" in str(path):
            raise RuntimeError("CUVID: codec not supported on this GPU")
        self._container = av.open(str(path))
        stream = self._container.streams.video[0]
        self._rate = float(stream.average_rate)
        self._frames = self._container.decode(stream)
        self._planar = output_color_type == OutputColorType.RGBP

    def get_stream_metadata(self):
        return SimpleNamespace(average_fps=int(self._rate))  # an integer, as the library's

    def get_batch_frames(self, n):
        out = []
        for frame in self._frames:
            t = torch.from_numpy(frame.to_ndarray(format="rgb24"))
            out.append(t.permute(2, 0, 1).contiguous() if self._planar else t)
            if len(out) == n:
                break
        return out
