"""How long ``check`` and ``report`` take, and how much memory, on a folder of many outputs.

Writes ``--outputs`` small save_numpy outputs (records and arrays as the runner writes them:
100-row 512-d features, every 50th with a frozen stretch) under ``--root``, then times
``video_features.check.check`` and ``video_features.report.build`` in this process and prints
their wall time and the peak resident memory.

    python bench/report_scale.py --outputs 20000 --root /tmp/scale
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make(root: Path, n: int) -> None:
    folder = root / "resnet"
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"d{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        x = rng.standard_normal((100, 512)).astype(np.float32)
        if i % 50 == 0:
            x[30:60] = x[30]
        ts = np.stack([np.arange(100) * 40.0, np.arange(1, 101) * 40.0], 1)
        arrays = {"resnet": x, "fps": np.array(25.0), "timestamps_ms": ts}
        outputs = {}
        for key, a in arrays.items():
            np.save(sub / f"v{i}_{key}.npy", a)
            outputs[key] = {"file": f"v{i}_{key}.npy", "shape": list(a.shape), "dtype": a.dtype.str}
        meta = {"input": f"/data/v{i}.mp4", "media": {"duration_s": 4.0},
                "record": {"feature_type": "resnet"}, "outputs": outputs}
        (sub / f"v{i}_meta.json").write_text(json.dumps(meta))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--outputs", type=int, default=20000)
    p.add_argument("--root", default="/tmp/report_scale")
    args = p.parse_args()
    root = Path(args.root)
    if not (root / "resnet").is_dir():
        t = time.perf_counter()
        make(root, args.outputs)
        print(f"made {args.outputs} outputs in {time.perf_counter() - t:.1f} s")
    from video_features.check import check
    from video_features.report import build

    t = time.perf_counter()
    report = check(root)
    print(f"check: {report.outputs} outputs, {len(report.findings)} findings in "
          f"{time.perf_counter() - t:.1f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    t = time.perf_counter()
    page = build(root)
    print(f"report: {len(page) / 2**20:.1f} MB page in {time.perf_counter() - t:.1f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
