"""How far decoder=nvdec is from decoder=cpu: pixels (colour conversion) and features, and speed.

For each video: every frame from PyAV (the CPU decoder) and from NVDEC (utils/nvdec.py), the
maximum and mean absolute pixel difference, then a feature type run on both frame sets (same
weights, same device) and the largest feature difference relative to the largest feature value.

    python bench/nvdec_compare.py --videos a.mp4 b.mp4 --feature_type resnet --random_weights
    python bench/nvdec_compare.py --make 2 --size 1920x1080 --seconds 5 --random_weights

Needs a CUDA GPU and PyNvVideoCodec.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cpu_frames(path: str):
    import numpy as np
    import torch

    from video_features.utils.video import open_frames

    with open_frames(path) as src:
        frames = np.concatenate([c.frames for c in src.chunks(64)])
    return torch.from_numpy(frames).permute(0, 3, 1, 2)


def _nvdec_frames(path: str, device):
    import torch

    from video_features.utils.nvdec import _Source

    src = _Source(path, device, {"extraction_fps": None}, 64)
    parts = []
    while (chunk := src.read()) is not None:
        parts.append(chunk)
    return torch.cat(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", nargs="*", default=[])
    ap.add_argument("--make", type=int, default=0, help="generate this many videos instead")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--feature_type", default="resnet")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--random_weights", action="store_true")
    args = ap.parse_args()

    import torch

    from video_features.utils.config import make_config
    from video_features.utils.nvdec import unavailable
    from video_features.utils.runner import build_extractor, configure_logging

    configure_logging("warning")
    if not torch.cuda.is_available() or unavailable():
        print(f"needs a CUDA GPU and PyNvVideoCodec: {unavailable() or 'no CUDA GPU visible'}")
        return 2
    paths = list(args.videos)
    if args.make:
        from bench.throughput import _make_videos

        paths += _make_videos(args.make, args.seconds, args.size, 25.0)
    device = torch.device(args.device)
    cfg = make_config(args.feature_type, video_paths=paths, device="cuda",
                      device_ids=[device.index or 0], allow_random_weights=args.random_weights)
    ex = build_extractor(cfg, str(device))
    from video_features.utils.pipeline import Batcher, VideoWork

    def features(frames):
        work = VideoWork(0, "x", fps=25.0)
        batcher = Batcher(ex.run_batch, ex.batch_size_of, ex.keep_rows)
        with torch.inference_mode():
            ex.begin(work)
            ex.video_opened(work)
            stamps = torch.arange(len(frames)).double().numpy() * 40.0
            for key, items, ts in ex.add_frames(work, frames.to(device), stamps):
                batcher.add(work, key, items, ts)
            for key, items, ts in ex.end_frames(work, len(frames) / 25.0):
                batcher.add(work, key, items, ts)
            batcher.run(full_only=False)
            return ex.finish(work)

    for p in paths:
        t0 = time.perf_counter()
        cpu = _cpu_frames(p)
        t_cpu = time.perf_counter() - t0
        t0 = time.perf_counter()
        gpu = _nvdec_frames(p, device)
        torch.cuda.synchronize()
        t_gpu = time.perf_counter() - t0
        n = min(len(cpu), len(gpu))
        diff = (cpu[:n].to(device).int() - gpu[:n].int()).abs()
        a, b = features(cpu[:n]), features(gpu[:n])
        key = next(k for k in a if k not in ("fps", "timestamps_ms"))
        dev = float(abs(a[key] - b[key]).max() / max(1e-12, abs(a[key]).max()))
        print(f"{Path(p).name}: frames cpu {len(cpu)} nvdec {len(gpu)}; pixels max |diff| "
              f"{int(diff.max())}, mean {float(diff.float().mean()):.3f}; {args.feature_type} "
              f"max deviation {dev:.2e} of the largest value; decode {n / t_cpu:.0f} f/s (PyAV, "
              f"one process) vs {n / t_gpu:.0f} f/s (NVDEC, one session)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
