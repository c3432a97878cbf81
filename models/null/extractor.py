"""``feature_type=null``: decoding and the pipeline without a network.

Every frame (at the chosen rate) becomes one row: its mean R, G, B in [0, 255] (over every 8th
pixel of every 8th row, so that the statistic costs next to nothing: 0.02 ms a 640x360 frame). It measures the
pipeline's own ceiling (``bench/throughput.py``), and is a cheap way to check that a collection
decodes, with real timestamps, and to spot black or frozen stretches.
"""
from __future__ import annotations

import numpy as np
import torch

from video_features.models.base import Extractor
from video_features.utils.config import SharedOptions
from video_features.utils.errors import VideoError
from video_features.utils.pipeline import rows_of


class NullExtractor(Extractor):
    output_keys = ("null", "fps", "timestamps_ms")
    auto_batch_size = {"cpu": 256, "cuda": 256}
    schema = SharedOptions
    frame_seam = True
    revision = 2

    def __init__(self, cfg, device) -> None:
        super().__init__(cfg, device)
        if self.device.type == "cpu":
            # no network to run: torch's spinning worker threads would only take cores from
            # the decoders (measured: 2.3 s instead of 1.0 s of CPU per 3,000 frames)
            torch.set_num_threads(1)

    def chunk_frames(self) -> int:
        return 64

    def add_frames(self, work, frames: torch.Tensor, stamps: np.ndarray) -> list:
        # sampled in the frames' memory order (N, H, W, C): a strided gather across channels
        # first costs 5x more
        sample = frames.permute(0, 2, 3, 1)[:, ::8, ::8]
        return [("null", sample.float().mean(dim=(1, 2)), stamps)]

    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def finish(self, work) -> dict[str, np.ndarray]:
        rows, stamps = rows_of(work, "null")
        if rows is None:
            raise VideoError("no frames decoded")
        return {"null": rows.cpu().numpy(), "fps": np.array(work.fps, dtype=np.float64),
                "timestamps_ms": self.row_times(work, stamps)}
