"""Throughput of the pipeline over a list of videos, against its own ceilings.

Prints, for the same videos and the same number of decoding processes:

* ``decode``   - raw parallel decoding: N processes each decoding whole videos to RGB arrays;
* ``null``     - the full pipeline (decoders, shared memory, batching, routing) with no network;
* ``network``  - the feature type's network alone on the same number of items, at its batch size;
* ``full``     - the feature type end to end (outputs built, not saved);

each as frames/s and real-time factor (video seconds per wall second), plus peak RSS and, on a
GPU, peak GPU memory and the share of wall time the GPU was busy. With ``--tvl1 PAIRS``, also:

* ``tvl1``     - the Dual TV-L1 solver alone (``TVL1().estimate``, i3d's ``flow_type=tvl1``) on
  that many consecutive frame pairs of the first video (synthetic frames without videos),
  resized to ``--tvl1_size``, as pairs/s and, on a GPU, peak GPU memory.

    python bench/throughput.py --make 8 --seconds 10 --size 640x360 --feature_type resnet \\
        --device cpu --random_weights
    python bench/throughput.py --videos a.mp4 b.mp4 --feature_type r21d --device cuda:0
    python bench/throughput.py --tvl1 64 --device cuda:0           # the TV-L1 solver alone
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _make_videos(n: int, seconds: float, size: str, fps: float) -> list[str]:

    w, h = (int(v) for v in size.split("x"))
    folder = Path(tempfile.mkdtemp(prefix="vf-throughput-"))
    paths = [str(folder / f"v{i}.mp4") for i in range(n)]
    with mp.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        pool.starmap(_write, [(p, int(seconds * fps), fps, w, h, i) for i, p in enumerate(paths)])
    return paths


def _write(path: str, n: int, fps: float, w: int, h: int, seed: int) -> None:
    from sample.make_samples import write_video

    write_video(path, n_frames=n, fps=fps, width=w, height=h, audio=True, seed=seed)  # for vggish


def _decode_all(paths: list[str], threads: int) -> int:
    from video_features.utils.video import open_frames

    n = 0
    for p in paths:
        with open_frames(p, threads=threads) as src:
            for _ in src.timed_frames():
                n += 1
    return n


def decode_rate(paths: list[str], processes: int, threads: int) -> tuple[int, float]:
    """Frames decoded and wall seconds, ``processes`` processes sharing the videos."""
    shares = [paths[i::processes] for i in range(processes)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(processes) as pool:
        frames = sum(pool.starmap(_decode_all, [(s, threads) for s in shares if s]))
    return frames, time.perf_counter() - t0


def _durations(paths: list[str]) -> float:
    import av

    total = 0.0
    for p in paths:
        with av.open(p) as c:
            total += float(c.duration / 1e6) if c.duration else 0.0
    return total


class GpuBusy:
    """Share of wall time the GPU was busy, sampled from NVML when it is installed."""

    def __init__(self, index: int):
        self.samples: list[float] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._h = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        except Exception:
            self._nvml = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu)
            time.sleep(0.1)

    def stop(self) -> str:
        self._stop.set()
        if self._nvml is None or not self.samples:
            return "n/a (pynvml not installed)"
        return f"{sum(self.samples) / len(self.samples):.0f} %"


def run_pipeline(cfg, device: str, paths: list[str]):
    import torch

    from video_features.utils.pipeline import DevicePipeline
    from video_features.utils.runner import _decode_threads, build_extractor

    class Keep:
        def write(self, path, feats, info=None):
            return []

    ex = build_extractor(cfg, device)
    results = []
    t0 = time.perf_counter()
    pipe = DevicePipeline(ex, Keep(), cfg.decoders, results.append, _decode_threads(cfg))
    try:
        with torch.inference_mode():
            pipe.run(paths)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    finally:
        pipe.close()
    wall = time.perf_counter() - t0
    failed = [r for r in results if r.status != "done"]
    if failed:
        print(f"  {len(failed)} input(s) failed, e.g. {failed[0].path}: {failed[0].reason}")
    return ex, sum(r.frames for r in results), wall


def network_only(ex, sample_path: str, n_items: int) -> float:
    """Seconds the network alone takes for ``n_items`` work items like the real ones."""
    import numpy as np
    import torch

    from video_features.utils.pipeline import VideoWork
    from video_features.utils.video import open_frames

    work = VideoWork(0, sample_path)
    needs = ex.frame_needs()
    with torch.inference_mode():
        ex.begin(work)
        items = []
        if needs.get("video", True):
            with open_frames(sample_path) as src:
                work.fps = src.fps
                for chunk in src.chunks(ex.chunk_frames()):
                    for key, its, _ in ex.add_frames(work, ex.to_device_frames(chunk.frames),
                                                     chunk.timestamps_ms):
                        items.append((key, its))
                    if sum(len(i) for _, i in items) >= ex.cfg.batch_size:
                        break
        else:  # audio examples (vggish)
            from video_features.utils.audio import iter_audio

            audio = needs["audio"]
            for block in iter_audio(sample_path, audio["sample_rate"], dtype=np.float32):
                items += [(key, its) for key, its, _ in ex.add_audio(work, block)]
                if sum(len(i) for _, i in items) >= ex.cfg.batch_size:
                    break
        key = items[0][0]
        batch = torch.cat([i for k, i in items if k == key])[: ex.cfg.batch_size]
        ex.forward(key, batch)  # warm-up
        if ex.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = 0
        while done < n_items:
            ex.forward(key, batch[: min(len(batch), n_items - done)])
            done += len(batch)
        if ex.device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - t0


def _tvl1_frames(path: str | None, n: int, w: int, h: int):
    """``n`` consecutive RGB frames (n, 3, h, w) float in whole levels 0..255: decoded from
    ``path`` (played back and forth if it is shorter) or, without one, synthetic."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    if path is None:
        from sample.make_samples import synth_frame

        arrays = [synth_frame(i, w, h, 25.0) for i in range(n)]
    else:
        from video_features.utils.video import open_frames

        arrays = []
        with open_frames(path) as src:
            for _, _, rgb in src.timed_frames():
                arrays.append(rgb)
                if len(arrays) == n:
                    break
        if len(arrays) < 2:
            raise SystemExit(f"{path}: fewer than 2 frames for the TV-L1 pairs")
        k = len(arrays)
        arrays = [arrays[abs((i + k - 1) % (2 * k - 2) - (k - 1))] for i in range(n)]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    if x.shape[2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).contiguous()


