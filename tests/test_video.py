"""Decoding, frame selection by timestamp, frame folders and bad inputs."""
from __future__ import annotations

import math
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

import video_features.utils.video as video_module
from video_features.utils.errors import VideoError
from video_features.utils.video import open_frames


def decode_all(path, extraction_fps=None, chunk=7, **kw):
    with open_frames(str(path), extraction_fps, **kw) as src:
        chunks = list(src.chunks(chunk))
        fps = src.fps
    frames = np.concatenate([c.frames for c in chunks])
    ts = np.concatenate([c.timestamps_ms for c in chunks])
    return frames, ts, fps, chunks


def ffmpeg_fps_filter(path, fps):
    """Independent reference: FFmpeg's own fps filter (through PyAV's filter graph)."""
    out = []
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        g = av.filter.Graph()
        src = g.add_buffer(template=vs)
        f = g.add("fps", f"fps={Fraction(fps).limit_denominator(1001)}")
        sink = g.add("buffersink")
        src.link_to(f)
        f.link_to(sink)
        g.configure()
        for frame in c.decode(vs):
            g.push(frame)
            while True:
                try:
                    out.append(g.pull().to_ndarray(format="rgb24"))
                except (av.error.BlockingIOError, av.error.EOFError):
                    break
        g.push(None)
        while True:
            try:
                out.append(g.pull().to_ndarray(format="rgb24"))
            except (av.error.BlockingIOError, av.error.EOFError):
                break
    return np.stack(out)


def test_native_rate_frames_and_timestamps(make_video):
    path = make_video("n.mp4", n_frames=23, fps=25.0, width=64, height=48)
    frames, ts, fps, chunks = decode_all(path)
    assert frames.shape == (23, 48, 64, 3) and frames.dtype == np.uint8
    assert fps == 25.0
    np.testing.assert_allclose(ts, np.arange(23) / 25.0 * 1000)
    assert [len(c.frames) for c in chunks] == [7, 7, 7, 2]
    # the same pixels as a plain PyAV decode
    with av.open(str(path)) as c:
        ref = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    np.testing.assert_array_equal(frames, ref)


@pytest.mark.parametrize("src_fps,out_fps", [(25.0, 10.0), (29.97, 7.5), (25.0, 60.0), (30.0, 1.0)])
def test_extraction_fps_matches_ffmpeg_fps_filter(make_video, src_fps, out_fps):
    path = make_video(f"f{src_fps}.mp4", n_frames=61, fps=src_fps, width=64, height=48)
    frames, ts, fps, _ = decode_all(path, extraction_fps=out_fps)
    ref = ffmpeg_fps_filter(path, out_fps)
    assert fps == out_fps
    assert frames.shape == ref.shape
    np.testing.assert_array_equal(frames, ref)
    np.testing.assert_allclose(ts, np.arange(len(frames)) / out_fps * 1000)


def test_frame_folder_equals_video(make_video, tmp_path):
    path = make_video("ff.mp4", n_frames=12, fps=25.0, width=64, height=48)
    frames, ts, _, _ = decode_all(path)
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, fr in enumerate(frames):  # natural order, not lexical: 2 before 10
        Image.fromarray(fr).save(folder / f"clip-{i + 1}.png")
    (folder / "notes.txt").write_text("not a frame")
    f2, ts2, fps2, _ = decode_all(folder, frames_fps=25.0)
    np.testing.assert_array_equal(f2, frames)
    np.testing.assert_allclose(ts2, ts)
    # frames have no pts: index / frames_fps in both modes
    np.testing.assert_array_equal(decode_all(folder, frames_fps=25.0, timestamps="index")[1], ts2)
    f3, _, fps3, _ = decode_all(folder, extraction_fps=5.0, frames_fps=25.0)
    assert fps3 == 5.0 and len(f3) == 2  # 12 frames at 25 fps = 0.48 s -> round(2.4) = 2
    # slot n shows the latest frame i with round(i / 25 * 5) <= n: frames 2 and 7
    np.testing.assert_array_equal(f3, frames[[2, 7]])


