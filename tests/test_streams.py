"""Which stream of a file with several is decoded (``video_stream`` / ``audio_stream``, FFmpeg's
default choice otherwise), and inputs decoded around damaged packets (``"damaged"`` in their
record, a line in the run's summary). Every input is generated here (PyAV)."""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from sample.make_samples import synth_frame
from tests.test_audio import tone
from video_features.utils.audio import AudioInfo, load_audio
from video_features.utils.config import make_config
from video_features.utils.errors import VideoError
from video_features.utils.video import media_info, open_frames, pick_stream

D = av.stream.Disposition
FPS = 25
SMALL, LARGE = (320, 180), (480, 270)


# -- inputs ---------------------------------------------------------------------------------------
def write_videos(path: Path, streams: list[tuple[tuple[int, int], int]], n: int = 10) -> Path:
    """One video stream per ``((width, height), disposition)``, each with frames of its own
    seed (libx264); the container follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        vss = []
        for (w, h), disposition in streams:
            vs = out.add_stream("libx264", rate=Fraction(FPS))
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            vs.options = {"preset": "ultrafast", "crf": "18"}
            vs.disposition = D(disposition)
            vss.append(vs)
        for i in range(n):
            for k, vs in enumerate(vss):
                img = synth_frame(i, vs.width, vs.height, FPS, seed=k)
                for pkt in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(pkt)
        for vs in vss:
            for pkt in vs.encode():
                out.mux(pkt)
    return path


def write_audios(path: Path, tracks: list[tuple[np.ndarray, int, int]]) -> Path:
    """One AAC stream per ``(samples (channels, n), sample rate, disposition)``."""
    with av.open(str(path), "w") as out:
        streams = []
        for samples, sr, disposition in tracks:  # every stream exists before the first packet
            st = out.add_stream("aac", rate=sr)
            st.layout = "mono" if samples.shape[0] == 1 else "stereo"
            st.disposition = D(disposition)
            streams.append(st)
        for st, (samples, sr, _) in zip(streams, tracks):
            size = st.codec_context.frame_size or 1024
            rs = av.AudioResampler(format=st.codec_context.codec.audio_formats[0].name,
                                   layout=st.layout.name, rate=sr)
            for s in range(0, samples.shape[1], size):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, s:s + size]),
                                                   format="fltp", layout=st.layout.name)
                frame.sample_rate, frame.pts = sr, s
                for f in rs.resample(frame):
                    for pkt in st.encode(f):
                        out.mux(pkt)
            for pkt in st.encode(None):
                out.mux(pkt)
    return path


def zero_packets(src: Path, dst: Path, kind: str, which: list[int]) -> Path:
    """A copy of ``src`` with the bytes of packets ``which`` of its first ``kind`` stream
    zeroed: the container stays intact, the decoder rejects those packets."""
    with av.open(str(src)) as c:
        packets = [(p.pos, p.size) for p in c.demux(**{kind: 0}) if p.size]
    data = bytearray(src.read_bytes())
    for k in which:
        pos, size = packets[k]
        data[pos:pos + size] = bytes(size)
    dst.write_bytes(bytes(data))
    return dst


def stream_frames(path: Path, k: int) -> np.ndarray:
    """Every frame of video stream ``k``, decoded with PyAV alone."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=k)])


def null_rows(frames: np.ndarray) -> np.ndarray:
    """The null feature type's rows: mean R, G, B of every 8th pixel of every 8th row."""
    return frames[:, ::8, ::8].reshape(len(frames), -1, 3).mean(axis=1)


def run(tmp_path: Path, paths: list, feature_type: str = "null", **options):
    """One run saving .npy files under ``tmp_path/out`` (laid out relative to the inputs'
    common folder); (results by file name, output folder, summary)."""
    import os

    from video_features.utils.runner import run as run_all

    root = os.path.commonpath([str(Path(p).parent) for p in paths])
    cfg = make_config(feature_type, video_paths=[str(p) for p in paths], device="cpu",
                      on_extraction="save_numpy", output_path=str(tmp_path / "out"),
                      input_root=root, progress=False, **options)
    summary = run_all(cfg)
    assert len(summary.results) == len(paths)
    return ({Path(r.path).name: r for r in summary.results}, tmp_path / "out" / feature_type,
            summary)


