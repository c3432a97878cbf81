"""The device pipeline: decoder processes, shared-memory slots, batches across videos.

Its outputs must equal the one-video ``extract`` path (itself checked against independent
computations in the per-model tests); failures stay with their video.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from video_features.utils.config import make_config
from video_features.utils.pipeline import SLOTS_PER_DECODER, Batcher, DevicePipeline, VideoWork, rows_of
from video_features.utils.runner import build_extractor


class Collect:
    """A writer that keeps what it is given."""

    def __init__(self):
        self.outputs: dict[str, dict] = {}

    def write(self, path, feats, info=None):
        self.outputs[path] = dict(feats)
        return []


@pytest.fixture(scope="module")
def videos(make_video):
    return [make_video("p1.mp4", n_frames=23, fps=25.0, width=64, height=48),
            make_video("p2.mp4", n_frames=9, fps=10.0, width=80, height=60),
            make_video("p3.mp4", n_frames=40, fps=29.97, width=48, height=64)]


def _run_pipeline(ex, paths, decoders=2):
    results, writer = [], Collect()
    pipe = DevicePipeline(ex, writer, decoders, results.append)
    try:
        with torch.inference_mode():
            pipe.run([str(p) for p in paths])
    finally:
        pipe.close()
    return {r.path: r for r in results}, writer.outputs


@pytest.mark.parametrize("ft,options", [
    ("resnet", dict(model_name="resnet18", batch_size=8)),
    ("resnet", dict(model_name="resnet18", batch_size=5, extraction_fps=7.0)),
    ("resnet", dict(model_name="resnet18", batch_size=4, extraction_total=9)),
    ("r21d", dict(stack_size=4, step_size=3, tail="pad", batch_size=3)),
    ("i3d", dict(stack_size=4, step_size=3, tail="pad", batch_size=2, flow_batch_size=3,
                 allow_random_weights=True)),
])
def test_pipeline_equals_one_video_extraction(videos, resnet_weights, hub_checkpoints, ft, options):
    if ft == "resnet":
        resnet_weights("resnet18")
    elif ft == "r21d":
        from video_features.models.r21d.weights import CARD, write_random_checkpoint

        write_random_checkpoint(hub_checkpoints / CARD.filename)
    cfg = make_config(ft, video_paths=[str(v) for v in videos], device="cpu", **options)
    ex = build_extractor(cfg, "cpu")
    results, outputs = _run_pipeline(ex, videos)
    assert {r.status for r in results.values()} == {"done"}
    for v in videos:
        ref = ex.extract(str(v))
        got = outputs[str(v)]
        assert set(got) == set(ref)
        for key in ref:
            assert got[key].shape == ref[key].shape, key
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-5 * np.abs(ref[key]).max())
        if ft == "resnet":
            assert results[str(v)].frames == len(ref["timestamps_ms"])
            if options.get("extraction_total"):
                assert len(ref["resnet"]) == options["extraction_total"]


def test_bad_videos_fail_alone(videos, resnet_weights, tmp_path):
    resnet_weights("resnet18")
    text = tmp_path / "text.mp4"
    text.write_text("not a video\n" * 20)
    cut = tmp_path / "cut.mp4"
    data = videos[2].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    paths = [videos[0], text, tmp_path / "missing.mp4", cut, videos[1]]
    cfg = make_config("resnet", video_paths=[str(p) for p in paths], device="cpu",
                      model_name="resnet18", batch_size=8)
    results, outputs = _run_pipeline(build_extractor(cfg, "cpu"), paths)
    status = {p: results[str(p)].status for p in paths}
    assert status == {videos[0]: "done", text: "failed", tmp_path / "missing.mp4": "failed",
                      cut: "failed", videos[1]: "done"}
    assert "not a readable video" in results[str(text)].reason
    assert "file not found" in results[str(tmp_path / "missing.mp4")].reason
    assert set(outputs) == {str(videos[0]), str(videos[1])}


def test_a_dead_decoder_costs_only_its_video(make_video, videos, resnet_weights):
    resnet_weights("resnet18")
    long = make_video("long_p.mp4", n_frames=400, fps=25.0, width=64, height=48)
    cfg = make_config("resnet", video_paths=[str(long)], device="cpu", model_name="resnet18",
                      batch_size=8)
    results, writer = [], Collect()
    pipe = DevicePipeline(build_extractor(cfg, "cpu"), writer, 2, results.append)
    try:
        with torch.inference_mode():
            pipe.submit(str(long))  # assigns it to a decoder at once
            victim = next(d for d in pipe.pool.decoders if d.vid is not None)
            # Without step() no slot comes back, so the decoder stops after 3 chunks of the 400
            # frames: it is killed mid-video, whatever the machine's speed.
            deadline = time.time() + 60
            while time.time() < deadline and not pipe._queued():
                time.sleep(0.01)
            assert pipe._queued(), "the decoder sent nothing in 60 s"
            victim.proc.kill()
            victim.proc.join()
            for v in videos:
                pipe.submit(str(v))
            deadline = time.time() + 120
            while pipe.busy and time.time() < deadline:
                pipe.step()
    finally:
        pipe.close()
    by_path = {r.path: r for r in results}
    assert len(results) == 4
    assert by_path[str(long)].status == "failed"
    assert "decoder process died" in by_path[str(long)].reason
    assert all(by_path[str(v)].status == "done" for v in videos)


def test_batches_mix_videos_and_rows_go_back_in_order():
    calls = []

    def forward(key, batch):
        calls.append(batch.shape[0])
        return batch.sum(dim=1)  # one number per item: its own id

    b = Batcher(forward, batch_size=4)
    v1, v2 = VideoWork(1, "a"), VideoWork(2, "b")
    b.add(v1, "k", torch.tensor([[10.0], [11.0], [12.0]]), np.array([0.0, 1.0, 2.0]))
    b.add(v2, "k", torch.tensor([[20.0], [21.0]]), np.array([5.0, 6.0]))
    assert b.run(full_only=True) == 1 and calls == [4]  # three of v1 and one of v2 together
    assert v1.pending == 0 and v2.pending == 1
    b.run(full_only=False)
    assert calls == [4, 1]
    rows1, stamps1 = rows_of(v1, "k")
    rows2, stamps2 = rows_of(v2, "k")
    assert rows1.tolist() == [10.0, 11.0, 12.0] and stamps1.tolist() == [0.0, 1.0, 2.0]
    assert rows2.tolist() == [20.0, 21.0] and stamps2.tolist() == [5.0, 6.0] and v2.pending == 0


def test_batches_hold_one_item_shape_and_keep_each_videos_order():
    """Items of another shape (a video of another size) wait for a batch of their own; per-key
    batch sizes; rows a network's ``keep`` turns into items of a second network are run too."""
    calls = []

    def forward(key, batch):
        calls.append((key, tuple(batch.shape)))
        return batch.flatten(1).sum(dim=1)

    def keep(work, key, rows, stamps):
        if key == "first":   # feeds "second" with one item per row
            return [("second", rows[:, None], stamps)]
        work.rows[key].append(rows)
        work.stamps[key].append(stamps)

    b = Batcher(forward, lambda key: {"first": 3, "second": 2}[key], keep)
    small, big = VideoWork(1, "s"), VideoWork(2, "b")
    b.add(small, "first", torch.ones(2, 2), np.array([0.0, 1.0]))
    b.add(big, "first", torch.ones(2, 5), np.array([0.0, 1.0]))
    b.add(small, "first", torch.full((2, 2), 2.0), np.array([2.0, 3.0]))
    b.run(full_only=False)
    firsts = [shape for key, shape in calls if key == "first"]
    assert firsts == [(3, 2), (2, 5), (1, 2)]   # never mixed; small's blocks in order
    assert all(shape[0] <= 2 for key, shape in calls if key == "second")
    rows_s, ts_s = rows_of(small, "second")
    rows_b, _ = rows_of(big, "second")
    assert rows_s.tolist() == [2.0, 2.0, 4.0, 4.0] and ts_s.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert rows_b.tolist() == [5.0, 5.0] and small.pending == big.pending == 0