def test_memory_is_bounded_by_chunks(make_video):
    path = make_video("long.mp4", n_frames=120, fps=25.0, width=64, height=48)
    with open_frames(str(path)) as src:
        sizes = [c.frames.nbytes for c in src.chunks(10)]
    assert max(sizes) == 10 * 64 * 48 * 3 and len(sizes) == 12


def _bad_inputs(tmp_path, make_video):
    good = make_video("good.mp4", n_frames=30, fps=25.0, width=64, height=48)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "text.mp4"
    text.write_text("this is not a video\n" * 50)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 3])
    return {"missing": (tmp_path / "nope.mp4", "not found"), "empty": (empty, "empty file"),
            "text": (text, "not a readable video"), "truncated": (truncated, None)}


def test_bad_inputs_give_one_line_reasons(tmp_path, make_video):
    for name, (path, words) in _bad_inputs(tmp_path, make_video).items():
        with pytest.raises(VideoError) as ei:
            decode_all(path)
        msg = str(ei.value)
        assert "\n" not in msg and len(msg) < 300, name
        if words:
            assert words in msg, (name, msg)


def _write_faststart(path, n_frames=50):
    """moov atom first (faststart), as a web download: the index precedes the data."""
    from sample.make_samples import synth_frame

    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        for i in range(n_frames):
            for p in vs.encode(av.VideoFrame.from_ndarray(synth_frame(i, 64, 48, 25), format="rgb24")):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
    return path


def _without_index_entries(monkeypatch):
    """Act as a PyAV without ``Stream.index_entries``: the seek probe checks instead."""
    monkeypatch.setattr(video_module, "_index_entries", lambda stream: None)


def _plain_decode(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.parametrize("check", ["index", "probe"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_stream_with_index_up_front(tmp_path, monkeypatch, check, keep):
    """A cut faststart mp4 opens (its index is whole) but its data ends early: rejected when
    opened, before a single frame is decoded or handed out, not after the whole decode."""
    if check == "probe":
        _without_index_entries(monkeypatch)
    path = _write_faststart(tmp_path / "fs.mp4")
    frames, _, _, _ = decode_all(path)
    assert len(frames) == 50
    np.testing.assert_array_equal(frames, _plain_decode(path))  # the probe leaves decoding as is
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    with av.open(str(cut)) as c:  # FFmpeg opens it and declares the full length
        assert c.streams.video[0].frames == 50
    delivered = []
    reason = r"^truncated video: the file ends .*declared.* 2\.0 s"
    with pytest.raises(VideoError, match=reason) as ei:
        with open_frames(str(cut)) as src:
            for chunk in src.chunks(7):
                delivered.append(len(chunk.frames))
    assert delivered == []
    assert "\n" not in str(ei.value)
    # the failure is already at open_frames()
    with pytest.raises(VideoError, match="^truncated video"):
        open_frames(str(cut))


def test_plain_mp4_cut_fails_to_open(tmp_path, make_video):
    """moov at the end (the usual mp4): a cut file has no index and is no readable video."""
    data = make_video("plain.mp4", n_frames=30, fps=25.0, width=64, height=48).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.9)])
    with pytest.raises(VideoError, match="^not a readable video"):
        open_frames(str(cut))


def _remux_shifted(src, dst, shift_frames, fps=25):
    """Copy the video packets of ``src`` with times moved ``shift_frames`` earlier: the mp4
    muxer writes an edit list that starts the presentation at the former frame ``shift_frames``
    (the frames before it are still stored and decoded, then dropped)."""
    with av.open(str(src)) as ic, av.open(str(dst), "w") as oc:
        ivs = ic.streams.video[0]
        ovs = oc.add_stream_from_template(ivs)
        shift = int(Fraction(shift_frames, fps) / ivs.time_base)
        for pkt in ic.demux(ivs):
            if pkt.dts is None:
                continue
            pkt.pts -= shift
            pkt.dts -= shift
            pkt.stream = ovs
            oc.mux(pkt)
    return dst


