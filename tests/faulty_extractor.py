"""A feature type that misbehaves on request, to test the runner with real worker processes.

Loaded through the plugin mechanism (``VIDEO_FEATURES_PLUGINS=faulty=tests.faulty_extractor:
FaultyExtractor``). The input's file name says what to do: ``die*`` kills the worker process,
``hang*`` never returns, ``busy*`` works for ``busy_seconds`` while reporting progress, ``poison*``
raises a CUDA-style sticky error after which this worker fails every later input (as a broken
CUDA context does); anything else succeeds at once. Each output row holds the wall-clock time it
was made and the worker's pid. The input files need not exist.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from video_features.models.base import Extractor
from video_features.utils.config import SharedOptions, option

STICKY = "CUDA error: an illegal memory access was encountered"


@dataclasses.dataclass
class FaultyOptions(SharedOptions):
    busy_seconds: float = option("how long a busy* input takes", default=10.0)


class FaultyExtractor(Extractor):
    output_keys = ("faulty",)
    auto_batch_size = {"cpu": 1, "cuda": 1}
    schema = FaultyOptions

    def __init__(self, cfg, device) -> None:
        super().__init__(cfg, device)
        self.broken = False

    def extract(self, path: str) -> dict[str, np.ndarray]:
        name = Path(path).name
        if self.broken:
            raise RuntimeError(STICKY)
        if name.startswith("poison"):
            self.broken = True
            raise RuntimeError(STICKY)
        if name.startswith("die"):
            os._exit(9)
        if name.startswith("hang"):
            time.sleep(3600)
        if name.startswith("busy"):
            end = time.time() + self.cfg.busy_seconds
            while time.time() < end:
                time.sleep(0.05)
                self.count_frames(1)
        return {"faulty": np.array([[time.time(), os.getpid()]])}
