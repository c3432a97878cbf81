"""utils/audio.py: in-process decoding of audio tracks to 16 kHz mono, as the reference tool reads them.

All media is generated here with PyAV. The reference pipeline (ffmpeg: copy AAC out, convert to
16-bit wav; soundfile int16 / 32768; channel mean; resampy) is re-computed independently where it
can be: a 16-bit wav is read with the standard library's ``wave`` module, and the resampling with
a plain ``resampy.resample`` call on the whole signal.
"""
from __future__ import annotations

import wave
from pathlib import Path

import av
import numpy as np
import pytest

from video_features.utils.audio import AudioInfo, StreamResampler, iter_audio, iter_pcm16, load_audio
from video_features.utils.errors import VideoError

resampy = pytest.importorskip("resampy")


# -- media writers ----------------------------------------------------------------------------
def tone(sr: int, seconds: float, freq: float, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    chans = [amp * np.sin(2 * np.pi * freq * (k + 1) * t) for k in range(channels)]
    return np.stack(chans).astype(np.float32)                # (channels, n)


def write_wav(path: Path, samples: np.ndarray, sr: int) -> Path:
    """``samples``: (channels, n) float in [-1, 1] -> 16-bit PCM wav via the standard library."""
    pcm = np.clip(np.rint(samples * 32768), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[0])
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(np.ascontiguousarray(pcm.T).tobytes())
    return path


def write_media(path: Path, samples: np.ndarray | None, sr: int, codec: str = "aac",
                video_frames: int = 0, sample_fmt: str | None = None) -> Path:
    """Encode ``samples`` (channels, n) with ``codec`` into ``path``'s container, optionally with
    a few tiny video frames (a video file with an audio track)."""
    out = av.open(str(path), "w")
    vs = None
    if video_frames:
        vs = out.add_stream("mpeg4", rate=10)
        vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
    if samples is not None:
        layout = "mono" if samples.shape[0] == 1 else "stereo"
        st = out.add_stream(codec, rate=sr)
        st.layout = layout
        fmt = sample_fmt or st.codec_context.codec.audio_formats[0].name
        st.format = fmt
        size = st.codec_context.frame_size or 1024
        for s in range(0, samples.shape[1], size):
            chunk = np.ascontiguousarray(samples[:, s:s + size])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate, frame.pts = sr, s
            rs = av.AudioResampler(format=fmt, layout=layout, rate=sr)
            for f in rs.resample(frame):
                for p in st.encode(f):
                    out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    if vs is not None:
        for i in range(video_frames):
            img = np.full((32, 32, 3), (i * 40) % 256, np.uint8)
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts = i
            for p in vs.encode(vf):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
    out.close()
    return path


def dominant_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * sr / len(x))


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("audio_media")
    return {
        "mp4": write_media(d / "tone.mp4", tone(44100, 2.0, 1000.0, channels=2), 44100,
                           "aac", video_frames=20),
        "mp3": write_media(d / "tone.mp3", tone(44100, 2.0, 1000.0), 44100, "libmp3lame"),
        "opus": write_media(d / "tone.opus", tone(48000, 2.0, 1000.0), 48000, "libopus"),
        "flac": write_media(d / "tone.flac", tone(22050, 2.0, 1000.0, channels=2), 22050, "flac"),
        "wav16k": write_wav(d / "mono16k.wav", tone(16000, 1.5, 440.0), 16000),
        "wav48k": write_wav(d / "stereo48k.wav", tone(48000, 1.5, 440.0, channels=2), 48000),
        "noaudio": write_media(d / "silent_film.mp4", None, 0, video_frames=10),
    }


# -- resampling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sr", [44100, 48000, 22050, 8000, 11025, 32000])
def test_stream_resampler_is_bit_identical_to_resampy(sr: int) -> None:
    rng = np.random.default_rng(sr)
    x = rng.standard_normal(int(sr * 5.3))
    expected = resampy.resample(x, sr, 16000)             # filter defaults to kaiser_best
    rs = StreamResampler(sr, 16000)
    parts, i = [], 0
    while i < len(x):
        n = int(rng.integers(1, 40000))
        parts.append(rs.push(x[i:i + n]))
        i += n
    parts.append(rs.flush())
    got = np.concatenate(parts)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_stream_resampler_identity_rate() -> None:
    x = np.linspace(-1, 1, 1000)
    rs = StreamResampler(16000, 16000)
    assert np.array_equal(np.concatenate([rs.push(x[:300]), rs.push(x[300:]), rs.flush()]), x)


