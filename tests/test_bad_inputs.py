"""Bad and unusual inputs: each one either works or fails alone with a one-line reason, and the
rest of the run is unaffected. Every input is generated here (PyAV).

Covered elsewhere, not repeated: missing path, zero-byte file, text named .mp4 and cut mp4 files
(tests/test_video.py: test_bad_inputs_give_one_line_reasons, test_truncated_stream_with_index_up_front,
test_plain_mp4_cut_fails_to_open; tests/test_output_runner.py: test_main_job_two_workers_bad_inputs_and_rerun),
no audio track (tests/test_vggish.py, tests/test_pipeline.py, tests/test_multi.py), shorter than
one stack (tests/test_i3d_extractor.py, tests/test_r21d.py; in a run: tests/test_s3d.py,
tests/test_tv_video.py, tests/test_videomae.py), variable-frame-rate decoding (tests/test_video.py).
"""
from __future__ import annotations

import logging
import re
import shutil
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from sample.make_samples import synth_frame
from tests.conftest import run_main
from video_features.utils.config import make_config, value_options
from video_features.utils.errors import ConfigError, VideoError
from video_features.utils.video import CHUNK_BYTES, open_frames

FPS = 25


# -- writing inputs -------------------------------------------------------------------------------
def encode(path: Path, frames: list[np.ndarray], codec: str = "libx264", pix_fmt: str = "yuv420p",
           fps: float = FPS, options: dict | None = None) -> Path:
    """RGB frames -> a video file (no audio); the container follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        vs = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        vs.width, vs.height, vs.pix_fmt = w, h, pix_fmt
        vs.options = dict(options or {})
        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            for pkt in vs.encode(frame.reformat(format=pix_fmt)):
                out.mux(pkt)
        for pkt in vs.encode():
            out.mux(pkt)
    return path


def clip(n: int, w: int = 32, h: int = 24, seed: int = 0) -> list[np.ndarray]:
    return [synth_frame(i, w, h, FPS, seed) for i in range(n)]


def plain(w: int, h: int, n: int) -> list[np.ndarray]:
    """Large frames that cost nothing to make: flat colour with a moving bright band."""
    out = []
    for i in range(n):
        img = np.full((h, w, 3), (40, 90, 160), np.uint8)
        img[(i * 97) % h: (i * 97) % h + h // 8] = (230, 230, 20)
        out.append(img)
    return out


def set_track_matrix(path: Path, a: int, b: int, c: int, d: int) -> None:
    """Write the display matrix ``[a b 0; c d 0; 0 0 1]`` into the mp4's only track header
    (``tkhd``), as cameras do: a phone's portrait video is landscape frames with
    ``(0, 1, -1, 0)``. Writing the box directly does not depend on the PyAV version."""
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    assert at > 0 and data.find(b"tkhd", at + 4) < 0, "expected one track"
    version = data[at + 4]
    # version/flags, times, track id, reserved, duration, reserved(8), layer/group/volume/reserved
    offset = at + 4 + 4 + (32 if version == 1 else 20) + 8 + 8
    fixed = [v << 16 for v in (a, b)] + [0] + [v << 16 for v in (c, d)] + [0, 0, 0, 1 << 30]
    data[offset:offset + 36] = struct.pack(">9i", *fixed)
    path.write_bytes(bytes(data))


def decode(path: Path, chunk: int = 8, **kw) -> tuple[np.ndarray, np.ndarray]:
    with open_frames(str(path), **kw) as src:
        chunks = list(src.chunks(chunk))
    return np.concatenate([c.frames for c in chunks]), np.concatenate([c.timestamps_ms for c in chunks])


def null_rows(frames: np.ndarray) -> np.ndarray:
    """What the null feature type computes: mean R, G, B of every 8th pixel of every 8th row."""
    return frames[:, ::8, ::8].reshape(len(frames), -1, 3).mean(axis=1)


def run(tmp_path: Path, paths: list, feature_type: str = "null", **options):
    """One run saving .npy files under tmp_path/out; results by file name and the output folder."""
    from video_features.utils.runner import run as run_all

    cfg = make_config(feature_type, video_paths=[str(p) for p in paths], device="cpu",
                      on_extraction="save_numpy", output_path=str(tmp_path / "out"),
                      input_root=str(tmp_path), progress=False, **options)
    summary = run_all(cfg)
    assert len(summary.results) == len(set(cfg.video_paths))  # every input ends with one result
    return {Path(r.path).name: r for r in summary.results}, tmp_path / "out" / feature_type


def one_line(reason: str) -> bool:
    return bool(reason) and "\n" not in reason and len(reason) < 300


def has_encoder(name: str) -> bool:
    return name in av.codecs_available


# -- inputs that fail, in one run -----------------------------------------------------------------
def _cut_webm(tmp_path: Path) -> Path:
    """A WebM download cut halfway: Matroska keeps its cues at the end, so nothing is missing
    from an index when the file is opened; only the track's declared length tells."""
    whole = encode(tmp_path / "src" / "whole.webm", clip(40), "libvpx-vp9")
    cut = tmp_path / "cut.webm"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return cut


