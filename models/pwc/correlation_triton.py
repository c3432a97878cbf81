"""PWC-Net's cost volume as one fused GPU kernel (Triton).

The tensor-op version (:func:`models.pwc.net.correlation_torch`) runs one multiply-reduce per
displacement, 81 per pyramid level, each writing a ``B x C x H x W`` product to memory before
reducing it. Here one kernel launch computes every displacement: each program takes a block of
pixels of one displacement of one image and sums over the channels in registers, so nothing but
the inputs and the ``B x 81 x H x W`` result ever touches memory. Sums are in float32 whatever
the input dtype (bf16 / fp16 under autocast).

Importing this module needs Triton; :func:`available` says whether it can run on a tensor.
With ``TRITON_INTERPRET=1`` in the environment (set before the import) the kernel runs on the
CPU in Triton's interpreter, which is how the tests hold it against the tensor-op version.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_C = 32
BLOCK_P = 128


@triton.jit
def _correlation_kernel(one_ptr, two_ptr, out_ptr, C, H, W, inv_c,
                        D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_p = tl.program_id(0)
    k = tl.program_id(1)                  # displacement, row-major over (dy, dx)
    b = tl.program_id(2)
    K: tl.constexpr = 2 * D + 1
    dy = k // K - D
    dx = k % K - D
    hw = H * W
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = p < hw
    y = p // W
    x = p % W
    y2 = y + dy
    x2 = x + dx
    inside = valid & (y2 >= 0) & (y2 < H) & (x2 >= 0) & (x2 < W)
    q = y2 * W + x2
    base = b.to(tl.int64) * C * hw
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        offs = base + c[:, None].to(tl.int64) * hw
        a = tl.load(one_ptr + offs + p[None, :], mask=cm[:, None] & valid[None, :], other=0.0)
        v = tl.load(two_ptr + offs + q[None, :], mask=cm[:, None] & inside[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * v.to(tl.float32), axis=0)
    out_offs = (b.to(tl.int64) * K * K + k) * hw + p
    tl.store(out_ptr + out_offs, (acc * inv_c).to(out_ptr.dtype.element_ty), mask=valid)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(t: torch.Tensor) -> bool:
    """Whether the kernel can run on ``t``'s device: a CUDA GPU, or the CPU in the interpreter."""
    return t.is_cuda or (interpreted() and t.device.type == "cpu")


def correlation(one: torch.Tensor, two: torch.Tensor, max_displacement: int) -> torch.Tensor:
    """Same contract as :func:`models.pwc.net.correlation_torch`."""
    b, c, h, w = one.shape
    one, two = one.contiguous(), two.contiguous()
    k = 2 * max_displacement + 1
    out = torch.empty((b, k * k, h, w), device=one.device, dtype=one.dtype)
    grid = (triton.cdiv(h * w, BLOCK_P), k * k, b)
    _correlation_kernel[grid](one, two, out, c, h, w, 1.0 / c, D=max_displacement,
                              BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)
    return out
