"""The Triton kernels (TV-L1's solver steps and median filter, PWC-Net's cost volume) compile
for the GPUs they are meant for (A100: sm_80, H100 / H200: sm_90) with Triton's real compiler
and ptxas, which need no GPU: the interpreter tests check their arithmetic, this checks that the
compiler takes them (tuples, early returns, rounding intrinsics) and that no thread spills
registers to local memory. Compiled in a process of its own (tests/compile_kernels_child.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")

CHILD = Path(__file__).resolve().parent / "compile_kernels_child.py"


def test_every_kernel_compiles_for_a100_and_h100_without_spilling():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(CHILD)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    seen = {(r["kernel"], r["arch"]) for r in rows}
    assert seen == {(k, a) for k in ("_primal_kernel", "_dual_kernel", "_median_kernel",
                                     "_correlation_kernel") for a in (80, 90)}
    assert len(rows) == 2 * (2 + 2 + 2 + 4)        # every variant on both architectures
    for r in rows:
        assert r["cubin_bytes"] > 0, r
        if "local_bytes" in r:                     # cuobjdump ships with Triton's backend
            assert r["local_bytes"] == 0 and 0 < r["registers"] <= 255, r