def _mixed_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    for i, (w, h) in enumerate([(32, 24), (32, 24), (30, 20), (32, 24)]):
        Image.fromarray(synth_frame(i, w, h, FPS)).save(path / f"{i:03d}.png")
    return path


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        s = out.add_stream("aac", rate=16000)
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        fr.sample_rate = 16000
        for pkt in s.encode(fr):
            out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return path


def _all_packets_garbage(tmp_path: Path) -> Path:
    """A well-formed mp4 whose every video packet holds random bytes."""
    src = encode(tmp_path / "src" / "g.mp4", clip(8))
    data = bytearray(src.read_bytes())
    with av.open(str(src)) as c:
        spans = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    rng = np.random.default_rng(1)
    for pos, size in spans:
        data[pos:pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    out = tmp_path / "garbage.mp4"
    out.write_bytes(bytes(data))
    return out


def test_bad_inputs_fail_alone_with_one_line_reasons(tmp_path):
    """The command line with one decoder for everything: inputs that fail part-way through a
    chunk hand its transfer slot back, so a fourth and fifth such failure do not leave the decoder
    waiting forever for a slot (it holds three), and the good input after them is still done."""
    no_frames = tmp_path / "no_frames"
    no_frames.mkdir()
    (no_frames / "notes.txt").write_text("not a frame")
    (no_frames / "sub").mkdir()
    mixed = [_mixed_folder(tmp_path / f"mixed{k}") for k in range(4)]
    good = encode(tmp_path / "good.mp4", clip(9))
    bad = {
        "no_frames": (no_frames, r"^folder .*no_frames holds no image files \(.*\.jpg.*\.png"),
        **{m.name: (m, r"^frame image 002\.png is 30x20, the images before it 32x24: every "
                       r"image of a frame folder must have the same size$") for m in mixed},
        "audio.m4a": (_audio_only(tmp_path / "audio.m4a"),
                      r"^no video stream in file \(only audio: the audio feature types, vggish and "
                      r"clap, read it\)$"),
        "cut.webm": (_cut_webm(tmp_path), r"^truncated video: the stream ends at 0\.\d+ s of the "
                                          r"1\.60 s its container declares$"),
        "garbage.mp4": (_all_packets_garbage(tmp_path),
                        r"^no decodable video frames \(\d+ packet\(s\) rejected by the decoder"),
    }
    later = encode(tmp_path / "later.mp4", clip(5, seed=2))
    out = tmp_path / "out"
    res = run_main("--feature_type", "null", "--device", "cpu", "--on_extraction", "save_numpy",
                   "--output_path", str(out), f"input_root={tmp_path}", "decoders=1",
                   "--video_paths", str(good), *(str(p) for p, _ in bad.values()), str(later),
                   cwd=tmp_path, timeout=240)
    assert res.returncode == 1, res.stderr
    assert f"done 2, skipped 0 (already extracted), failed {len(bad)}" in res.stderr
    failed = {}
    for line in res.stderr.splitlines():
        if line.startswith("  FAILED "):
            path, _, reason = line[len("  FAILED "):].partition(": ")
            failed[Path(path).name] = reason
    assert set(failed) == set(bad), res.stderr
    for name, (_, pattern) in bad.items():
        assert one_line(failed[name]) and re.search(pattern, failed[name]), (name, failed[name])
    for video, n in ((good, 9), (later, 5)):
        rows = np.load(out / "null" / f"{video.stem}_null.npy")
        assert rows.shape == (n, 3)
        np.testing.assert_allclose(rows, null_rows(decode(video)[0]), rtol=1e-5)


# -- damaged bytes inside a stream ----------------------------------------------------------------
def test_damaged_packets_mid_stream_are_skipped_and_the_rest_decodes(tmp_path, caplog):
    """Zeroed bytes in the middle of an H.264 stream: the decoder rejects that packet; it is
    skipped with one warning, the frames around it decode, and rows keep their own times (a gap,
    no shift). The run writes the frames that decoded."""
    src = encode(tmp_path / "src" / "clean.mp4", clip(40, 64, 48))
    clean, clean_ts = decode(src)
    with av.open(str(src)) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    pos, size = packets[20]
    data = bytearray(src.read_bytes())
    data[pos:pos + size] = bytes(size)
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="video_features.utils.video"):
        frames, ts = decode(damaged)
    warnings = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(warnings) == 1 and "damaged.mp4: skipped " in warnings[0], warnings
    assert "after frame" in warnings[0] and "\n" not in warnings[0]
    assert 20 < len(frames) < 40                 # decoding went on after the damage
    np.testing.assert_array_equal(frames[:10], clean[:10])
    assert np.isin(ts, clean_ts).all() and (np.diff(ts) > 0).all()  # true times: a gap, no shift
    assert len(np.setdiff1d(clean_ts, ts)) == 40 - len(frames)

    results, out = run(tmp_path, [damaged])
    assert results["damaged.mp4"].status == "done"
    np.testing.assert_allclose(np.load(out / "damaged_null.npy"), null_rows(frames), rtol=1e-5)
    np.testing.assert_allclose(np.load(out / "damaged_timestamps_ms.npy")[:, 0], ts)


