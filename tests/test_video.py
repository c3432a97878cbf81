"""Decoding, frame selection by timestamp, frame folders and bad inputs."""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from utils.errors import VideoError
from utils.video import open_frames


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


def test_truncated_stream_with_index_up_front(tmp_path):
    """moov atom first (faststart): the container opens, the stream ends early."""
    from sample.make_samples import synth_frame

    path = tmp_path / "fs.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        for i in range(50):
            for p in vs.encode(av.VideoFrame.from_ndarray(synth_frame(i, 64, 48, 25), format="rgb24")):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
    assert len(decode_all(path)[0]) == 50
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VideoError, match="truncated video: only .* of the 50 frames"):
        decode_all(cut)


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "a.m4a"
    with av.open(str(path), "w") as out:
        s = out.add_stream("aac", rate=16000)
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        fr.sample_rate = 16000
        for p in s.encode(fr):
            out.mux(p)
        for p in s.encode():
            out.mux(p)
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