def test_i3d_flow_pairs_are_batched_across_chunks_and_videos(videos, make_video, monkeypatch):
    """Flow runs on batches of flow_batch_size pairs gathered from several chunks and videos
    (not once per decoded chunk), and the outputs equal the one-video path."""
    other = make_video("p4.mp4", n_frames=20, fps=25.0, width=64, height=48, seed=4)
    paths = [videos[0], other]   # one frame size: one pair shape after resizing
    # TV-L1 at one short warp (each pair solved as if alone): the batching, without PWC-Net's
    # minutes on the CPU (test_pipeline_equals_one_video_extraction runs PWC-Net here)
    cfg = make_config("i3d", video_paths=[str(p) for p in paths], device="cpu", stack_size=4,
                      step_size=4, batch_size=2, flow_batch_size=24, allow_random_weights=True,
                      flow_type="tvl1", tvl1_warps=1, tvl1_outer_iterations=1)
    ex = build_extractor(cfg, "cpu")
    sizes = []
    real = ex._flow

    def flow(a, b):
        sizes.append(len(a))
        return real(a, b)
    monkeypatch.setattr(ex, "_flow", flow)
    results, outputs = _run_pipeline(ex, paths)
    assert all(r.status == "done" for r in results.values())
    # every pair once (stacks use every element); each video has fewer than 24 pairs, so a
    # batch of 24 holds pairs of both videos and of several chunks
    assert sum(sizes) == (23 - 1) + (20 - 1) and 24 in sizes and ex.chunk_frames() < 24
    for p in paths:
        single = build_extractor(cfg, "cpu").extract(str(p))
        for key in ("rgb", "flow", "timestamps_ms"):
            np.testing.assert_allclose(outputs[str(p)][key], single[key], rtol=1e-4, atol=1e-4)