def tvl1_rate(path: str | None, pairs: int, size: str, batch: int, device: str, threads: int):
    """The TV-L1 solver alone on ``pairs`` consecutive frame pairs at ``size`` (WxH), ``batch``
    pairs per ``estimate`` call, on ``threads`` torch threads (on the CPU: that many pairs at a
    time), after an untimed warm-up (numba / Triton compilation): pairs, wall seconds, a note
    (peak GPU memory)."""
    import torch

    from video_features.models.tvl1.net import TVL1

    torch.set_num_threads(threads)   # the null stage leaves 1
    w, h = (int(v) for v in size.split("x"))
    dev = torch.device(device)
    frames = _tvl1_frames(path, pairs + 1, w, h).to(dev)
    model = TVL1().to(dev)
    warm = sorted({min(batch, pairs), pairs % batch or batch}) if dev.type == "cuda" else [1]
    for b in warm:   # the batch sizes the timed run will see on a GPU; one pair on the CPU
        model.estimate(frames[:b], frames[1:b + 1])
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for i in range(0, pairs, batch):
        j = min(pairs, i + batch)
        model.estimate(frames[i:j], frames[i + 1:j + 1])
    if cuda:
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    note = f"{w}x{h}, {min(batch, pairs)} pairs per call"
    if cuda:
        peak = torch.cuda.max_memory_allocated(dev)
        note += (f", peak GPU memory {peak / 2 ** 30:.2f} GB ({peak / min(batch, pairs) / 2 ** 20:.0f}"
                 f" MB per pair in a batch, the {pairs + 1} input frames included)")
    else:
        note += f", {torch.get_num_threads()} threads"
    return pairs, wall, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", nargs="*", default=[])
    ap.add_argument("--make", type=int, default=0, help="generate this many videos instead")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--feature_type", default="resnet")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N")
    ap.add_argument("--decoders", type=int, default=0, help="decoding processes (0: auto)")
    ap.add_argument("--random_weights", action="store_true")
    ap.add_argument("--skip", nargs="*", default=[], choices=["decode", "null", "network", "full"])
    ap.add_argument("--tvl1", type=int, default=0, metavar="PAIRS",
                    help="also time the TV-L1 solver alone on this many frame pairs (its cost "
                         "depends on the content: decoded from the first video; synthetic frames, "
                         "and this row alone, without videos)")
    ap.add_argument("--tvl1_size", default="341x256",
                    help="WxH of the TV-L1 frames (as --size; i3d's flow size for 4:3 video)")
    ap.add_argument("--tvl1_batch", type=int, default=0,
                    help="pairs per TV-L1 call (0: 16 on the CPU, 64 on a GPU, what i3d's "
                         "flow_batch_size auto picks at 341x256)")
    ap.add_argument("overrides", nargs="*", help="key=value options of the feature type")
    args = ap.parse_args()
    import torch

    threads = torch.get_num_threads()   # before any stage changes it

    def tvl1_row(path: str | None) -> None:
        batch = args.tvl1_batch or (64 if args.device.startswith("cuda") else 16)
        pairs, wall, note = tvl1_rate(path, args.tvl1, args.tvl1_size, batch, args.device, threads)
        print(f"{'tvl1':8s} {pairs:7d} pairs  {wall:8.2f} s {pairs / wall:9.2f} pairs/s  {note}",
              flush=True)

    from video_features.utils.config import _split_words, canonical_feature_type, make_config, typed_words
    from video_features.utils.runner import _decode_threads, configure_logging

    configure_logging("warning")
    paths = list(args.videos)
    if args.make:
        t = time.perf_counter()
        paths += _make_videos(args.make, args.seconds, args.size, args.fps)
        print(f"generated {args.make} videos of {args.seconds:g} s {args.size} in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    if not paths and args.tvl1:   # the solver alone, on synthetic frames
        print(f"TV-L1 alone on synthetic frames; device {args.device}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} torch threads", flush=True)
        tvl1_row(None)
        return
    if not paths:
        ap.error("give --videos or --make")
    seconds = _durations(paths)
    cuda = args.device.startswith("cuda")
    common = dict(video_paths=paths, device="cuda" if cuda else "cpu",
                  device_ids=[int(args.device.split(":")[1]) if ":" in args.device else 0])
    if args.decoders:
        common["decoders"] = args.decoders
    ft = canonical_feature_type(args.feature_type)
    _, words = _split_words(args.overrides)
    cfg = make_config(ft, allow_random_weights=args.random_weights, **common,
                      **typed_words(ft, words))
    print(f"{len(paths)} videos, {seconds:.0f} s of video; device {args.device}, "
          f"{os.cpu_count()} CPU cores, {cfg.decoders} decoders x {_decode_threads(cfg)} threads, "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads", flush=True)
    rows = []

    def row(name: str, frames: int, wall: float, extra: str = "") -> None:
        rows.append((name, frames, wall))
        print(f"{name:8s} {frames:7d} frames {wall:8.2f} s {frames / wall:9.1f} frames/s "
              f"RTF {seconds / wall if frames else 0:8.2f} {extra}", flush=True)

    if "decode" not in args.skip:
        row("decode", *decode_rate(paths, cfg.decoders, _decode_threads(cfg)))
    if "null" not in args.skip:
        null_cfg = make_config("null", **common)
        _, frames, wall = run_pipeline(null_cfg, args.device, paths)
        row("null", frames, wall)
        # the null type sets this process to one torch thread (it has no network to run): the
        # later stages get the thread count the header names
        torch.set_num_threads(threads)
    if "full" not in args.skip or "network" not in args.skip:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            busy = GpuBusy(common["device_ids"][0])
        ex, frames, wall = run_pipeline(cfg, args.device, paths)
        extra = ""
        if cuda:
            extra = (f"GPU busy {busy.stop()}, peak GPU memory "
                     f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GB")
        if "full" not in args.skip:
            row(f"{ft}", frames, wall, extra)
        if "network" not in args.skip and ex.frame_seam:
            # frames counts 0.96 s examples for vggish
            n_items = frames if ft in ("resnet", "null", "vggish") else max(1, frames // ex.cfg.step_size)
            net_s = network_only(ex, paths[0], n_items)
            print(f"network  {n_items:7d} items  {net_s:8.2f} s (the network alone; end to end "
                  f"took {wall / net_s:.2f}x that)", flush=True)
    if args.tvl1:
        tvl1_row(paths[0])
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GB "
          "(this process)")


if __name__ == "__main__":
    main()