def meta(out: Path, stem: str) -> dict:
    return json.loads((out / f"{stem}_meta.json").read_text())


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> dict[str, Path]:
    """Two video streams, 320x180 then 480x270, with the DEFAULT disposition on the first
    (``first.mp4``) or on the second (``second.mp4``)."""
    d = tmp_path_factory.mktemp("streams")
    return {"first": write_videos(d / "first.mp4", [(SMALL, D.default), (LARGE, 0)]),
            "second": write_videos(d / "second.mp4", [(SMALL, 0), (LARGE, D.default)]),
            "one": write_videos(d / "one.mp4", [(SMALL, D.default)])}


# -- which video stream ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,suffix,dispositions,expected", [
    ("first", ".mp4", (D.default, 0), 0),
    ("second", ".mp4", (0, D.default), 1),
    ("second", ".mkv", (0, D.default), 1),
    # disposition score: DEFAULT +1, not hearing/visual impaired +1
    ("impaired", ".mkv", (D.default | D.hearing_impaired, D.default), 1),
    ("impaired_only", ".mkv", (D.visual_impaired, 0), 1),
])
def test_default_video_stream_is_ffmpegs_choice(tmp_path, name, suffix, dispositions, expected):
    """Without ``video_stream`` the stream decoded is the one av_find_best_stream picks (PyAV's
    streams.best calls it), which here is the one FFmpeg's disposition score prefers; the first
    stream only wins a tie."""
    path = write_videos(tmp_path / f"{name}{suffix}", [(SMALL, dispositions[0]),
                                                       (LARGE, dispositions[1])], n=6)
    with av.open(str(path)) as c:
        assert [s.disposition for s in c.streams.video] == [D(d) for d in dispositions]
        ffmpeg = c.streams.best("video").index - c.streams.video[0].index
    assert ffmpeg == expected
    with open_frames(str(path)) as src:
        frames = np.concatenate([ch.frames for ch in src.chunks(8)])
        assert (src.stream, src.streams) == (expected, 2)
    np.testing.assert_array_equal(frames, stream_frames(path, expected))
    info = media_info(str(path))["video"]
    assert (info["width"], info["height"], info["stream"], info["streams"]) == \
        (*(SMALL, LARGE)[expected], expected, 2)


def test_video_stream_picks_each_stream_and_a_missing_one_is_one_line(two):
    for k, size in enumerate((SMALL, LARGE)):
        with open_frames(str(two["second"]), video_stream=k) as src:
            frames = np.concatenate([ch.frames for ch in src.chunks(4)])
            assert (src.stream, src.streams, src.native_fps) == (k, 2, FPS)
        assert frames.shape == (10, size[1], size[0], 3)
        np.testing.assert_array_equal(frames, stream_frames(two["second"], k))
    with pytest.raises(VideoError) as ei:
        open_frames(str(two["second"]), video_stream=2)
    assert str(ei.value) == "video_stream=2: the file has 2 video streams (0 and 1)"
    with pytest.raises(VideoError, match=r"^video_stream=1: the file has 1 video stream \(index 0\)$"):
        open_frames(str(two["one"]), video_stream=1)
    with av.open(str(two["one"])) as c, pytest.raises(VideoError, match="^no audio stream in file$"):
        pick_stream(c, "audio")


def test_a_run_decodes_the_chosen_stream_and_records_it(two, tmp_path):
    """``video_stream=1`` in a run: the two-stream file's rows are those of its 480x270 stream
    and its record says which stream of how many; a file with one video stream fails alone,
    naming how many it has; the default run takes and records FFmpeg's choice."""
    results, out, summary = run(tmp_path, [two["second"], two["first"], two["one"]],
                                video_stream=1)
    assert results["one.mp4"].status == "failed"
    assert results["one.mp4"].reason == "video_stream=1: the file has 1 video stream (index 0)"
    assert "FAILED" in summary.text() and "video_stream=1: the file has 1" in summary.text()
    for name in ("first", "second"):
        assert results[f"{name}.mp4"].status == "done"
        np.testing.assert_allclose(np.load(out / f"{name}_null.npy"),
                                   null_rows(stream_frames(two[name], 1)), rtol=1e-5)
        video = meta(out, name)["media"]["video"]
        assert (video["width"], video["height"], video["stream"], video["streams"]) == (*LARGE, 1, 2)

    results, out, _ = run(tmp_path / "default", [two["first"], two["second"], two["one"]])
    assert {r.status for r in results.values()} == {"done"}
    for name, k in (("first", 0), ("second", 1), ("one", 0)):
        np.testing.assert_allclose(np.load(out / f"{name}_null.npy"),
                                   null_rows(stream_frames(two[name], k)), rtol=1e-5)
        video = meta(out, name)["media"]["video"]
        assert (video["stream"], video["streams"]) == (k, 1 if name == "one" else 2)
        assert "damaged" not in meta(out, name)


