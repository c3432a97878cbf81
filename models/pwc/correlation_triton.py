"""PWC-Net's cost volume as one fused GPU kernel (Triton).

The tensor-op version (:func:`models.pwc.net.correlation_torch`) runs one multiply-reduce per
displacement, 81 per pyramid level, each writing a ``B x C x H x W`` product to memory before
reducing it. Here one kernel launch computes every displacement: each program takes a block of
pixels of one image, loads that block of the first feature map (all channels) once, and loops
over the displacements, reading the shifted pixels of the second map and writing one output
channel per displacement. Nothing but the inputs and the ``B x 81 x H x W`` result touches
memory, and the first map is read once however many displacements there are. Sums are in
float32 whatever the input dtype (bf16 / fp16 under autocast).

The whole channel axis of a block sits in registers, so channel counts above
:data:`MAX_CHANNELS` are not handled here (PWC-Net has at most 196); the caller uses the
tensor-op version for them.

Importing this module needs Triton; :func:`available` says whether it can run on a tensor.
With ``TRITON_INTERPRET=1`` in the environment (set before the import) the kernel runs on the
CPU in Triton's interpreter, which is how the tests hold it against the tensor-op version.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: the most channels one program holds (padded to a power of two) next to its pixel block
MAX_CHANNELS = 512
#: elements (padded channels x pixels) of one program's block; bounds registers per thread
_BLOCK_ELEMENTS = 8192
_NUM_WARPS = 8


@triton.jit
def _correlation_kernel(one_ptr, two_ptr, out_ptr, C, H, W, inv_c,
                        D: tl.constexpr, C_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    K: tl.constexpr = 2 * D + 1
    hw = H * W
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = p < hw
    y = p // W
    x = p % W
    c = tl.arange(0, C_PAD)
    cm = c < C
    offs = b.to(tl.int64) * C * hw + c[:, None].to(tl.int64) * hw
    # the first map's block: loaded once, reused for every displacement
    a = tl.load(one_ptr + offs + p[None, :], mask=cm[:, None] & valid[None, :],
                other=0.0).to(tl.float32)
    out_base = out_ptr + b.to(tl.int64) * (K * K) * hw + p
    for i in range(K):                    # vertical displacement i - D
        y2 = y + (i - D)
        row_ok = valid & (y2 >= 0) & (y2 < H)
        for j in range(K):                # horizontal displacement j - D
            x2 = x + (j - D)
            inside = row_ok & (x2 >= 0) & (x2 < W)
            v = tl.load(two_ptr + offs + (y2 * W + x2)[None, :],
                        mask=cm[:, None] & inside[None, :], other=0.0)
            s = tl.sum(a * v.to(tl.float32), axis=0) * inv_c
            tl.store(out_base + (i * K + j) * hw, s.to(out_ptr.dtype.element_ty), mask=valid)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(t: torch.Tensor) -> bool:
    """Whether the kernel can run on ``t``'s device: a CUDA GPU, or the CPU in the interpreter."""
    return t.is_cuda or (interpreted() and t.device.type == "cpu")


def block_sizes(c: int, hw: int) -> tuple[int, int]:
    """(padded channels, pixels per program) for ``c`` channels and ``hw`` pixels per image."""
    c_pad = triton.next_power_of_2(max(c, 1))
    block_p = max(16, min(128, _BLOCK_ELEMENTS // c_pad))
    return c_pad, min(block_p, max(16, triton.next_power_of_2(hw)))  # tiny maps: one small block


def correlation(one: torch.Tensor, two: torch.Tensor, max_displacement: int) -> torch.Tensor:
    """Same contract as :func:`models.pwc.net.correlation_torch`, for up to
    :data:`MAX_CHANNELS` channels."""
    b, c, h, w = one.shape
    if c > MAX_CHANNELS:
        raise ValueError(f"fused cost volume handles up to {MAX_CHANNELS} channels, got {c}")
    one, two = one.contiguous(), two.contiguous()
    k = 2 * max_displacement + 1
    out = torch.empty((b, k * k, h, w), device=one.device, dtype=one.dtype)
    c_pad, block_p = block_sizes(c, h * w)
    grid = (triton.cdiv(h * w, block_p), b)
    _correlation_kernel[grid](one, two, out, c, h, w, 1.0 / c, D=max_displacement,
                              C_PAD=c_pad, BLOCK_P=block_p, num_warps=_NUM_WARPS)
    return out
