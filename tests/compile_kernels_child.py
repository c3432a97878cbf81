"""Compiles the project's Triton kernels for NVIDIA GPUs with Triton's real compiler and ptxas,
which need no GPU, and prints one JSON line per kernel variant and GPU architecture: its name,
the architecture, the cubin's size, and the registers and local (spilled) memory its threads use
as cuobjdump reports them. Run by tests/test_triton_compile.py in a process of its own, so that
no ``TRITON_INTERPRET`` of another test applies."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from video_features.models.pwc import correlation_triton  # noqa: E402
from video_features.models.tvl1 import triton_step  # noqa: E402

#: pointer arguments that are not float32
POINTERS = {"err_ptr": "*fp64", "active_ptr": "*i32", "next_ptr": "*i32"}
#: integer scalars (sizes); every other scalar is a float32
INTEGERS = {"H", "W", "C"}
TVL1 = {"num_warps": triton_step._NUM_WARPS}
#: (kernel, its variants as (constexpr values, float pointers' type), launch options), at the
#: values the solvers launch them with
KERNELS = [
    (triton_step._primal_kernel,
     [({"GAMMA": g, "BLOCK": triton_step.BLOCK}, "*fp32") for g in (False, True)],
     {**TVL1, "enable_fp_fusion": False}),
    (triton_step._dual_kernel,
     [({"GAMMA": g, "BLOCK": triton_step.BLOCK}, "*fp32") for g in (False, True)],
     {**TVL1, "enable_fp_fusion": False}),
    (triton_step._median_kernel,
     [({"K": k, "BLOCK": triton_step.MEDIAN_BLOCK}, "*fp32") for k in (3, 5)], TVL1),
    # PWC-Net's cost volumes: 16 to 196 channels, at 256x455 frames, fp32 and bf16
    (correlation_triton._correlation_kernel,
     [(dict(zip(("C_PAD", "BLOCK_P"), correlation_triton.block_sizes(c, 64 * 114)), D=4), ptr)
      for c in (16, 196) for ptr in ("*fp32", "*bf16")],
     {"num_warps": correlation_triton._NUM_WARPS}),
]
ARCHS = (80, 90)   # A100, H100 / H200


def signature(fn, constexprs: dict, floats: str) -> dict:
    return {name: "constexpr" if name in constexprs else POINTERS.get(name, floats)
            if name.endswith("_ptr") else "i32" if name in INTEGERS else "fp32"
            for name in fn.arg_names}


def resources(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(cubin)
        text = subprocess.run([str(tool), "--dump-resource-usage", path], capture_output=True,
                              text=True).stdout
    found = re.search(r"REG:(\d+).*LOCAL:(\d+)", text)
    return {"registers": int(found[1]), "local_bytes": int(found[2])} if found else {}


def main() -> None:
    for fn, variants, options in KERNELS:
        for constexprs, floats in variants:
            for arch in ARCHS:
                src = ASTSource(fn=fn, signature=signature(fn, constexprs, floats),
                                constexprs=constexprs)
                kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                print(json.dumps({"kernel": fn.__name__, "variant": {**constexprs, "ptr": floats},
                                  "arch": arch,
                                  "cubin_bytes": len(kernel.asm["cubin"]),
                                  **resources(kernel.asm["cubin"])}), flush=True)


if __name__ == "__main__":
    main()