def test_shared_memory_is_fixed_and_released(videos, resnet_weights):
    import os

    resnet_weights("resnet18")
    cfg = make_config("resnet", video_paths=[str(videos[0])], device="cpu", model_name="resnet18")
    pipe = DevicePipeline(build_extractor(cfg, "cpu"), Collect(), 3, lambda r: None)
    names = [s.name for d in pipe.pool.decoders for s in d.shms]
    assert len(names) == 3 * SLOTS_PER_DECODER
    assert all(os.path.exists(f"/dev/shm/{n}") for n in names) or not os.path.isdir("/dev/shm")
    pipe.close()
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)


def test_too_little_shared_memory_is_a_clear_error_before_anything_starts(monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    from video_features.utils.errors import FeatureError
    from video_features.utils.pipeline import SLOT_BYTES, DecoderPool

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(64 << 20, 0, 64 << 20))
    monkeypatch.setattr("os.path.isdir", lambda p: True)
    needs = {"extraction_fps": None, "frames_fps": 25.0, "timestamps": "pts"}
    with pytest.raises(FeatureError, match=r"has 64 MB free.*decoders=N.*--shm-size"):
        DecoderPool(4, needs, 8)
    assert 4 * SLOTS_PER_DECODER * SLOT_BYTES > 64 << 20


def test_vggish_on_the_pipeline_equals_one_input_extraction(tmp_path):
    """Audio decoded in the decoder processes and batched across inputs gives the one-input
    result; an input without audio fails alone, with its reason."""
    from video_features.models.vggish.weights import write_random_checkpoint
    from tests.test_audio import tone, write_media, write_wav

    t = np.arange(int(44100 * 4.1)) / 44100
    stereo = np.stack([0.5 * np.sin(2 * np.pi * (200 * t + 700 * t ** 2)),
                       0.3 * np.sin(2 * np.pi * 440 * t)]).astype(np.float32)
    inputs = [write_media(tmp_path / "a.mp4", stereo, 44100, "aac", video_frames=20),
              write_wav(tmp_path / "b.wav", tone(16000, 2.5, 700.0), 16000),
              write_media(tmp_path / "mute.mp4", None, 0, video_frames=10)]
    ckpt = write_random_checkpoint(tmp_path / "vggish.pth", seed=3)
    cfg = make_config("vggish", video_paths=[str(p) for p in inputs], device="cpu",
                      checkpoint_path=str(ckpt), batch_size=3)
    ex = build_extractor(cfg, "cpu")
    results, outputs = _run_pipeline(ex, inputs)
    assert results[str(inputs[2])].status == "failed"
    assert "no audio track" in results[str(inputs[2])].reason
    for p in inputs[:2]:
        assert results[str(p)].status == "done"
        ref = ex.extract(str(p))["vggish"]
        assert outputs[str(p)]["vggish"].shape == ref.shape == (ref.shape[0], 128)
        np.testing.assert_allclose(outputs[str(p)]["vggish"], ref, rtol=1e-5, atol=1e-6)
        assert results[str(p)].frames == ref.shape[0]  # progress counts its 0.96 s examples
    assert outputs[str(inputs[0])]["vggish"].shape[0] == 4


