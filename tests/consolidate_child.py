"""A process that moves whatever is staged into a consolidated output, in small batches, for
tests that kill it (``python -m tests.consolidate_child MODE OUTPUT_PATH INPUT_ROOT [SECONDS]``).

It prints ``go`` once its imports are done, then consolidates; with SECONDS it stages fresh
versions of its own inputs (``mine*``) and consolidates again until that many seconds passed.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from video_features.utils import consolidate
from video_features.utils.output import OutputWriter

SHARD = 3


def writer(mode: str, out: str, root: str) -> OutputWriter:
    return OutputWriter(mode, out, "null", root, {"feature_type": "null"}, shard_size=SHARD)


def stage(w: OutputWriter, path: str, version: int, rows: int = 256) -> None:
    """An input's outputs as a worker stages them: every value is ``version``."""
    w.write(path, {"null": np.full((rows, 512), version, np.float32), "fps": np.array(25.0)},
            {"v": version})


def main() -> None:
    mode, out, root = sys.argv[1:4]
    seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    consolidate.BATCH = SHARD   # many small parts: more points to be killed at
    w = writer(mode, out, root)
    print("go", flush=True)
    consolidate.consolidate(w, final=True)
    end, version = time.time() + seconds, 1
    while time.time() < end:
        for i in range(SHARD):
            stage(w, f"{root}/mine{i}.mp4", version, rows=8)
        consolidate.consolidate(w, final=True)
        version += 1


if __name__ == "__main__":
    main()
