"""PWC-Net's fused cost volume without a GPU: the fallback to tensor ops when a Triton launch
fails, the kernel's launch grid, and the pre-processing's channel reversal. The kernel's numerics
are held in tests/test_flow_nets.py (Triton's interpreter)."""
from __future__ import annotations

import logging

import pytest
import torch

import video_features.models.pwc.net as pn
from video_features.models.pwc.net import PWCNet, correlation_torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="module")
def pwc() -> PWCNet:
    torch.manual_seed(1)
    return PWCNet().eval()


@pytest.fixture()
def kernel(monkeypatch):
    """correlation_triton as the dispatcher's kernel, usable on CPU tensors; launches recorded."""
    k = pytest.importorskip("video_features.models.pwc.correlation_triton")
    monkeypatch.setattr(k, "available", lambda t: True)
    monkeypatch.setattr(pn, "_KERNEL", [k])
    return k


class _Launcher:
    """Stands in for the jitted kernel: ``kernel[grid](...)`` records the grid, then raises
    ``error`` (as a failed compile would) or leaves the output as it is."""

    def __init__(self, error: Exception | None = None) -> None:
        self.grids: list[tuple] = []
        self.kwargs: list[dict] = []
        self.error = error

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append(tuple(grid))
            self.kwargs.append(kwargs)
            if self.error is not None:
                raise self.error
        return launch


def _frames(b: int = 1, h: int = 64, w: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    one = torch.rand(b, 3, h, w, generator=g) * 255
    return one, (torch.roll(one, shifts=(1, 2), dims=(2, 3)) + 5).clamp(0, 255)


def test_failed_triton_launch_falls_back_to_tensor_ops_once(pwc, kernel, monkeypatch, caplog):
    a, b = _frames()
    monkeypatch.setattr(pn, "_KERNEL", [None])
    ref = pwc.estimate(a, b)
    monkeypatch.setattr(pn, "_KERNEL", [kernel])
    launcher = _Launcher(RuntimeError("Failed to compile launcher: gcc: not found\nmore"))
    monkeypatch.setattr(kernel, "_correlation_kernel", launcher)
    with caplog.at_level(logging.WARNING, logger=pn.__name__):
        first = pwc.estimate(a, b)
        second = pwc.estimate(a, b)
    assert torch.equal(first, ref) and torch.equal(second, ref)
    assert len(launcher.grids) == 1            # tried once, never again in this process
    assert pn._KERNEL == [None]
    warnings = [r for r in caplog.records if r.name == pn.__name__ and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "gcc: not found" in warnings[0].getMessage()


def test_out_of_memory_in_triton_launch_is_raised_and_keeps_the_kernel(kernel, monkeypatch):
    # the extractors split batches on OOM; that is no reason to give up the kernel
    monkeypatch.setattr(kernel, "_correlation_kernel",
                        _Launcher(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    one = torch.randn(1, 8, 4, 5)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        pn.correlation(one, one)
    assert pn._KERNEL == [kernel]


def test_kernel_grid_has_one_program_per_pixel_block_and_image(kernel, monkeypatch):
    """Displacements are looped over inside a program (the first map's block is read once), so
    the grid has no displacement axis: one program per pixel block of each image."""
    launcher = _Launcher()
    monkeypatch.setattr(kernel, "_correlation_kernel", launcher)
    for b, c, h, w in ((2, 196, 5, 7), (3, 32, 20, 30), (1, 3, 1, 1)):
        one = torch.randn(b, c, h, w)
        kernel.correlation(one, one, 4)
        block_p = launcher.kwargs[-1]["BLOCK_P"]
        assert launcher.grids[-1] == (-(-h * w // block_p), b)


def test_too_many_channels_for_the_kernel_use_tensor_ops(kernel, monkeypatch):
    launcher = _Launcher()
    monkeypatch.setattr(kernel, "_correlation_kernel", launcher)
    g = torch.Generator().manual_seed(0)
    one, two = (torch.randn(1, kernel.MAX_CHANNELS + 1, 2, 3, generator=g) for _ in range(2))
    torch.testing.assert_close(pn.correlation(one, two), correlation_torch(one, two))
    assert launcher.grids == []
    with pytest.raises(ValueError):
        kernel.correlation(one, two, 4)


def test_estimate_reverses_channels_without_a_list_index(pwc, monkeypatch):
    """RGB -> BGR by flip: a Python-list index is a blocking host-to-device copy on a GPU. The
    network still gets what the list index gave."""
    a, b = _frames(2)
    seen = []
    hook = pwc.register_forward_pre_hook(lambda m, args: seen.append([t.clone() for t in args]))
    getitem = torch.Tensor.__getitem__

    def no_list_index(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        assert not any(isinstance(p, list) for p in parts), f"list index {index!r}"
        return getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", no_list_index)
    try:
        pwc.estimate(a, b)
    finally:
        hook.remove()
    monkeypatch.undo()
    old = torch.cat((a, b), 0)[:, [2, 1, 0]].float() / 255.0
    assert torch.equal(seen[0][0], old[:2]) and torch.equal(seen[0][1], old[2:])
