"""decoder=nvdec's use of the decoder library (tests/fake_nvdec stands in for PyNvVideoCodec):
capability queries, memory bounded by bytes, frame conversion and shapes, ending decoders,
frames copied out before the decoder reuses its surfaces."""
from __future__ import annotations

import queue
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch

CHUNK = 4


@pytest.fixture
def fake(monkeypatch):
    """The stand-in library, importable as PyNvVideoCodec, with fresh records and options."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fake_nvdec"))
    import PyNvVideoCodec as nvc

    from video_features.utils import nvdec

    monkeypatch.setattr(nvc, "calls", {"caps": [], "decoders": [], "ends": 0, "dlpack_tries": 0})
    monkeypatch.setattr(nvc, "options", {"stacked_planes": False, "dlpack": True, "device": "cpu"})
    monkeypatch.setattr(nvdec, "_CAPS", {}, raising=False)
    return nvc


@pytest.fixture(scope="module")
def clips(make_video):
    return [make_video(f"nv{i}.mp4", n_frames=11 + i, fps=25.0, width=64, height=48, seed=i)
            for i in range(3)]


def _pixels(path) -> np.ndarray:
    """(n, 3, H, W): every frame as PyAV gives it (the fake's pixels)."""
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    return frames.transpose(0, 3, 1, 2)


def _read_all(path, chunk=CHUNK) -> tuple[list, object]:
    from video_features.utils.nvdec import _Source

    src = _Source(str(path), torch.device("cpu"), {"rotation": "raw"}, chunk)
    parts = []
    while (part := src.read()) is not None:
        parts.append(part)
    return parts, src


def test_decoder_caps_asked_once_per_kind_of_stream_on_the_decoders_gpu(fake, clips, monkeypatch):
    from video_features.utils import nvdec

    for p in clips:
        _read_all(p)
    assert len(fake.calls["caps"]) == 1  # three videos of one kind: one query (one CUDA context)
    nvdec._open(str(clips[0]), 3, 8).end()
    assert [c[0] for c in fake.calls["caps"]] == [0, 3]  # another GPU: asked there
    assert fake.calls["decoders"][-1]["gpu_id"] == 3
    assert nvdec._gpu_index(torch.device("cuda", 2)) == 2
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert nvdec._gpu_index(torch.device("cuda")) == 1  # "cuda": the current GPU, not 0


def test_streams_outside_the_decoders_size_limits_are_refused_before_decoding(fake, clips,
                                                                             monkeypatch):
    from video_features.utils import nvdec

    nvdec._open(str(clips[0]), 0, 8).end()          # 64x48 within every limit
    within = dict(fake.LIMITS)
    for limits, said in [({"width_max": 32}, "at most 32x4096 pixels"),
                         ({"mb_num_max": 11}, "(11 macroblocks)"),   # 4 x 3 blocks of 16
                         ({"height_min": 64}, "at least 48x64 pixels")]:
        monkeypatch.setattr(fake, "LIMITS", {**within, **limits})
        monkeypatch.setattr(nvdec, "_CAPS", {})
        with pytest.raises(RuntimeError, match=rf"{re.escape(said)}.*the video is 64x48"):
            nvdec._open(str(clips[0]), 0, 8)
    assert not fake.calls["decoders"][1:]           # refused: no decoder was made for it


def test_frames_held_are_bounded_by_bytes(fake, clips, monkeypatch):
    from video_features.utils import nvdec

    plans = {size: nvdec.frame_plan(*size, 64) for size in [(640, 360), (1920, 1080), (3840, 2160)]}
    held = {size: nvdec.frames_held(*plan) for size, plan in plans.items()}
    assert held[(3840, 2160)] < held[(1920, 1080)] < held[(640, 360)]
    for (w, h), (chunk, buffer) in plans.items():
        assert 1 <= chunk <= buffer  # a batch always fits the decoder's buffer
        assert held[(w, h)] * 3 * w * h <= nvdec.SESSION_BYTES
    # the source decodes with its plan: chunks and the decoder's buffer shrink with the budget
    monkeypatch.setattr(nvdec, "SESSION_BYTES", 20 * 3 * 64 * 48)
    chunk, buffer = nvdec.frame_plan(64, 48, 32)
    assert chunk < 32
    parts, _ = _read_all(clips[0], 32)
    assert fake.calls["decoders"][-1]["buffer_size"] == buffer
    assert max(len(p) for p in parts) == chunk


def test_frames_convert_once_per_video_when_dlpack_fails(fake, clips):
    fake.options["dlpack"] = False
    parts, _ = _read_all(clips[1])
    np.testing.assert_array_equal(torch.cat(parts).numpy(), _pixels(clips[1]))
    assert 1 <= fake.calls["dlpack_tries"] <= 2  # one try (device query, export), not per frame


def test_decoder_ended_when_a_video_ends_or_fails(fake, clips, monkeypatch):
    from video_features.utils import nvdec

    _, src = _read_all(clips[0])
    assert fake.calls["ends"] == 1
    src.close()
    assert fake.calls["ends"] == 1  # once

    real = fake.ThreadedDecoder.get_batch_frames

    def failing(self, n):  # fails from the second batch on: after frames were sent
        self.batches = getattr(self, "batches", 0) + 1
        if self.batches > 1:
            raise RuntimeError("CUVID decode error")
        return real(self, n)

    monkeypatch.setattr(fake.ThreadedDecoder, "get_batch_frames", failing)
    pool = nvdec.NvdecPool(1, torch.device("cpu"), {"rotation": "raw"}, CHUNK, first_index=0)
    try:
        pool.assign(0, 0, str(clips[2]))
        kinds = []
        while not kinds or kinds[-1] != "done":
            msg = pool.out.get(timeout=20)
            kinds.append(msg[0])
            if msg[0] == "gpu_chunk":
                pool.decoders[0].free.put(msg[4])
    except queue.Empty:
        pytest.fail(f"no 'done' from the NVDEC thread: {kinds}")
    finally:
        pool.close()
    assert "error" in kinds and fake.calls["ends"] == 2


def test_planes_stacked_as_3h_by_w_are_reshaped(fake, clips):
    fake.options["stacked_planes"] = True
    parts, _ = _read_all(clips[2])
    frames = torch.cat(parts)
    assert frames.shape[1:] == (3, 48, 64)
    np.testing.assert_array_equal(frames.numpy(), _pixels(clips[2]))


def test_frames_handed_on_survive_the_decoder_reusing_its_surfaces(fake, clips):
    """The fake writes every batch into the same surfaces and scrambles them at end(): frames
    handed on must be copies the pipeline owns."""
    from video_features.utils.nvdec import _Source

    src = _Source(str(clips[1]), torch.device("cpu"), {"rotation": "raw", "extraction_fps": 10.0},
                  CHUNK)
    first = src.read()
    kept = first.clone()
    picked, _, _ = src.select(first)
    picked_before = picked.clone()
    src.read()  # the decoder overwrites the surfaces the first batch came from
    src.dec.end()  # and scrambles them
    assert torch.equal(first, kept) and torch.equal(picked, picked_before)
    np.testing.assert_array_equal(kept.numpy(), _pixels(clips[1])[:CHUNK])


def test_copy_out_of_the_surfaces_is_waited_for_before_they_can_be_reused(fake, clips,
                                                                           monkeypatch):
    """On CUDA the copy is queued on a stream: it must be complete (event waited for) before
    the decoder is asked for more frames or ended. CUDA streams and events are stood in for."""
    import contextlib

    from video_features.utils.nvdec import _Source

    log = []

    class Stream:
        def wait_stream(self, other):
            log.append("wait")

    class Event:
        def record(self, stream=None):
            log.append("record")

        def synchronize(self):
            log.append("sync")

    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    real_get, real_end = fake.ThreadedDecoder.get_batch_frames, fake.ThreadedDecoder.end
    monkeypatch.setattr(fake.ThreadedDecoder, "get_batch_frames",
                        lambda self, n: log.append("get") or real_get(self, n))
    monkeypatch.setattr(fake.ThreadedDecoder, "end",
                        lambda self: log.append("end") or real_end(self))
    src = _Source(str(clips[0]), torch.device("cpu"), {"rotation": "raw"}, CHUNK)
    src._copy = Stream()
    parts = []
    while (part := src.read()) is not None:
        parts.append(part)
    np.testing.assert_array_equal(torch.cat(parts).numpy(), _pixels(clips[0]))
    # each batch: asked for, copied (record), waited for (sync), before the next ask or end()
    batches = len(parts)
    assert log == ["get", "wait", "record", "sync"] * batches + ["get", "end"]


@pytest.mark.gpu
def test_frames_copied_on_the_gpu_through_the_copy_stream(fake, clips):
    """The CUDA path: surfaces in GPU memory, copied on the copy stream and waited for."""
    from video_features.utils.nvdec import _Source

    fake.options["device"] = "cuda"
    src = _Source(str(clips[0]), torch.device("cuda"), {"rotation": "raw"}, CHUNK)
    assert src._copy is not None
    parts = []
    while (part := src.read()) is not None:
        assert part.is_cuda
        parts.append(part.cpu())
    np.testing.assert_array_equal(torch.cat(parts).numpy(), _pixels(clips[0]))
    assert fake.calls["ends"] == 1
