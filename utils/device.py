"""Per-process device policy: the one place that sets PyTorch's global numerics switches.

* ``cudnn.benchmark`` stays off. With it on, cuDNN times every algorithm for every new input
  shape and keeps the fastest, whatever its workspace: PWC-Net's cost volumes and the varying
  frame sizes of a video collection then took 40.9 GB of GPU memory for i3d at defaults (1.5 GB
  with it off, same outputs), failing on smaller cards and starving other processes.
* fp32 math: ``tf32=false`` (default) keeps convolutions and matmuls in IEEE fp32 on GPUs, so GPU
  features match CPU ones closely; ``tf32=true`` allows TF32 tensor cores (faster, about 1e-3
  relative deviation; measured figures per feature type in the README). CPUs ignore both.

The switches are process-global, which is why a worker process applies them once for its
configuration instead of extractors toggling them around their own calls.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def apply_numerics(tf32: bool) -> None:
    """Set cuDNN algorithm selection and the fp32 precision of convolutions and matmuls."""
    torch.backends.cudnn.benchmark = False
    precision = "tf32" if tf32 else "ieee"
    try:
        torch.backends.cudnn.conv.fp32_precision = precision
        torch.backends.cuda.matmul.fp32_precision = precision
    except AttributeError:  # a PyTorch without the fp32_precision switches
        torch.backends.cudnn.allow_tf32 = bool(tf32)
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)


def fp32_precision() -> dict[str, Any]:
    """The current switches, as recorded beside outputs and printed by the benchmark."""
    try:
        return {"conv": torch.backends.cudnn.conv.fp32_precision,
                "matmul": torch.backends.cuda.matmul.fp32_precision,
                "cudnn_benchmark": torch.backends.cudnn.benchmark}
    except AttributeError:
        return {"conv": "tf32" if torch.backends.cudnn.allow_tf32 else "ieee",
                "matmul": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
                "cudnn_benchmark": torch.backends.cudnn.benchmark}


def precision_context(device: torch.device, precision: str) -> Any:
    """Autocast of the networks to ``precision`` ("fp32": none). Inputs stay fp32 (or fp64,
    which autocast leaves alone, as VGGish's front end); outputs are made fp32 by the callers."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def to_host_async(t: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``t`` copied to host memory without waiting for it: ``(host tensor, ready)``; call
    ``ready()`` before reading the host tensor. On a GPU the copy goes into a pinned buffer
    behind the work already queued (a ``.cpu()`` would stall the caller until all of it ran);
    a CPU tensor is returned as it is."""
    if t.device.type != "cuda":
        return t, lambda: None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event.synchronize


def prepare_device(device: str, tf32: bool) -> torch.device:
    """Select ``device`` for this process and apply the numerics policy. A bare "cuda" is the
    first visible GPU (cuda:0): where CUDA_VISIBLE_DEVICES narrows a process to one GPU (a Ray
    actor, a Slurm task), that GPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:  # set_device needs an index
            dev = torch.device("cuda", 0)
        torch.cuda.set_device(dev)
    apply_numerics(tf32)
    return dev


#: fragments of the messages of CUDA errors after which the process's CUDA context is unusable
_STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure",
           "misaligned address", "illegal instruction", "uncorrectable ecc", "unknown error",
           "context is destroyed", "status_execution_failed")


def is_sticky_device_error(exc: BaseException) -> bool:
    """True for errors after which every later CUDA call of this process fails too (a corrupted
    context): the worker must be replaced, not reused. Out-of-memory is not one of them."""
    if type(exc).__name__ == "OutOfMemoryError":
        return False
    if type(exc).__name__ == "AcceleratorError":  # torch's class for CUDA runtime errors
        return True
    text = str(exc).lower()
    return ("cuda" in text or "cublas" in text or "cudnn" in text) and any(s in text for s in _STICKY)