def test_the_python_api_takes_the_chosen_stream_too(two):
    """``extract(path)`` of an extractor (the Python API's path, decoding in this process)
    reads ``video_stream`` as a run does."""
    from video_features.models.registry import get_extractor_class

    for k in (0, 1):
        cfg = make_config("null", video_paths=["x"], device="cpu", video_stream=k)
        out = get_extractor_class("null")(cfg, torch.device("cpu")).extract(str(two["second"]))
        np.testing.assert_allclose(np.asarray(out["null"]),
                                   null_rows(stream_frames(two["second"], k)), rtol=1e-5)


# -- which audio stream ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> dict[str, Path]:
    """``two.mp4``: a 16 kHz mono 440 Hz stream, then a 44.1 kHz stereo 1 kHz one with the
    DEFAULT disposition; ``low.mp4`` / ``high.mp4``: each of them alone; ``damaged.mp4``:
    ``high.mp4`` with three packets zeroed."""
    d = tmp_path_factory.mktemp("audio_streams")
    low, high = tone(16000, 1.3, 440.0), tone(44100, 1.3, 1000.0, channels=2)
    files = {"two": write_audios(d / "two.mp4", [(low, 16000, 0), (high, 44100, D.default)]),
             "low": write_audios(d / "low.mp4", [(low, 16000, D.default)]),
             "high": write_audios(d / "high.mp4", [(high, 44100, D.default)])}
    files["damaged"] = zero_packets(files["high"], d / "damaged.mp4", "audio", [20, 21, 22])
    return files


def test_audio_stream_default_and_each(audio):
    with av.open(str(audio["two"])) as c:
        assert c.streams.best("audio").index == c.streams.audio[1].index  # its DEFAULT disposition
    default, first, second = AudioInfo(), AudioInfo(), AudioInfo()
    x = load_audio(str(audio["two"]), info=default)
    x0 = load_audio(str(audio["two"]), info=first, stream=0)
    x1 = load_audio(str(audio["two"]), info=second, stream=1)
    assert (default.stream, default.streams, default.sample_rate, default.channels) == (1, 2, 44100, 2)
    assert (first.stream, first.sample_rate, first.channels) == (0, 16000, 1)
    assert (second.stream, second.sample_rate, second.channels) == (1, 44100, 2)
    np.testing.assert_array_equal(x, x1)
    np.testing.assert_array_equal(x1, load_audio(str(audio["high"])))  # the same track alone
    np.testing.assert_array_equal(x0, load_audio(str(audio["low"])))
    # one second at 16 kHz: spectrum bin k is k Hz
    assert np.argmax(np.abs(np.fft.rfft(x0[:16000]))) == 440
    assert np.argmax(np.abs(np.fft.rfft(x1[:16000]))) == 1000
    with pytest.raises(VideoError, match=r"^audio_stream=2: the file has 2 audio streams \(0 and 1\)$"):
        load_audio(str(audio["two"]), stream=2)
    info = media_info(str(audio["two"]), audio_stream=0)["audio"]
    assert (info["sample_rate"], info["channels"], info["stream"], info["streams"]) == (16000, 1, 0, 2)
    assert "video" not in media_info(str(audio["two"]), video_stream=3)


def test_vggish_run_takes_the_audio_stream_and_marks_damaged_audio(audio, tmp_path):
    """vggish on the pipeline with ``audio_stream=0``: the two-stream file gives the features
    of its first track (the one FFmpeg would not pick), as the file that holds that track alone;
    an AAC track with undecodable packets is extracted around them, and its record and the
    summary say so."""
    names = ("two", "low", "high", "damaged")
    results, out, summary = run(tmp_path, [audio[n] for n in names], "vggish",
                                allow_random_weights=True, audio_stream=0)
    assert all(results[f"{n}.mp4"].status == "done" for n in names)
    np.testing.assert_array_equal(np.load(out / "two_vggish.npy"), np.load(out / "low_vggish.npy"))
    assert meta(out, "two")["media"]["audio"] == {"codec": "aac", "sample_rate": 16000,
                                                  "channels": 1, "stream": 0, "streams": 2}
    assert meta(out, "high")["media"]["audio"]["streams"] == 1
    damage = meta(out, "damaged")["damaged"]
    assert damage.startswith("skipped 3 undecodable audio packets; decoded 1.") and "\n" not in damage
    assert results["damaged.mp4"].damaged == damage
    assert all("damaged" not in meta(out, n) and not results[f"{n}.mp4"].damaged
               for n in ("two", "low", "high"))
    text = summary.text()
    assert "damaged 1 (" in text and f"  DAMAGED {audio['damaged']}: {damage}" in text