class _ReadStops:
    """A container whose demuxer fails after ``after`` packets, as a file whose data cannot be
    read on (an I/O error, a broken container structure)."""

    def __init__(self, container, after: int):
        self._c, self._after = container, after

    def demux(self, *args):
        for k, packet in enumerate(self._c.demux(*args)):
            if k == self._after:
                raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
            yield packet

    def __getattr__(self, name):
        return getattr(self._c, name)


def test_a_container_that_cannot_be_read_on_fails_naming_the_frame(tmp_path):
    """Unlike a damaged packet, the rest of the video is then lost: the input fails with the
    frame and time where it stops, rather than giving features of a part of it."""
    path = encode(tmp_path / "v.mp4", clip(20))
    with open_frames(str(path)) as src:
        src._container = _ReadStops(src._container, after=10)
        with pytest.raises(VideoError) as ei:
            list(src.chunks(4))
    assert re.fullmatch(r"corrupt or truncated video: the file cannot be read past frame \d+ "
                        r"\(0\.\d\d s\) \(.*Invalid data found when processing input\)", str(ei.value))
    with open_frames(str(path)) as src:
        src._container = _ReadStops(src._container, after=0)
        with pytest.raises(VideoError, match=r"^no decodable video frames \(.*Invalid data"):
            list(src.chunks(4))


# -- rotation -------------------------------------------------------------------------------------
def _by_matrix(raw: np.ndarray, a: int, b: int, c: int, d: int) -> np.ndarray:
    """Independent of the decoder's rule: FFmpeg's definition of the display matrix, source pixel
    (p, q) shown at (a p + c q, b p + d q), moved back into the picture."""
    h, w = raw.shape[:2]
    q, p = np.mgrid[0:h, 0:w]
    x, y = a * p + c * q, b * p + d * q
    x, y = x - x.min(), y - y.min()
    out = np.zeros((y.max() + 1, x.max() + 1, 3), raw.dtype)
    out[y, x] = raw[q, p]
    return out


LOSSLESS = {"qp": "0", "preset": "veryfast"}