# -- decoding -------------------------------------------------------------------------------------
def test_wav_at_16k_is_int16_over_32768(media: dict[str, Path]) -> None:
    with wave.open(str(media["wav16k"])) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    got = load_audio(str(media["wav16k"]), dtype=np.float64)
    assert np.array_equal(got, pcm / 32768.0)
    assert load_audio(str(media["wav16k"])).dtype == np.float32


def test_stereo_48k_wav_matches_reference_pipeline(media: dict[str, Path]) -> None:
    with wave.open(str(media["wav48k"])) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)
    reference = resampy.resample(np.mean(pcm / 32768.0, axis=1), 48000, 16000)
    info = AudioInfo()
    got = load_audio(str(media["wav48k"]), dtype=np.float64, info=info)
    assert np.array_equal(got, reference)
    assert (info.sample_rate, info.channels, info.codec) == (48000, 2, "pcm_s16le")
    assert np.allclose(load_audio(str(media["wav48k"])), reference, atol=1e-7)


def test_float_samples_become_16_bit_like_ffmpeg(tmp_path: Path) -> None:
    # swresample: round(x * 32768), clipped to int16, no dither
    x = np.array([[0.0, 0.5, -0.5, 1.0, -1.0, 1.5, -1.5, 1e-5, 0.123456, -0.99999]],
                 np.float32)
    x = np.repeat(x, 200, axis=1)
    path = write_media(tmp_path / "f32.wav", x, 16000, "pcm_f32le")
    got = np.concatenate(list(iter_pcm16(str(path))))[:, 0]
    expected = np.clip(np.rint(x[0].astype(np.float64) * 32768), -32768, 32767)
    assert np.array_equal(got, expected.astype(np.int16))


@pytest.mark.parametrize("kind,sr", [("mp4", 44100), ("mp3", 44100), ("opus", 48000),
                                     ("flac", 22050)])
def test_codecs_decode_to_16k_mono(media: dict[str, Path], kind: str, sr: int) -> None:
    info = AudioInfo()
    x = load_audio(str(media[kind]), info=info)
    assert x.dtype == np.float32 and x.ndim == 1
    assert info.sample_rate == sr
    # 2.0 s of signal; codecs may add up to ~2 frames of padding at the end
    assert 1.95 * 16000 <= len(x) <= 2.12 * 16000, len(x)
    mid = x[len(x) // 4: 3 * len(x) // 4]
    assert abs(dominant_hz(mid, 16000) - 1000.0) < 5.0
    assert 0.2 < np.abs(mid).max() < 0.8


def test_iter_audio_concatenates_to_load_audio(media: dict[str, Path]) -> None:
    blocks = list(iter_audio(str(media["mp4"])))
    assert len(blocks) >= 1
    assert np.array_equal(np.concatenate(blocks), load_audio(str(media["mp4"])))


def test_keep_priming_adds_the_aac_encoder_delay(media: dict[str, Path]) -> None:
    """The reference copies the AAC stream out to .aac, which loses the MP4 edit list: its audio
    starts with the encoder's priming samples (1024 for FFmpeg's AAC encoder)."""
    trimmed = np.concatenate(list(iter_pcm16(str(media["mp4"]))))
    primed = np.concatenate(list(iter_pcm16(str(media["mp4"]), keep_priming=True)))
    assert len(primed) - len(trimmed) == 1024
    assert np.array_equal(primed[1024:], trimmed)
    # priming is near-silence (the codec's pre-echo), the tone has amplitude 16384
    assert np.abs(primed[:256].astype(np.int32)).max() < 1600
    a = load_audio(str(media["mp4"]))
    b = load_audio(str(media["mp4"]), keep_priming=True)
    assert len(b) > len(a)


# -- errors ---------------------------------------------------------------------------------------
def test_video_without_audio_track(media: dict[str, Path]) -> None:
    with pytest.raises(VideoError, match="no audio track"):
        load_audio(str(media["noaudio"]))


def test_missing_empty_garbage_and_folder(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="file not found"):
        load_audio(str(tmp_path / "nope.mp4"))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty file"):
        load_audio(str(empty))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError) as exc:
        load_audio(str(junk))
    assert "\n" not in str(exc.value)
    with pytest.raises(VideoError, match="folder"):
        load_audio(str(tmp_path))


def test_truncated_file_keeps_what_decodes_or_fails_cleanly(media: dict[str, Path],
                                                             tmp_path: Path) -> None:
    data = media["mp3"].read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) // 2])
    x = load_audio(str(cut))
    assert 0.5 * 16000 < len(x) < 1.6 * 16000
