"""Generate the small test videos in sample/ (and, from tests, anywhere else).

Each video shows a textured background with moving shapes, so optical flow and frame features
are non-trivial, and carries a tone sweep on an AAC audio track. Only PyAV is needed.

    python sample/make_samples.py            # (re)writes sample/*.mp4 and sample_video_paths.txt
"""
from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

HERE = Path(__file__).resolve().parent


def synth_frame(i: int, width: int, height: int, fps: float, seed: int = 0) -> np.ndarray:
    """Frame ``i`` (H, W, 3 uint8): a drifting colour gradient, a moving square and a disc."""
    t = i / fps
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, 3)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        img[..., c] = 128 + 90 * np.sin(2 * np.pi * (xx / width + yy / (2 * height)) + phase[c] + 1.5 * t)
    # checker texture so that flow has something to lock onto
    img += 25 * (((xx // 8) + (yy // 8)) % 2)[..., None]
    sq = max(4, min(width, height) // 4)
    x0 = int((width - sq) * (0.5 + 0.45 * np.sin(2 * np.pi * 0.4 * t + seed)))
    y0 = int((height - sq) * (0.5 + 0.45 * np.cos(2 * np.pi * 0.3 * t + seed)))
    img[y0:y0 + sq, x0:x0 + sq] = (230, 40, 40)
    cx = width * (0.5 + 0.35 * np.cos(2 * np.pi * 0.25 * t))
    cy = height * (0.5 + 0.35 * np.sin(2 * np.pi * 0.25 * t))
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 < (min(width, height) / 6) ** 2
    img[disc] = (30, 60, 220)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_video(path: str | Path, n_frames: int = 30, fps: float = 25.0, width: int = 160,
                height: int = 120, audio: bool = True, codec: str = "libx264",
                sample_rate: int = 44100, seed: int = 0) -> Path:
    """Write a synthetic video; returns its path. ``fps`` may be fractional (e.g. 29.97)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as out:
        vs = out.add_stream(codec, rate=rate)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            vs.options = {"crf": "18", "preset": "veryfast"}
        astream = None
        if audio:
            astream = out.add_stream("aac", rate=sample_rate)
            astream.layout = "stereo"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(synth_frame(i, width, height, float(rate), seed), format="rgb24")
            for pkt in vs.encode(frame):
                out.mux(pkt)
        for pkt in vs.encode():
            out.mux(pkt)
        if astream is not None:
            duration = n_frames / float(rate)
            n = int(round(duration * sample_rate))
            t = np.arange(n) / sample_rate
            tone = 0.3 * np.sin(2 * np.pi * (220 + 400 * t / max(duration, 1e-3)) * t)
            stereo = np.stack([tone, 0.5 * tone]).astype(np.float32)
            chunk = 1024
            for s in range(0, n, chunk):
                part = np.ascontiguousarray(stereo[:, s:s + chunk])
                af = av.AudioFrame.from_ndarray(part, format="fltp", layout="stereo")
                af.sample_rate = sample_rate
                af.pts = s
                for pkt in astream.encode(af):
                    out.mux(pkt)
            for pkt in astream.encode():
                out.mux(pkt)
    return path


def write_vfr_video(path: str | Path, pts_ms: list[int], width: int = 64, height: int = 48,
                    time_base: Fraction = Fraction(1, 1000), seed: int = 0) -> Path:
    """Write a variable-frame-rate mp4 (libx264, no audio); frame ``i`` is shown at ``pts_ms[i]``.

    The stream and encoder both use ``time_base``, so the irregular times are kept exactly
    (mp4 may store them in a finer time base of its own).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        vs.options = {"crf": "18", "preset": "veryfast"}
        vs.time_base = time_base
        vs.codec_context.time_base = time_base
        for i, ms in enumerate(pts_ms):
            img = synth_frame(i, width, height, 25.0, seed)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = int(round(Fraction(ms, 1000) / time_base))
            frame.time_base = time_base
            for pkt in vs.encode(frame):
                out.mux(pkt)
        for pkt in vs.encode():
            out.mux(pkt)
    return path


SAMPLES = {
    # name: (frames, fps, width, height)
    "A.mp4": (75, 25.0, 320, 240),
    "B.mp4": (90, 29.97, 240, 180),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE), help="folder to write into")
    args = ap.parse_args()
    out = Path(args.out)
    for i, (name, (n, fps, w, h)) in enumerate(SAMPLES.items()):
        write_video(out / name, n_frames=n, fps=fps, width=w, height=h, seed=i)
        print(out / name)
    (out / "sample_video_paths.txt").write_text("".join(f"sample/{n}\n" for n in SAMPLES))


if __name__ == "__main__":
    main()