def test_null_rows_are_sampled_channel_means(videos):
    """The null feature type: one row per frame, the mean R, G, B of every 8th pixel of every
    8th row, computed here from a plain decode."""
    from video_features.utils.video import open_frames

    cfg = make_config("null", video_paths=[str(videos[2])], device="cpu", batch_size=7)
    results, outputs = _run_pipeline(build_extractor(cfg, "cpu"), videos[2:])
    with open_frames(str(videos[2])) as src:
        frames = np.concatenate([c.frames for c in src.chunks(16)])
    want = frames[:, ::8, ::8].reshape(len(frames), -1, 3).mean(axis=1)
    np.testing.assert_allclose(outputs[str(videos[2])]["null"], want, rtol=1e-5)


@pytest.mark.parametrize("options", [dict(), dict(extraction_fps=7.0), dict(extraction_total=5)])
def test_nvdec_path_and_its_fallback_to_the_cpu(videos, resnet_weights, tmp_path, monkeypatch,
                                                caplog, options):
    """decoder=nvdec through a stand-in decoder with PyNvVideoCodec's interface (PyAV pixels,
    tests/fake_nvdec): the same outputs as the CPU path, frames picked by the same rule; a
    video it cannot open is decoded by the CPU decoders, with one log line."""
    import shutil

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fake_nvdec"))
    from video_features.utils.nvdec import unavailable

    assert unavailable() is None
    resnet_weights("resnet18")
    odd = tmp_path / "unsupported.mp4"
    shutil.copy(videos[1], odd)
    paths = [*videos, odd]
    cfg = make_config("resnet", video_paths=[str(p) for p in paths], device="cpu",
                      model_name="resnet18", batch_size=4, **options)
    ex = build_extractor(cfg.replace(decoder="nvdec"), "cpu")
    with caplog.at_level("INFO"):
        results, outputs = _run_pipeline(ex, paths)
    assert {r.status for r in results.values()} == {"done"}
    fallbacks = [r.message for r in caplog.records if "cannot decode" in r.message]
    assert len(fallbacks) == 1 and "unsupported.mp4" in fallbacks[0]
    for p in paths:
        ref = ex.extract(str(p))
        for key in ref:
            np.testing.assert_allclose(outputs[str(p)][key], ref[key], rtol=1e-5, atol=1e-5)