@pytest.mark.parametrize("check", ["index", "probe"])
def test_edit_list_that_trims_frames_is_not_truncation(tmp_path, monkeypatch, make_video, check):
    """100 frames stored, an edit list shows the last 50: the declared frame count is twice
    what decodes, which the old frame-count heuristic rejected as truncated."""
    if check == "probe":
        _without_index_entries(monkeypatch)
    src = make_video("e100.mp4", n_frames=100, fps=25.0, width=64, height=48, audio=False)
    path = _remux_shifted(src, tmp_path / "edit.mp4", 50)
    ref = _plain_decode(path)
    with av.open(str(path)) as c:
        declared = c.streams.video[0].frames
    assert declared == 100 and len(ref) == 50
    assert len(ref) < 0.9 * declared - 1  # the old check: "only 50 of the 100 frames"
    np.testing.assert_array_equal(ref, _plain_decode(src)[50:])  # it is the edit, not a loss
    frames, ts, fps, _ = decode_all(path)
    np.testing.assert_array_equal(frames, ref)
    np.testing.assert_allclose(ts, np.arange(50) * 40.0)


VFR_GAPS_MS = [40, 40, 80, 20, 120] * 4


@pytest.mark.parametrize("tb", [Fraction(1, 1000), Fraction(1, 90000)])
def test_variable_frame_rate_timestamps_are_presentation_times(tmp_path, monkeypatch, tb):
    from sample.make_samples import write_vfr_video

    pts_ms = np.concatenate([[0], np.cumsum(VFR_GAPS_MS)]).astype(np.float64)
    path = write_vfr_video(tmp_path / "vfr.mp4", [int(v) for v in pts_ms], time_base=tb)
    # the container keeps the irregular times (a plain decode reads them back)
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        got = [f.pts for f in c.decode(vs)]
        stored = np.array([float((p - got[0]) * vs.time_base * 1000) for p in got])
    np.testing.assert_array_equal(stored, pts_ms)

    frames, ts, fps, chunks = decode_all(path)
    assert ts.dtype == np.float64 and ts.shape == (len(pts_ms),)
    assert all(c.timestamps_ms.dtype == np.float64 for c in chunks)
    np.testing.assert_allclose(ts, pts_ms, rtol=0, atol=1e-9)
    # the reference tool's form, on request: index / fps (fps: the stream's average rate)
    f_idx, ts_idx, fps_idx, _ = decode_all(path, timestamps="index")
    np.testing.assert_array_equal(f_idx, frames)
    np.testing.assert_allclose(ts_idx, np.arange(len(pts_ms)) / fps * 1000)
    assert np.abs(ts_idx - pts_ms).max() > 50  # the two really differ on this video
    # with extraction_fps the output grid's times, whatever the mode
    for mode in ("pts", "index"):
        f10, ts10, _, _ = decode_all(path, extraction_fps=10.0, timestamps=mode)
        np.testing.assert_allclose(ts10, np.arange(len(f10)) * 100.0)
    # frame selection follows the presentation times: FFmpeg's fps filter agrees
    np.testing.assert_array_equal(f10, ffmpeg_fps_filter(path, 10.0))
    # a good VFR file passes the seek probe too
    _without_index_entries(monkeypatch)
    assert len(decode_all(path)[0]) == len(pts_ms)


def test_timestamps_mode_is_checked(make_video):
    path = make_video("m.mp4", n_frames=5, fps=25.0, width=64, height=48)
    with pytest.raises(ValueError, match="timestamps"):
        open_frames(str(path), timestamps="frame")


def test_audio_only_file_has_no_video_stream(tmp_path):
    from tests.test_bad_inputs import _audio_only

    path = _audio_only(tmp_path / "a.m4a")
    with pytest.raises(VideoError, match="no video stream"):
        open_frames(str(path))


def test_frames_and_timestamps_equal_opencv_decoding(make_video):
    """The reference tool decodes with OpenCV (BGR -> RGB) and stamps frames with
    CAP_PROP_POS_MSEC; our decode gives the same pixels and times."""
    cv2 = pytest.importorskip("cv2")
    path = make_video("cv.mp4", n_frames=20, fps=29.97, width=96, height=72)
    cap = cv2.VideoCapture(str(path))
    frames, stamps = [], []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        stamps.append(cap.get(cv2.CAP_PROP_POS_MSEC))
    ours, ts, fps, _ = decode_all(path)
    assert fps == pytest.approx(cap.get(cv2.CAP_PROP_FPS))
    np.testing.assert_array_equal(ours, np.stack(frames))
    np.testing.assert_allclose(ts, stamps, atol=1e-6)