@pytest.mark.parametrize("matrix", [
    (0, 1, -1, 0),    # a phone held upright: landscape frames turned a quarter clockwise
    (0, -1, 1, 0),    # the other way
    (-1, 0, 0, -1),   # upside down
    (-1, 0, 0, 1),    # mirrored
    (0, 1, 1, 0),     # a quarter turn and a mirror (transposed)
])
def test_display_matrix_turns_frames_upright_and_raw_keeps_them(tmp_path, matrix):
    path = encode(tmp_path / "rot.mp4", clip(3, 32, 24), pix_fmt="yuv444p", options=LOSSLESS)
    set_track_matrix(path, *matrix)
    raw, raw_ts = decode(path, rotation="raw")
    assert raw.shape == (3, 24, 32, 3)
    shown, ts = decode(path)
    want = np.stack([_by_matrix(f, *matrix) for f in raw])
    assert shown.shape == want.shape and shown.flags.c_contiguous
    np.testing.assert_array_equal(shown, want)
    np.testing.assert_array_equal(ts, raw_ts)


def test_phone_portrait_video_comes_out_as_players_show_it(tmp_path):
    """Known upright picture (portrait, a red corner top left), stored as a phone stores it."""
    upright = [synth_frame(i, 24, 32, FPS) for i in range(3)]
    for img in upright:
        img[:6, :6] = (255, 0, 0)
    stored = [np.ascontiguousarray(np.rot90(img, 1)) for img in upright]  # landscape, as recorded
    path = encode(tmp_path / "phone.mp4", stored, pix_fmt="yuv444p", options=LOSSLESS)
    set_track_matrix(path, 0, 1, -1, 0)
    shown, _ = decode(path)
    assert shown.shape == (3, 32, 24, 3)
    assert np.abs(shown.astype(int) - np.stack(upright)).max() <= 3   # yuv444p round trip
    assert (shown[:, :4, :4, 0] > 240).all() and (shown[:, :4, :4, 1:] < 15).all()
    raw, _ = decode(path, rotation="raw")
    assert np.abs(raw.astype(int) - np.stack(stored)).max() <= 3


