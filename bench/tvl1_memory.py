"""Memory of one TV-L1 frame pair: what ``flow_batch_size=auto`` (models/i3d/extractor.py,
``TVL1_PAIR_BYTES``) sizes GPU batches by.

On a GPU it runs the solver and reads ``torch.cuda.max_memory_allocated``. On the CPU it runs
what the GPU runs in tensor ops (the pyramid, the warping, the data of each warp) with the fused
solver's own buffers in place of its kernels, and takes the peak of live heap memory after every
tensor operation (glibc's ``mallinfo2``). Either way the per-pair figure is the slope between two
batch sizes, so fixed costs drop out.

    python bench/tvl1_memory.py                      # CPU, 256x341, 4 and 16 pairs
    python bench/tvl1_memory.py --device cuda:0 --pairs 16 64
"""
from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from video_features.models.tvl1 import net  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _heap_in_use() -> int:
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd   # allocated from the heap + in mmapped blocks


class _PeakHeap(TorchDispatchMode):
    """Tracks the most heap in use right after any tensor operation."""

    peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_in_use())
        return out


def _fused_buffers_only(kernel, d, u, dual, p) -> None:
    """What :func:`models.tvl1.triton_step.solve_warp` allocates besides its arguments (the
    median filter's two output images and the stop flags), without iterating."""
    spare = [torch.empty_like(u[0]).fill_(0), torch.empty_like(u[1]).fill_(0)]
    flags = torch.ones((2, u[0].shape[0]), dtype=torch.int32)
    del spare, flags


def peak_bytes(pairs: int, h: int, w: int, device: torch.device) -> int:
    """Peak memory above the input frames while ``pairs`` pairs of (h, w) are solved."""
    torch.manual_seed(0)
    frames = (torch.rand(pairs + 1, 3, h, w) * 255).round().to(device)
    a, b = frames[:-1].clone(), frames[1:].clone()
    model = net.TVL1(net.TVL1Params(warps=2, outer_iterations=2, inner_iterations=2)).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        model.estimate(a, b)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    base = _heap_in_use()
    with _PeakHeap() as mode:
        model.estimate(a, b)
    return mode.peak - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="256x341", help="HxW")
    ap.add_argument("--pairs", type=int, nargs=2, default=[4, 16], metavar=("FEW", "MANY"))
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    device = torch.device(args.device)
    if device.type == "cpu":
        net._FUSED["cpu"] = None               # the GPU's level in tensor ops, not the CPU loops
        net.solve_warp = _fused_buffers_only
        torch.set_num_threads(1)
    few, many = args.pairs
    peaks = {n: peak_bytes(n, h, w, device) for n in (few, many)}
    per = (peaks[many] - peaks[few]) / (many - few)
    for n, b in peaks.items():
        print(f"{n:4d} pairs of {h}x{w} on {device}: peak {b / 2**20:8.1f} MB above the frames")
    print(f"per pair: {per / 2**20:.1f} MB; fixed: {(peaks[few] - few * per) / 2**20:.1f} MB")


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2

if __name__ == "__main__":
    main()