@pytest.mark.parametrize("out_fps", [10.0, 7.5, 60.0, 1.0])
def test_slot_selection_in_chunks_equals_frame_by_frame(out_fps):
    """Chunked SlotSelector pushes give the same (frame, slot) sequence as pushing frame by
    frame (which test_extraction_fps_matches_ffmpeg_fps_filter holds against FFmpeg), including
    jittered and duplicated times."""
    rng = np.random.default_rng(int(out_fps * 10))
    steps = [Fraction(0), Fraction(1, 50), Fraction(1, 25), Fraction(1, 12)]
    exact = [Fraction(0)]  # relative to the first frame, as FrameSource gives them
    for i in rng.choice(len(steps), size=199, p=[0.05, 0.3, 0.5, 0.15]):
        exact.append(exact[-1] + steps[i])
    exact_end = exact[-1] + Fraction(1, 25)
    times, end = np.array([float(t) for t in exact]), float(exact_end)

    def run(sizes):
        sel, got, at = video_module.SlotSelector(out_fps), [], 0
        for n in sizes:
            picks, slots = sel.push(times[at:at + n])
            got += [(at + p, s) for p, s in zip(picks, slots)]  # -1 -> the frame before ``at``
            at += n
        picks, slots = sel.finish(end)
        return got + [(at - 1, s) for s in slots]

    one_by_one = run([1] * len(times))
    # independent expectation in exact arithmetic (as FFmpeg's integer time bases): slot n
    # shows the last frame with round(t * fps) <= n, halves rounded up
    rate = Fraction(out_fps)
    rounded = np.array([math.floor(t * rate + Fraction(1, 2)) for t in exact])
    expect = [(int(np.nonzero(rounded <= n)[0][-1]), n)
              for n in range(math.floor(exact_end * rate + Fraction(1, 2)))]
    assert one_by_one == expect
    for sizes in ([7] * 28 + [4], [1, 50, 3, 146], [200]):
        assert run(sizes) == one_by_one


@pytest.mark.parametrize("n_frames,total", [(50, 8), (61, 61), (10, 16)])
def test_extraction_total_gives_that_many_evenly_spaced_frames(make_video, n_frames, total):
    path = make_video(f"t{n_frames}.mp4", n_frames=n_frames, fps=25.0, width=64, height=48)
    native, native_ts, _, _ = decode_all(path)
    frames, ts, fps, _ = decode_all(path, extraction_total=total)
    assert len(frames) == total
    assert fps == pytest.approx(total * 25.0 / n_frames)
    np.testing.assert_allclose(ts, np.arange(total) / fps * 1000)
    # slot n (time n * count / (total * fps)) shows the latest frame i whose time rounds to
    # <= n at the new rate: i = floor((n + 1/2) * count / total), so frames spread evenly
    # (and repeat when there are fewer than total)
    expected = np.minimum(((np.arange(total) + 0.5) * n_frames / total).astype(int), n_frames - 1)
    np.testing.assert_array_equal(frames, native[expected])
    # the reference tool re-encodes at total * fps / count: FFmpeg's fps filter at that rate
    np.testing.assert_array_equal(frames, ffmpeg_fps_filter(path, fps)[:total])


def test_extraction_total_on_a_frame_folder(tmp_path, make_video):
    frames, _, _, _ = decode_all(make_video("tf.mp4", n_frames=12, fps=25.0, width=64, height=48))
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, fr in enumerate(frames):
        Image.fromarray(fr).save(folder / f"{i:03d}.png")
    got, ts, fps, _ = decode_all(folder, frames_fps=25.0, extraction_total=4)
    assert fps == pytest.approx(4 * 25.0 / 12)
    np.testing.assert_array_equal(got, frames[[1, 4, 7, 10]])  # floor((n + 0.5) * 12 / 4)
    with pytest.raises(ValueError, match="mutually exclusive"):
        open_frames(str(folder), 5.0, extraction_total=4)