def test_exif_orientation_of_frame_images(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    stored = clip(3, 32, 24)
    for i, img in enumerate(stored):
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 clockwise to show"
        Image.fromarray(img).save(folder / f"{i}.png", exif=exif)
    shown, _ = decode(folder)
    np.testing.assert_array_equal(shown, np.stack([np.rot90(f, -1) for f in stored]))
    np.testing.assert_array_equal(decode(folder, rotation="raw")[0], np.stack(stored))


def test_rotation_option_end_to_end(tmp_path, resnet_weights):
    """Through a run: null rows and ResNet features of a rotated video equal those of its upright
    frames saved as images; rotation=raw gives the stored ones; the option is in the record."""
    resnet_weights("resnet18")
    path = encode(tmp_path / "rot.mp4", clip(4, 32, 24), pix_fmt="yuv444p", options=LOSSLESS)
    set_track_matrix(path, 0, 1, -1, 0)
    shown, _ = decode(path)
    folder = tmp_path / "upright"
    folder.mkdir()
    for i, img in enumerate(shown):
        Image.fromarray(img).save(folder / f"{i:02d}.png")

    results, out = run(tmp_path, [path, folder], "resnet", model_name="resnet18", batch_size=4)
    assert {r.status for r in results.values()} == {"done"}
    np.testing.assert_allclose(np.load(out / "rot_resnet.npy"), np.load(out / "upright_resnet.npy"),
                               rtol=1e-5, atol=1e-5)
    cfg = make_config("null", video_paths=[str(path)], device="cpu")
    assert cfg.rotation == "auto" and value_options(cfg)["rotation"] == "auto"
    for mode, frames in (("auto", shown), ("raw", decode(path, rotation="raw")[0])):
        sub = tmp_path / mode
        sub.mkdir()
        results, out = run(sub, [shutil.copy(path, sub / "rot.mp4")], rotation=mode)
        assert results["rot.mp4"].status == "done"
        np.testing.assert_allclose(np.load(out / "rot_null.npy"), null_rows(frames), rtol=1e-5)
        assert f'"rotation": "{mode}"' in (out / "rot_meta.json").read_text()


def test_rotation_option_is_checked_and_run_wide():
    with pytest.raises(ConfigError, match="option rotation: 'sideways' is not one of auto, raw"):
        make_config("null", video_paths=["a.mp4"], device="cpu", rotation="sideways")
    from video_features.utils.config import parse_configs

    with pytest.raises(ConfigError, match="resnet.rotation: rotation is an option of the whole run"):
        parse_configs(["--feature_type", "resnet", "null", "--device", "cpu", "--video_paths",
                       "a.mp4", "resnet.rotation=raw"])


@pytest.mark.parametrize("rotation", ["auto", "raw"])
def test_nvdec_turns_frames_as_the_cpu_decoder(tmp_path, monkeypatch, rotation):
    """decoder=nvdec (a stand-in with PyNvVideoCodec's interface, handing out frames as stored,
    as NVDEC does) turns a rotated video upright on the device by the same rule."""
    from tests.test_pipeline import _run_pipeline
    from video_features.utils.runner import build_extractor

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fake_nvdec"))
    path = encode(tmp_path / "rot.mp4", clip(5, 32, 24), pix_fmt="yuv444p", options=LOSSLESS)
    set_track_matrix(path, 0, 1, -1, 0)
    cfg = make_config("null", video_paths=[str(path)], device="cpu", rotation=rotation)
    ex = build_extractor(cfg.replace(decoder="nvdec"), "cpu")
    results, outputs = _run_pipeline(ex, [path])
    assert results[str(path)].status == "done"
    want = null_rows(decode(path, rotation=rotation)[0])
    np.testing.assert_allclose(outputs[str(path)]["null"], want, rtol=1e-5)


# -- sources: pixel formats, codecs, containers, sizes ------------------------------------------
def _av1_encoder() -> str | None:
    return next((c for c in ("libaom-av1", "libsvtav1", "librav1e") if has_encoder(c)), None)


X265 = {"x265-params": "log-level=error"}
SOURCES = {  # name: (codec, pix_fmt, width, height, options)
    "ten_bit.mp4": ("libx264", "yuv420p10le", 64, 48, {"crf": "12"}),
    "yuv444.mp4": ("libx264", "yuv444p", 64, 48, {"crf": "12"}),
    "gray.mkv": ("ffv1", "gray", 64, 48, {}),
    "mjpeg.avi": ("mjpeg", "yuvj420p", 64, 48, {}),
    "vp9.webm": ("libvpx-vp9", "yuv420p", 64, 48, {"crf": "12", "b": "0"}),
    "av1.mkv": ("av1", "yuv420p", 64, 48, {}),
    "hevc.mov": ("libx265", "yuv420p", 64, 48, {**X265, "crf": "12"}),
    "hevc_ten_bit.mkv": ("libx265", "yuv420p10le", 64, 48, X265),
    "odd_vp9_97x61.webm": ("libvpx-vp9", "yuv420p", 97, 61, {"crf": "12", "b": "0"}),
    "odd_h264_97x61.mp4": ("libx264", "yuv444p", 97, 61, {"crf": "12"}),
}


def _source(tmp_path: Path, name: str) -> tuple[Path, np.ndarray]:
    codec, pix_fmt, w, h, options = SOURCES[name]
    if codec == "av1":
        codec = _av1_encoder()
        if codec is None:
            pytest.skip("no AV1 encoder (libaom-av1, libsvtav1, librav1e) in PyAV's FFmpeg")
    if not has_encoder(codec):
        pytest.skip(f"the {codec} encoder is not in PyAV's FFmpeg")
    frames = clip(6, w, h)
    return encode(tmp_path / name, frames, codec, pix_fmt, options=options), np.stack(frames)


@pytest.mark.parametrize("name", list(SOURCES))
def test_pixel_formats_codecs_containers_and_odd_sizes_decode(tmp_path, monkeypatch, name):
    monkeypatch.setenv("SVT_LOG", "1")  # SVT-AV1: errors only
    path, src = _source(tmp_path, name)
    with av.open(str(path)) as c:  # the file really is what the case says
        ctx = c.streams.video[0].codec_context
        assert ctx.pix_fmt == SOURCES[name][1]
        assert (ctx.width, ctx.height) == (src.shape[2], src.shape[1])
    frames, ts = decode(path)
    assert frames.dtype == np.uint8 and frames.shape == src.shape
    np.testing.assert_allclose(ts, np.arange(6) * 1000 / FPS)
    ref = src.astype(np.float64)
    if name == "gray.mkv":  # one plane: R = G = B = the source's luma
        assert (frames[..., 0] == frames[..., 1]).all() and (frames[..., 1] == frames[..., 2]).all()
        ref = np.repeat(ref @ np.array([0.299, 0.587, 0.114])[:, None], 3, axis=-1)
    err = np.abs(frames - ref)
    assert err.mean() < 12, err.mean()                   # lossy, but the same picture
    assert np.abs(frames.mean(axis=(0, 1, 2)) - ref.mean(axis=(0, 1, 2))).max() < 4


def test_every_source_kind_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("SVT_LOG", "1")
    made = {}
    for name in SOURCES:
        try:
            made[name] = _source(tmp_path, name)[0]
        except pytest.skip.Exception:
            continue
    results, out = run(tmp_path, list(made.values()))
    for name, path in made.items():
        assert results[name].status == "done", (name, results[name].reason)
        rows = np.load(out / f"{path.stem}_null.npy")
        np.testing.assert_allclose(rows, null_rows(decode(path)[0]), rtol=1e-5)


def test_4k_and_8k_frames_work_with_bounded_memory(tmp_path):
    """A 4K frame (24.9 MB) fills one 32 MB transfer slot; an 8K frame (99.5 MB) is larger than
    any slot and travels in its message, one at a time per slot. In-process decoding hands out
    chunks of at most CHUNK_BYTES (one frame here), whatever chunk size is asked for."""
    k4 = encode(tmp_path / "k4.mp4", plain(3840, 2160, 2), options={"preset": "ultrafast"})
    k8 = encode(tmp_path / "k8.mp4", plain(7680, 4320, 2), options={"preset": "ultrafast"})
    assert 3840 * 2160 * 3 <= CHUNK_BYTES < 2 * 3840 * 2160 * 3 < 7680 * 4320 * 3
    means = {}
    for path, (w, h) in ((k4, (3840, 2160)), (k8, (7680, 4320))):
        with open_frames(str(path)) as src:
            chunks = [(c.frames.shape, null_rows(c.frames)) for c in src.chunks(32)]
        assert [shape for shape, _ in chunks] == [(1, h, w, 3)] * 2  # not 32 frames (2.4 GB at 8K)
        means[path.name] = np.concatenate([m for _, m in chunks])
    results, out = run(tmp_path, [k4, k8])
    for path in (k4, k8):
        assert results[path.name].status == "done", results[path.name].reason
        np.testing.assert_allclose(np.load(out / f"{path.stem}_null.npy"), means[path.name], rtol=1e-5)


def test_frames_larger_than_a_slot_wait_for_slot_tokens(tmp_path, monkeypatch):
    """Memory stays bounded for frames larger than a slot: each message carries one frame and
    takes one of the decoder's slot tokens, so with the device not handing tokens back, no more
    than SLOTS_PER_DECODER frames are sent (slots made tiny here so that 32x24 frames are large)."""
    import os
    import queue
    import threading
    import time

    from video_features.utils import pipeline

    monkeypatch.setattr(pipeline, "SLOT_BYTES", 1000)
    path = encode(tmp_path / "v.mp4", clip(6))
    frames, stamps = decode(path)
    free, out = queue.Queue(), queue.Queue()
    for k in range(pipeline.SLOTS_PER_DECODER):
        free.put(k)
    with open_frames(str(path)) as src:
        worker = threading.Thread(target=pipeline._decode_into_slots,
                                  args=(src, (0, 0, 7), [], free, out, 8, os.getppid()))
        worker.start()
        time.sleep(1.0)
        sent = [out.get_nowait() for _ in range(out.qsize())]
        assert len(sent) == pipeline.SLOTS_PER_DECODER and worker.is_alive()
        for k in range(len(frames)):
            free.put(k % pipeline.SLOTS_PER_DECODER)  # the device frees each slot token
        worker.join(timeout=30)
    sent += [out.get_nowait() for _ in range(out.qsize())]
    assert [m[4:6] for m in sent] == [(k % pipeline.SLOTS_PER_DECODER, 1) for k in range(6)]
    np.testing.assert_array_equal(np.stack([m[10] for m in sent]), frames)
    np.testing.assert_array_equal(np.concatenate([m[7] for m in sent]), stamps)


# -- length and timing ----------------------------------------------------------------------------
def test_one_frame_video(tmp_path, resnet_weights):
    resnet_weights("resnet18")
    one = encode(tmp_path / "one.mp4", clip(1))
    results, out = run(tmp_path, [one])
    assert results["one.mp4"].status == "done"
    assert np.load(out / "one_null.npy").shape == (1, 3)
    np.testing.assert_allclose(np.load(out / "one_timestamps_ms.npy"), [[0.0, 40.0]])
    results, out = run(tmp_path, [one], "resnet", model_name="resnet18")
    assert results["one.mp4"].status == "done" and np.load(out / "one_resnet.npy").shape == (1, 512)
    # at 1 fps a 40 ms video has no frame (FFmpeg's fps filter gives none either): say so
    with pytest.raises(VideoError, match=r"^no frame at 1 fps: the input lasts 0\.040 s, less than "
                                         r"half a frame interval at that rate"):
        decode(one, extraction_fps=1.0)
    sub = tmp_path / "fps1"
    sub.mkdir()
    results, _ = run(sub, [shutil.copy(one, sub / "one.mp4")], extraction_fps=1.0)
    assert results["one.mp4"].status == "failed"
    assert results["one.mp4"].reason.startswith("no frame at 1 fps: the input lasts 0.040 s")


def test_variable_frame_rate_rows_carry_the_stream_times(tmp_path):
    from sample.make_samples import write_vfr_video

    pts_ms = [0, 40, 80, 160, 180, 300, 340, 380, 460, 480, 600]
    path = write_vfr_video(tmp_path / "vfr.mp4", pts_ms, width=32, height=24)
    results, out = run(tmp_path, [path])
    assert results["vfr.mp4"].status == "done"
    fps = float(np.load(out / "vfr_fps.npy"))
    with av.open(str(path)) as c:
        assert fps == float(c.streams.video[0].average_rate)
    stamps = np.load(out / "vfr_timestamps_ms.npy")
    np.testing.assert_allclose(stamps[:, 0], pts_ms, atol=1e-9)
    np.testing.assert_allclose(stamps[:, 1], np.array(pts_ms) + 1000 / fps)


# -- paths and lists ------------------------------------------------------------------------------
def test_list_file_with_blank_lines_comments_duplicates_and_missing_entries(tmp_path):
    """Paths with spaces and non-ASCII characters, in a UTF-8 list with CRLF line ends: every
    existing input once, each missing one failed with its path as listed (relative entries that
    exist nowhere stay relative to the current folder), outputs under the same names."""
    folder = tmp_path / "my clips ü"
    a = encode(folder / "vidéo 日本 1.mp4", clip(3))
    b = encode(tmp_path / "b c.mp4", clip(4, seed=1))
    lst = tmp_path / "list.txt"
    lines = ["# clips for the run", "", "my clips ü/vidéo 日本 1.mp4", "   # indented comment",
             "b c.mp4  ", "./my clips ü/vidéo 日本 1.mp4", "b c.mp4", "", "missing.mp4",
             "my clips ü/gone é.mp4"]
    lst.write_bytes("\r\n".join(lines).encode("utf-8"))
    from video_features.utils.runner import run as run_all

    cfg = make_config("null", file_with_video_paths=str(lst), device="cpu", on_extraction="save_numpy",
                      output_path=str(tmp_path / "out"), input_root=str(tmp_path), progress=False)
    assert cfg.video_paths == [str(a), str(b), "missing.mp4", "my clips ü/gone é.mp4"]
    summary = run_all(cfg)
    status = {Path(r.path).name: (r.status, r.reason) for r in summary.results}
    assert len(summary.results) == 4
    assert status[a.name] == ("done", "") and status[b.name] == ("done", "")
    assert status["missing.mp4"] == ("failed", "file not found: missing.mp4")
    assert status["gone é.mp4"] == ("failed", "file not found: my clips ü/gone é.mp4")
    out = tmp_path / "out" / "null"
    assert np.load(out / "my clips ü" / "vidéo 日本 1_null.npy").shape == (3, 3)
    assert np.load(out / "b c_null.npy").shape == (4, 3)