# -- damaged video ---------------------------------------------------------------------------------
def test_damaged_video_is_marked_in_its_record_and_the_summary(tmp_path):
    """Zeroed H.264 packets in the middle of the file: the decoder skips them, the frames around
    them are extracted, and the input's record carries a one-line "damaged" that the run's
    summary lists; a clean input has no such key, and a clean run no such line."""
    clean = write_videos(tmp_path / "src" / "clean.mp4", [((64, 48), D.default)], n=40)
    damaged = zero_packets(clean, tmp_path / "damaged.mp4", "video", [20, 27])
    with open_frames(str(damaged)) as src:
        frames = np.concatenate([ch.frames for ch in src.chunks(8)])
        damage = src.damage
    assert 20 < len(frames) < 40
    assert damage == (f"skipped 2 undecodable video packets (the first after frame 19, 0.76 s); "
                      f"decoded {len(frames)} frames")
    with open_frames(str(clean)) as src:
        list(src.chunks(8))
        assert src.damage is None

    results, out, summary = run(tmp_path, [damaged, clean])
    assert results["damaged.mp4"].status == results["clean.mp4"].status == "done"
    assert meta(out, "damaged")["damaged"] == damage == results["damaged.mp4"].damaged
    assert "damaged" not in meta(out, "src/clean") and results["clean.mp4"].damaged == ""
    np.testing.assert_allclose(np.load(out / "damaged_null.npy"), null_rows(frames), rtol=1e-5)
    lines = summary.text().splitlines()
    assert lines[0] == "done 2, skipped 0 (already extracted), failed 0"
    assert lines[1].startswith("damaged 1 (")
    assert lines[2] == f"  DAMAGED {damaged}: {damage}"
    assert len(summary.damaged) == 1

    _, _, summary = run(tmp_path / "clean_run", [clean])
    assert "damaged" not in summary.text().lower()


# -- NVDEC (tests/fake_nvdec stands in for PyNvVideoCodec) ------------------------------------------
@pytest.fixture
def fake_nvdec(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fake_nvdec"))
    import PyNvVideoCodec as nvc

    from video_features.utils import nvdec

    monkeypatch.setattr(nvc, "calls", {"caps": [], "decoders": [], "ends": 0, "dlpack_tries": 0})
    monkeypatch.setattr(nvdec, "_CAPS", {}, raising=False)
    return nvc


@pytest.mark.parametrize("video_stream,on_nvdec", [(None, True), (1, True), (0, False)])
def test_nvdec_decodes_the_same_stream_or_hands_it_to_the_cpu(two, fake_nvdec, caplog,
                                                              video_stream, on_nvdec):
    """NVIDIA's demuxer reads FFmpeg's default stream: that choice (default or named) is
    decoded on NVDEC; another stream goes to the CPU decoders, with the reason; the rows are
    always those of the chosen stream."""
    from tests.test_pipeline import Collect
    from video_features.utils.pipeline import DevicePipeline
    from video_features.utils.runner import build_extractor

    path = str(two["second"])
    cfg = make_config("null", video_paths=[path], device="cpu", video_stream=video_stream)
    ex = build_extractor(cfg.replace(decoder="nvdec"), "cpu")
    results, writer = [], Collect()
    pipe = DevicePipeline(ex, writer, 1, results.append)
    try:
        with caplog.at_level("INFO"), torch.inference_mode():
            pipe.run([path])
    finally:
        pipe.close()
    assert [r.status for r in results] == ["done"]
    k = 1 if video_stream is None else video_stream
    np.testing.assert_allclose(writer.outputs[path]["null"], null_rows(stream_frames(two["second"], k)),
                               rtol=1e-5)
    fallbacks = [r.message for r in caplog.records if "cannot decode" in r.message]
    if on_nvdec:
        assert not fallbacks and [d["path"] for d in fake_nvdec.calls["decoders"]] == [path]
    else:
        assert len(fallbacks) == 1 and "FFmpeg picks by default (1 of 2)" in fallbacks[0]
        assert "not video_stream=0" in fallbacks[0] and not fake_nvdec.calls["decoders"]


def test_nvdec_demuxer_of_another_size_is_refused(two, fake_nvdec):
    from video_features.utils import nvdec

    nvdec._open(str(two["second"]), 0, 8, LARGE).end()
    with pytest.raises(RuntimeError, match=r"demuxer reads a 480x270 video stream, the chosen one "
                                           r"is 320x180"):
        nvdec._open(str(two["second"]), 0, 8, SMALL)
