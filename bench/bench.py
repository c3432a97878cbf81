"""Throughput and memory of one feature type on one video and device.

Prints frames/s, real-time factor (video seconds per wall second), wall time and peak memory
(RSS of this process; GPU peak allocation on CUDA). Model loading is timed separately.

    python bench/bench.py --feature_type resnet --device cpu --video sample/A.mp4
    python bench/bench.py --feature_type i3d --device cuda:0 --make_video 600 streams=rgb

Without real checkpoints in the torch hub cache, pass --random_weights: the networks then run
with RANDOM weights (same cost, meaningless features), clearly a benchmark-only mode.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feature_type", default="resnet")
    ap.add_argument("--video", help="input video (or frame folder / audio file)")
    ap.add_argument("--make_video", type=float, metavar="SECONDS",
                    help="benchmark on a generated video of this length instead")
    ap.add_argument("--size", default="320x240", help="WxH of a generated video")
    ap.add_argument("--fps", type=float, default=25.0, help="frame rate of a generated video")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--random_weights", action="store_true",
                    help="run with RANDOM weights when no checkpoint is cached (benchmark only)")
    ap.add_argument("overrides", nargs="*", help="key=value options of the feature type")
    args = ap.parse_args()

    import torch

    from video_features.utils.config import _split_words, canonical_feature_type, make_config, typed_words
    from video_features.utils.device import fp32_precision
    from video_features.utils.runner import build_extractor, configure_logging

    configure_logging("warning")
    if args.threads:
        torch.set_num_threads(args.threads)
    video = args.video
    if args.make_video:
        from sample.make_samples import write_video

        w, h = (int(v) for v in args.size.split("x"))
        video = str(Path(tempfile.mkdtemp()) / f"bench_{int(args.make_video)}s.mp4")
        t = time.perf_counter()
        # in a child process, so that generating the input does not count towards peak RSS
        import multiprocessing as mp

        p = mp.get_context("spawn").Process(target=write_video, args=(video,), kwargs=dict(
            n_frames=int(round(args.make_video * args.fps)), fps=args.fps, width=w, height=h))
        p.start()
        p.join()
        if p.exitcode != 0:
            sys.exit(f"generating the benchmark video failed (exit code {p.exitcode})")
        print(f"generated {video} ({args.make_video:g} s, {w}x{h} @ {args.fps:g} fps) "
              f"in {time.perf_counter() - t:.1f} s", flush=True)
    if not video:
        ap.error("give --video or --make_video")
    _, words = _split_words(args.overrides)
    overrides = typed_words(canonical_feature_type(args.feature_type), words)
    device = args.device
    cfg = make_config(args.feature_type, video_paths=[video],
                      device="cpu" if device == "cpu" else "cuda",
                      device_ids=[int(device.split(":")[1]) if ":" in device else 0] if device != "cpu" else [0],
                      allow_random_weights=args.random_weights, **overrides)
    rss_before = peak_rss_gb()
    t0 = time.perf_counter()
    ex = build_extractor(cfg, device)
    load_s = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    import av

    try:
        with av.open(video) as c:
            duration = float(c.duration / 1e6) if c.duration else float("nan")
    except Exception:
        duration = float("nan")
    t1 = time.perf_counter()
    out = ex.extract(video)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t1
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items())
    print(f"feature_type={cfg.feature_type} device={device} threads={torch.get_num_threads()} "
          f"video={video} duration={duration:.2f}s")
    print(f"outputs: {shapes}")
    print(f"model load {load_s:.2f} s; extraction wall {wall:.2f} s; frames used {ex.frames_read}; "
          f"{ex.frames_read / wall:.2f} frames/s; real-time factor {duration / wall:.3f}")
    print(f"peak RSS {peak_rss_gb():.2f} GB (after imports, before load: {rss_before:.2f} GB)")
    if device.startswith("cuda"):
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 1024 ** 3:.2f} GB allocated, "
              f"{torch.cuda.max_memory_reserved() / 1024 ** 3:.2f} GB reserved "
              f"(numerics: {fp32_precision()})")


if __name__ == "__main__":
    main()
