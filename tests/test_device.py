"""The per-process numerics policy and the classification of device errors."""
from __future__ import annotations

import pytest
import torch

from video_features.utils.device import apply_numerics, fp32_precision, is_sticky_device_error


def test_numerics_policy_is_set_in_one_place_from_tf32():
    torch.backends.cudnn.benchmark = True  # as the old code set it for GPU workers
    apply_numerics(False)
    assert fp32_precision() == {"conv": "ieee", "matmul": "ieee", "cudnn_benchmark": False}
    apply_numerics(True)
    assert fp32_precision() == {"conv": "tf32", "matmul": "tf32", "cudnn_benchmark": False}
    apply_numerics(False)


def test_building_a_worker_applies_the_configured_policy(resnet_weights, make_video):
    from video_features.utils.config import make_config
    from video_features.utils.runner import build_extractor

    resnet_weights("resnet18")
    video = make_video("dev.mp4", n_frames=2, fps=25.0, width=32, height=32)
    torch.backends.cudnn.benchmark = True
    for tf32 in (True, False):
        cfg = make_config("resnet", video_paths=[str(video)], device="cpu", model_name="resnet18",
                          tf32=tf32)
        build_extractor(cfg, "cpu")
        want = "tf32" if tf32 else "ieee"
        assert fp32_precision() == {"conv": want, "matmul": want, "cudnn_benchmark": False}


def test_vggish_no_longer_toggles_precision_itself():
    import video_features.models.vggish.extractor as vx

    assert not hasattr(vx, "full_fp32")


def test_sticky_device_errors_are_told_apart():
    sticky = [RuntimeError("CUDA error: an illegal memory access was encountered"),
              RuntimeError("CUDA error: device-side assert triggered\nCompile with ..."),
              RuntimeError("CUDA error: unspecified launch failure"),
              RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm")]
    benign = [RuntimeError("Given groups=1, weight of size [64, 3, 7, 7], expected input ..."),
              ValueError("illegal value"), MemoryError()]

    class OutOfMemoryError(RuntimeError):
        pass

    benign.append(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert all(is_sticky_device_error(e) for e in sticky)
    assert not any(is_sticky_device_error(e) for e in benign)


def test_precision_bf16_runs_the_network_in_bf16_and_returns_fp32(resnet_weights, make_video):
    import numpy as np

    from video_features.utils.config import make_config
    from video_features.utils.runner import build_extractor

    resnet_weights("resnet18")
    video = make_video("prec.mp4", n_frames=4, fps=25.0, width=64, height=48)
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = make_config("resnet", video_paths=[str(video)], device="cpu", model_name="resnet18",
                          precision=precision)
        out[precision] = build_extractor(cfg, "cpu").extract(str(video))["resnet"]
    a, b = out["fp32"], out["bf16"]
    assert b.dtype == np.float32 and b.shape == a.shape
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert 1e-4 < rel < 5e-2  # bf16 (8-bit mantissa) really ran, and stayed close


def _fake_cuda(monkeypatch):
    """A CUDA-less torch that behaves as if one GPU were visible: set_device keeps torch's own
    argument check (a device without an index raises) and records what it selected."""
    from torch.cuda._utils import _get_device_index

    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda d: selected.append(_get_device_index(d, optional=False)))
    return selected


def test_prepare_device_takes_a_bare_cuda_as_the_first_visible_gpu(monkeypatch):
    from video_features.utils.device import prepare_device

    selected = _fake_cuda(monkeypatch)
    assert prepare_device("cuda", False) == torch.device("cuda", 0)
    assert prepare_device("cuda:0", False) == torch.device("cuda", 0)
    assert selected == [0, 0]


def test_to_host_async_on_the_cpu_is_the_tensor_itself():
    from video_features.utils.device import to_host_async

    t = torch.arange(6.0).view(2, 3)
    host, ready = to_host_async(t)
    ready()
    assert host is t


@pytest.mark.gpu
def test_to_host_async_copies_a_gpu_tensor_behind_queued_work():
    from video_features.utils.device import to_host_async

    t = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    host, ready = to_host_async(t * 2)
    ready()
    assert host.is_pinned() and torch.equal(host, (torch.arange(1 << 20) * 2).float())
