"""Dual TV-L1 flow: ours (models/tvl1) against OpenCV's DualTVL1OpticalFlow on the same frames
and the same CPU cores: pairs/s of each, their ratio, and how far the two flows differ
(endpoint error, px).

    python bench/tvl1_vs_opencv.py --pairs 8 --size 256x341
    python bench/tvl1_vs_opencv.py --pattern --pairs 64 --device cuda:0 --opencv-pairs 4
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from video_features.models.tvl1 import net as tvl1_net  # noqa: E402
from video_features.models.tvl1.net import TVL1  # noqa: E402


def parse_size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def video_frames(path: str, n: int, size: tuple[int, int]) -> list[np.ndarray]:
    """The first ``n`` frames of ``path`` as (H, W, 3) uint8 RGB, resized with INTER_AREA."""
    import av

    h, w = size
    out = []
    with av.open(path) as container:
        for frame in container.decode(video=0):
            rgb = frame.to_ndarray(format="rgb24")
            if rgb.shape[:2] != (h, w):
                rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
            out.append(rgb)
            if len(out) == n:
                break
    if len(out) < 2:
        raise SystemExit(f"{path}: fewer than 2 frames decoded")
    return out


def pattern_frames(n: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """A smooth random colour texture that shifts and turns a little each frame, with a textured
    square moving the other way over it (a motion boundary)."""
    h, w = size
    rng = np.random.default_rng(seed)
    margin = max(h, w) // 2

    def texture(th: int, tw: int) -> np.ndarray:
        img = np.zeros((th, tw, 3), np.float32)
        for sigma, weight in ((1.0, 0.5), (3.0, 1.0), (8.0, 1.5)):
            noise = rng.standard_normal((th, tw, 3)).astype(np.float32)
            img += weight * cv2.GaussianBlur(noise, (0, 0), sigma)
        img -= img.min(axis=(0, 1))
        img /= img.max(axis=(0, 1))
        return img * 255.0

    bg = texture(h + 2 * margin, w + 2 * margin)
    side = max(8, min(h, w) // 4)
    fg = texture(side, side)
    centre = (bg.shape[1] / 2, bg.shape[0] / 2)
    frames = []
    for k in range(n):
        m = cv2.getRotationMatrix2D(centre, 0.4 * k, 1.0)
        m[:, 2] += (1.3 * k, 0.7 * k)
        img = cv2.warpAffine(bg, m, (bg.shape[1], bg.shape[0]), flags=cv2.INTER_CUBIC,
                             borderMode=cv2.BORDER_REFLECT)[margin:margin + h, margin:margin + w]
        x0 = int(w * 0.6 - 2.0 * k) % max(1, w - side)
        y0 = int(h * 0.3 + 1.0 * k) % max(1, h - side)
        img[y0:y0 + side, x0:x0 + side] = fg
        frames.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return frames


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def solver_name(model: TVL1, device: torch.device) -> str:
    """Which warp solver ``model`` used on ``device`` (after a warm-up)."""
    if model.kernel == "torch":
        return "tensor ops (kernel=torch)"
    fused = getattr(tvl1_net, "_FUSED", {}).get("cuda" if device.type == "cuda" else "cpu", "?")
    if fused is None:
        return "tensor ops (fused kernel unavailable)"
    mod = getattr(fused, "__name__", "")    # _FUSED holds the solver module itself
    if mod.endswith("cpu_loop"):
        return "numba loops (cpu_loop)"
    if mod.endswith("triton_step"):
        return "Triton kernel (triton_step)"
    return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(model: TVL1, frames: torch.Tensor, n: int, batch: int, device: torch.device):
    """Flows of pairs (i, i + 1), i < n, in calls of ``batch`` pairs; (flows on CPU, seconds)."""
    flows = []
    sync(device)
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        j = min(n, i + batch)
        flows.append(model.estimate(frames[i:j], frames[i + 1:j + 1]))
    sync(device)
    wall = time.perf_counter() - t0
    return torch.cat(flows).permute(0, 2, 3, 1).cpu().numpy(), wall


def run_opencv(frames: list[np.ndarray], m: int):
    """OpenCV's flows of pairs (i, i + 1), i < m, a fresh solver per pair; (flows, seconds)."""
    flows = []
    t0 = time.perf_counter()
    for i in range(m):
        g0 = cv2.cvtColor(frames[i], cv2.COLOR_RGB2GRAY)
        g1 = cv2.cvtColor(frames[i + 1], cv2.COLOR_RGB2GRAY)
        flows.append(cv2.optflow.DualTVL1OpticalFlow_create().calc(g0, g1, None))
    return np.stack(flows), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--video", default=str(ROOT / "sample" / "A.mp4"),
                     help="frames from this video (default: sample/A.mp4)")
    src.add_argument("--pattern", action="store_true",
                     help="a generated moving texture instead of a video")
    ap.add_argument("--size", default="256x341", help="HxW the frames are resized to")
    ap.add_argument("--pairs", type=int, default=16, help="consecutive frame pairs for ours")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads of torch and of OpenCV (default: all cores)")
    ap.add_argument("--device", default="cpu", help="ours on cpu or cuda:N (OpenCV: always CPU)")
    ap.add_argument("--batch", type=int, default=0, help="pairs per estimate call (default: all)")
    ap.add_argument("--kernel", default="auto", choices=["auto", "torch"])
    ap.add_argument("--opencv-pairs", type=int, default=None,
                    help="pairs OpenCV is timed on (default: min(pairs, 8))")
    ap.add_argument("--skip-opencv", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="of --pattern")
    args = ap.parse_args()

    size = parse_size(args.size)
    n = args.pairs
    if n < 1:
        ap.error("--pairs must be >= 1")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or cores
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    device = torch.device(args.device)
    batch = args.batch or n
    m = 0 if args.skip_opencv else min(n, args.opencv_pairs if args.opencv_pairs is not None else 8)

    if args.pattern:
        frames = pattern_frames(n + 1, size, args.seed)
        source = f"generated pattern (seed {args.seed})"
    else:
        frames = video_frames(args.video, n + 1, size)
        source = args.video
        if len(frames) < n + 1:   # a short video: played back and forth
            k = len(frames)
            frames = [frames[abs((i + k - 1) % (2 * k - 2) - (k - 1))] for i in range(n + 1)]
            source += f" (only {k} frames: played back and forth)"

    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"CPU: {cpu_model()}; {threads} of {os.cpu_count()} cores used "
          f"(torch.set_num_threads = cv2.setNumThreads = {threads}); load average {load} "
          f"before starting")
    gpu = ""
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        print(f"GPU: {gpu}")
    print(f"torch {torch.__version__}, OpenCV {cv2.__version__}, numpy {np.__version__}, "
          f"python {platform.python_version()}; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"frames: {source}, {size[0]}x{size[1]} (HxW)")
    print(f"timed: ours on {n} pairs on {device}, {batch} per estimate call, kernel={args.kernel} "
          f"(RGB float frames already on the device; gray conversion included); "
          + (f"OpenCV on {m} pairs, one at a time, a fresh DualTVL1OpticalFlow_create() each "
             f"(cvtColor included)" if m else "OpenCV skipped"))

    model = TVL1(kernel=args.kernel).to(device)
    ft = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().contiguous().to(device)

    # warm-up (not timed): numba compilation on the CPU, Triton compilation on CUDA
    t0 = time.perf_counter()
    if device.type == "cuda":
        warm = sorted({min(batch, n), n % batch or batch})   # the batch sizes the timing will see
    else:
        warm = [min(batch, n, threads)]
    for b in warm:
        model.estimate(ft[:b], ft[1:b + 1])
    sync(device)
    print(f"warm-up: {' + '.join(str(b) for b in warm)} pair(s) in {time.perf_counter() - t0:.2f} s "
          f"(compilation; not timed); solver: {solver_name(model, device)}")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ours, wall = run_ours(model, ft, n, batch, device)
    ours_rate = n / wall
    print(f"ours:   {n:4d} pairs in {wall:8.3f} s = {ours_rate:8.3f} pairs/s "
          f"({1000 * wall / n:.1f} ms/pair)")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
        print(f"ours:   peak GPU memory {peak:.1f} MiB (torch.cuda.max_memory_allocated; of it "
              f"{ft.numel() * 4 / 2 ** 20:.1f} MiB the {n + 1} input frames)")

    summary = (f"summary: {size[0]}x{size[1]}, ours {ours_rate:.2f} pairs/s on {device}"
               f"{' (' + gpu + ')' if gpu else ''}, {threads} CPU threads")
    if m:
        cv_flows, cv_wall = run_opencv(frames, m)
        cv_rate = m / cv_wall
        print(f"OpenCV: {m:4d} pairs in {cv_wall:8.3f} s = {cv_rate:8.3f} pairs/s "
              f"({1000 * cv_wall / m:.1f} ms/pair)")
        ratio = ours_rate / cv_rate
        print(f"ratio ours / OpenCV: {ratio:.2f}x")
        epe = np.sqrt(((ours[:m] - cv_flows) ** 2).sum(-1))
        mag = np.sqrt((cv_flows ** 2).sum(-1))
        print(f"parity over {m} pairs ({epe.size} px): endpoint error mean {epe.mean():.4f} px, "
              f"p99 {np.percentile(epe, 99):.4f} px, max {epe.max():.4f} px "
              f"(OpenCV's flow: mean |flow| {mag.mean():.3f} px, max {mag.max():.2f} px)")
        print("per pair mean EPE: " + " ".join(f"{e:.4f}" for e in epe.mean(axis=(1, 2))))
        summary += (f"; OpenCV {cv_rate:.2f} pairs/s -> {ratio:.2f}x; EPE mean {epe.mean():.4f} "
                    f"p99 {np.percentile(epe, 99):.4f} max {epe.max():.3f} px")
    print(summary)


if __name__ == "__main__":
    main()