def test_nvdec_needs_a_gpu_and_the_library(videos, monkeypatch):
    import builtins

    from video_features.utils.errors import ConfigError
    from video_features.utils.nvdec import unavailable

    with pytest.raises(ConfigError, match="decoder=nvdec decodes on a GPU"):
        make_config("resnet", video_paths=[str(videos[0])], device="cpu", decoder="nvdec")
    real = builtins.__import__

    def no_library(name, *a, **k):
        if name == "PyNvVideoCodec":
            raise ImportError("No module named 'PyNvVideoCodec'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_library)
    assert "pip install pynvvideocodec" in unavailable()


class _FakeCudart:
    """The two CUDA runtime calls that page-lock host memory; ``refuse`` fails the n-th one."""

    def __init__(self, refuse: int | None = None):
        self.locked, self.calls, self.refuse = set(), 0, refuse

    def cudaHostRegister(self, ptr, size, flags):
        self.calls += 1
        if self.calls == self.refuse:
            return 1
        self.locked.add(ptr)
        return 0

    def cudaHostUnregister(self, ptr):
        self.locked.remove(ptr)
        return 0


class _FakeEvent:
    """A copy that completes after two polls (or when waited for)."""

    def __init__(self):
        self.polls = 2

    def query(self):
        self.polls -= 1
        return self.polls <= 0

    def synchronize(self):
        self.polls = 0


@pytest.mark.parametrize("refuse", [None, 3])
def test_chunks_copy_from_page_locked_slots_released_after_their_copy(
        videos, resnet_weights, monkeypatch, refuse):
    """On a GPU the decoders' slots are page-locked once, chunks are copied straight from them
    (no pinned copy on the device thread), and a slot goes back to its decoder only once its
    copy's event says done; a refused page-lock leaves nothing locked and uses pinned copies."""
    import video_features.utils.pipeline as pipeline

    resnet_weights("resnet18")
    cudart = _FakeCudart(refuse)
    monkeypatch.setattr(pipeline, "_lock_for_device",
                        lambda pool, device: cudart if pool.lock_slots(cudart) else None)
    events = []

    def copy_event(self):
        events.append(_FakeEvent())
        return events[-1]
    monkeypatch.setattr(DevicePipeline, "_copy_event", copy_event)
    cfg = make_config("resnet", video_paths=[str(v) for v in videos], device="cpu",
                      model_name="resnet18", batch_size=8)
    ex = build_extractor(cfg, "cpu")
    pinned_flags = []
    real_to_device = ex.to_device_frames

    def to_device(frames, pinned=False):
        pinned_flags.append(pinned)
        return real_to_device(frames, pinned)
    ex.to_device_frames = to_device
    results, writer = [], Collect()
    pipe = DevicePipeline(ex, writer, 2, results.append)
    slots = 2 * SLOTS_PER_DECODER
    assert len(cudart.locked) == (slots if refuse is None else 0)
    early, copy_of = [], {}   # slots given back while their copy was still running
    real_release = pipe.pool.release

    def release(d, slot, event=None):
        copy_of[id(d), slot] = event
        real_release(d, slot, event)
    pipe.pool.release = release
    for d in pipe.pool.decoders:
        real_put = d.free.put

        def put(slot, d=d, real_put=real_put):
            event = copy_of.pop((id(d), slot), None)
            if event is not None and event.polls > 0:
                early.append(slot)
            real_put(slot)
        d.free.put = put
    try:
        with torch.inference_mode():
            pipe.run([str(v) for v in videos])
    finally:
        pipe.close()
    assert {r.status for r in results} == {"done"}
    assert pinned_flags and set(pinned_flags) == {refuse is None}
    assert len(events) == (len(pinned_flags) if refuse is None else 0)
    assert not early and not pipe.pool.copying     # every slot back, none before its copy
    assert not cudart.locked                         # unlocked at close
    for v in videos:
        np.testing.assert_allclose(writer.outputs[str(v)]["resnet"], ex.extract(str(v))["resnet"],
                                   rtol=1e-5, atol=1e-5)


def test_videos_are_finished_off_the_device_loop(videos, resnet_weights):
    """``finish`` (rows copied off the device: a wait on a GPU) runs on the writer thread, so
    the device loop keeps queueing work; its errors still end as the input's result, and an
    error that is not the input's (a device error) fails what is in flight, as from a batch."""
    import threading

    from video_features.utils.errors import VideoError

    resnet_weights("resnet18")
    cfg = make_config("resnet", video_paths=[str(v) for v in videos], device="cpu",
                      model_name="resnet18", batch_size=8)
    ex = build_extractor(cfg, "cpu")
    real_finish, threads = ex.finish, set()

    def finish(work):
        threads.add(threading.get_ident())
        if work.path == str(videos[1]):
            raise VideoError("no rows worth keeping")
        return real_finish(work)
    ex.finish = finish
    results, outputs = _run_pipeline(ex, videos)
    assert threading.get_ident() not in threads and len(threads) == 1
    assert results[str(videos[1])].status == "failed"
    assert results[str(videos[1])].reason == "no rows worth keeping"
    assert {results[str(v)].status for v in (videos[0], videos[2])} == {"done"}
    assert set(outputs) == {str(videos[0]), str(videos[2])}

    def broken(work):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    ex.finish = broken
    results, outputs = _run_pipeline(ex, videos[:2])
    assert {r.status for r in results.values()} == {"failed"} and len(results) == 2
    assert all("illegal memory access" in r.reason for r in results.values())
    assert all(r.device_broken for r in results.values())   # the process's CUDA context is gone
