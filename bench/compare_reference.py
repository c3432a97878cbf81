"""Whole runs of this tool and of a checkout of v-iashin/video_features, back to back.

For each feature type both tools run as their own processes from the command line (ours:
``main.py``; the reference: its ``main.py`` with its checkout as the working folder) on the same
video with the same random weights, written in each tool's checkpoint layout where that tool
loads them. Runs alternate (ours, reference; the next round reference, ours), each waits for a
quiet machine (1-minute load average under ``--max_load``, polled every 30 s for up to
``--wait_s``), and the table gives medians over ``--rounds``:

    feature | ours wall s | reference wall s | speed-up (reference / ours) | peak RSS | features

    python bench/compare_reference.py --reference_dir /path/to/video_features \\
        --video /path/to/video_features/sample/v_GGSY1Qvo990.mp4 --rounds 3

(``v_GGSY1Qvo990.mp4``, in the reference's sample folder, is an 18 s 320x240 clip at 19.6 fps
with AAC audio; ``--features`` picks a subset of resnet50 r21d i3d s3d vggish clip.)

Wall seconds are the whole process (interpreter start, imports, weights, decoding, networks,
saving); peak RSS is the largest single process of the run. "features" is the largest absolute
difference between the two tools' outputs over the largest absolute reference value, and the
largest per-row relative L2 difference.

Where the weights go: a copy of the reference checkout (``.git`` and ``sample`` left out) is made
in a temporary folder, and the I3D, S3D and CLIP files are put where the reference loads them
(``models/i3d/checkpoints/i3d_rgb.pt``, ``models/s3d/checkpoint/S3D_kinetics400_torchified.pt``,
``models/clip/checkpoints/CLIP-custom.pth`` with ``model_name=custom``); torchvision's ResNet-50 and
R(2+1)D-18 go in a private torch hub cache under their published names, torchvggish's VGGish and
PCA files in ``models/vggish/hub/checkpoints`` of the copy (the reference sets TORCH_HOME there).
The checkout itself is not changed. Our runs read the same files through ``checkpoint_path``.

What the reference needs here: its Python packages (omegaconf, opencv-python, resampy, soundfile,
ftfy, regex; pass ``--reference_pythonpath`` for an extra site folder) and an ``ffmpeg``
executable for S3D (it re-encodes every video to 25 fps) and VGGish (it extracts the audio to
WAV): the one on PATH, else imageio-ffmpeg's (``pip install imageio-ffmpeg``), else ``--ffmpeg``.
Recent torchvision releases (0.27 here) have no video decoding, and the reference's R(2+1)D and
S3D call ``torchvision.io.video.read_video``; when it is missing a stand-in is installed in the
reference's process only: PyAV decoding of every video frame to RGB and every audio frame of the
file, stacked into tensors, as torchvision's PyAV reader returned them. The table's reference
times for those two types therefore include this stand-in's decoding, not torchvision's.

Options of our runs that differ from our defaults, so that both tools compute the same numbers:
``timestamps_form=reference``; VGGish ``keep_priming=true`` (the reference keeps the AAC priming
samples). S3D's reference re-encodes the video to 25 fps with libx264, so its pixels differ from
ours (we pick frames by timestamp and decode once); its feature check is made by an extra,
untimed run of ours on the reference's re-encoded file (``extraction_fps=null``; the reference's
S3D runs keep their temporary files for it, ``keep_tmp_files=true``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ("resnet50", "r21d", "i3d", "s3d", "vggish", "clip")

# Runs the reference's main.py in its own process; installs a stand-in for
# torchvision.io.video.read_video where this torchvision has no video decoding.
_REF_LAUNCHER = textwrap.dedent('''
    import runpy, sys, types

    def _read_video(filename, start_pts=0, end_pts=None, pts_unit="pts", output_format="THWC"):
        """Every video frame as RGB (T, H, W, 3) uint8 and every audio frame (C, N) float,
        as torchvision's PyAV reader returned them (whole file; start/end not supported)."""
        import av
        import numpy as np
        import torch
        assert start_pts == 0 and end_pts is None, "stand-in reads whole files only"
        video, audio, info = [], [], {}
        with av.open(filename) as c:
            streams = []
            if c.streams.video:
                streams.append(c.streams.video[0])
                info["video_fps"] = float(c.streams.video[0].average_rate)
            if c.streams.audio:
                streams.append(c.streams.audio[0])
                info["audio_fps"] = c.streams.audio[0].rate
            for packet in c.demux(*streams):
                for frame in packet.decode():
                    if packet.stream.type == "video":
                        video.append(frame.to_ndarray(format="rgb24"))
                    else:
                        a = frame.to_ndarray()
                        audio.append(a if a.ndim == 2 and a.shape[0] <= 8 else a.reshape(1, -1))
        v = torch.as_tensor(np.stack(video)) if video else torch.empty((0, 1, 1, 3), dtype=torch.uint8)
        a = torch.as_tensor(np.concatenate(audio, 1)) if audio else torch.empty((1, 0), dtype=torch.float32)
        if output_format == "TCHW":
            v = v.permute(0, 3, 1, 2)
        return v, a, info

    try:
        import torchvision.io.video  # noqa: F401
    except ImportError:
        import torchvision.io
        mod = types.ModuleType("torchvision.io.video")
        mod.read_video = _read_video
        sys.modules["torchvision.io.video"] = mod
        torchvision.io.video = mod
    sys.argv = ["main.py", *sys.argv[1:]]
    runpy.run_path("main.py", run_name="__main__")
''')

# Prints the reference S3D's state-dict keys and shapes (to write a file in its layout).
_REF_S3D_KEYS = textwrap.dedent('''
    import json
    from models.s3d.s3d_src.s3d import S3D
    net = S3D(num_class=400)
    print(json.dumps({k: list(v.shape) for k, v in net.state_dict().items()}))
''')


@dataclass
class Case:
    """One feature type: the command-line words of each tool and where to compare outputs."""

    name: str
    ours: list[str]
    ref: list[str]
    ours_key: str
    ref_key: str
    notes: list[str] = field(default_factory=list)
    parity_video: str | None = None     # compare on this file instead (S3D: the re-encode)
    parity_ours: list[str] = field(default_factory=list)


@dataclass
class Run:
    wall: float
    cpu: float
    rss_mb: float
    load: float
    rc: int
    out: Path


def load1() -> float:
    return os.getloadavg()[0]


def wait_quiet(max_load: float, wait_s: float, poll_s: float = 30.0) -> float:
    """Wait until the 1-minute load is under ``max_load`` (at most ``wait_s``); the load."""
    t0 = time.monotonic()
    while True:
        now = load1()
        if now < max_load or time.monotonic() - t0 >= wait_s:
            if now >= max_load:
                print(f"   load {now:.2f} still >= {max_load} after {wait_s:.0f} s: running anyway",
                      flush=True)
            return now
        print(f"   load {now:.2f} >= {max_load}: waiting", flush=True)
        time.sleep(poll_s)


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, float, float, int]:
    """Run ``cmd``; (wall s, CPU s of it and its children, peak RSS MB of its largest
    process, exit code)."""
    with open(log, "w") as f:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024.0, p.returncode


def find_npy(out: Path, stem: str, key: str):
    import numpy as np

    hits = sorted(out.rglob(f"{stem}_{key}.npy"))
    return np.load(hits[0]) if hits else None


def difference(ref, ours) -> str:
    import numpy as np

    if ref is None or ours is None:
        return "missing output"
    if ref.shape != ours.shape:
        return f"shapes differ: reference {ref.shape}, ours {ours.shape}"
    ref64, ours64 = ref.astype(np.float64), ours.astype(np.float64)
    scale = np.abs(ref64).max()
    rel = np.abs(ref64 - ours64).max() / max(scale, 1e-30)
    r2 = ref64.reshape(ref.shape[0], -1)
    o2 = ours64.reshape(ref.shape[0], -1)
    rows = np.linalg.norm(r2 - o2, axis=1) / np.maximum(np.linalg.norm(r2, axis=1), 1e-30)
    return f"{rel:.1e} (rows {rows.max():.1e}), {'x'.join(map(str, ref.shape))}"


def find_ffmpeg(given: str | None) -> str | None:
    if given:
        return given
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # not installed, or no binary for this platform
        return None


def prepare(features: list[str], work: Path, ref_copy: Path, hub: Path, video: str,
            ref_env: dict, ffmpeg: str | None) -> tuple[list[Case], str]:
    """Random weights in both layouts and the command-line words of every feature type."""
    sys.path.insert(0, str(ROOT))
    ckpt = work / "ckpt"
    ckpt.mkdir()
    hub.mkdir(parents=True)
    cases = []
    for name in features:
        if name == "resnet50":
            from video_features.models.resnet.weights import write_random_checkpoint
            path = write_random_checkpoint(hub / "resnet50-0676ba61.pth", "resnet50")
            cases.append(Case(name, ["--feature_type", "resnet", "model_name=resnet50",
                                     f"checkpoint_path={path}", "timestamps_form=reference"],
                              ["feature_type=resnet", "model_name=resnet50"], "resnet", "resnet"))
        elif name == "r21d":
            from video_features.models.r21d.weights import write_random_checkpoint
            path = write_random_checkpoint(hub / "r2plus1d_18-91a641e6.pth")
            cases.append(Case(name, ["--feature_type", "r21d", f"checkpoint_path={path}"],
                              ["feature_type=r21d"], "r21d", "r21d"))
        elif name == "i3d":
            from video_features.models.i3d.weights import write_random_checkpoint
            path = ref_copy / "models" / "i3d" / "checkpoints" / "i3d_rgb.pt"
            write_random_checkpoint(str(path), "video_features", "rgb", 400)
            cases.append(Case("i3d rgb", ["--feature_type", "i3d", "streams=[rgb]",
                                          f"checkpoint_path_rgb={path}",
                                          "timestamps_form=reference"],
                              ["feature_type=i3d", "streams=rgb"], "rgb", "rgb"))
        elif name == "s3d":
            import torch
            from video_features.models.s3d.net import build_s3d
            from video_features.models.s3d.weights import kylemin_key
            shapes = json.loads(subprocess.run(
                [sys.executable, "-c", _REF_S3D_KEYS], cwd=ref_copy, env=ref_env, check=True,
                capture_output=True, text=True).stdout.strip().splitlines()[-1])
            torch.manual_seed(0)
            tv = build_s3d().state_dict()
            state = {}
            for k, shape in shapes.items():
                v = tv[kylemin_key(k)]
                assert list(v.shape) == shape, (k, v.shape, shape)
                state[k] = v.clone()
            path = ref_copy / "models" / "s3d" / "checkpoint" / "S3D_kinetics400_torchified.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path)
            notes = [] if ffmpeg else ["reference needs ffmpeg: not found"]
            cases.append(Case(name, ["--feature_type", "s3d", f"checkpoint_path={path}"],
                              ["feature_type=s3d", "keep_tmp_files=true"], "s3d", "s3d", notes,
                              parity_video=f"{Path(video).stem}_new_fps.mp4",
                              parity_ours=["extraction_fps=null"]))
        elif name == "vggish":
            from video_features.models.vggish.weights import write_random_checkpoint, write_random_pca
            # the reference points TORCH_HOME at its models/vggish folder
            vhub = ref_copy / "models" / "vggish" / "hub" / "checkpoints"
            path = write_random_checkpoint(vhub / "vggish-10086976.pth")
            pca = write_random_pca(vhub / "vggish_pca_params-970ea276.pth")
            notes = [] if ffmpeg else ["reference needs ffmpeg: not found"]
            cases.append(Case(name, ["--feature_type", "vggish", f"checkpoint_path={path}",
                                     f"pca_path={pca}", "keep_priming=true"],
                              ["feature_type=vggish"], "vggish", "vggish", notes))
        elif name == "clip":
            from video_features.models.clip.weights import write_random_openai_checkpoint
            path = write_random_openai_checkpoint(
                ref_copy / "models" / "clip" / "checkpoints" / "CLIP-custom.pth", "ViT-B/32")
            cases.append(Case(name, ["--feature_type", "clip", "model_name=ViT-B/32",
                                     f"checkpoint_path={path}", "timestamps_form=reference"],
                              ["feature_type=clip", "model_name=custom"], "clip", "clip"))
    import torch
    return cases, f"torch {torch.__version__} ({torch.get_num_threads()} threads)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference_dir", required=True, type=Path)
    p.add_argument("--reference_pythonpath", default="",
                   help="extra folders (os.pathsep separated) for the reference's imports")
    p.add_argument("--video", default=str(ROOT / "sample" / "A.mp4"))
    p.add_argument("--features", nargs="+", default=list(FEATURES), choices=FEATURES)
    p.add_argument("--rounds", type=int, default=2, help="runs of each tool per feature type")
    p.add_argument("--max_load", type=float, default=1.0,
                   help="wait before each run until the 1-minute load average is below this")
    p.add_argument("--wait_s", type=float, default=600.0,
                   help="longest wait for a quiet machine before each run (then it runs anyway)")
    p.add_argument("--ffmpeg", default=None, help="ffmpeg executable for the reference")
    p.add_argument("--ours_args", nargs="*", default=[],
                   help="extra words for every one of our runs (e.g. batch_size=4)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (outputs, logs)")
    a = p.parse_args()

    ref_dir = a.reference_dir.resolve()
    video = str(Path(a.video).resolve())
    stem = Path(video).stem
    work = Path(tempfile.mkdtemp(prefix="cmp_ref_"))
    ref_copy = work / "reference"
    shutil.copytree(ref_dir, ref_copy, ignore=shutil.ignore_patterns(".git", "sample", "output", "tmp"))
    (ref_copy / "models" / "clip" / "checkpoints").mkdir(parents=True, exist_ok=True)
    launcher = work / "reference_main.py"
    launcher.write_text(_REF_LAUNCHER)
    ffmpeg = find_ffmpeg(a.ffmpeg)
    bin_dir = work / "bin"
    bin_dir.mkdir()
    if ffmpeg:
        (bin_dir / "ffmpeg").symlink_to(ffmpeg)
    hub = work / "torch_home" / "hub" / "checkpoints"
    base_env = dict(os.environ, VIDEO_FEATURES_OFFLINE="1", TORCH_HOME=str(work / "torch_home"))
    ref_env = dict(base_env, PATH=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
                   PYTHONPATH=os.pathsep.join(x for x in [str(ref_copy), a.reference_pythonpath] if x))
    try:
        # weights are made in another process: this one stays small, since a child's peak RSS
        # as the kernel reports it starts from its parent's size at the fork
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            cases, torch_info = pool.submit(prepare, a.features, work, ref_copy, hub, video,
                                            ref_env, ffmpeg).result()
        print(f"{os.cpu_count()} CPUs, {torch_info}, video {video}, {a.rounds} rounds, "
              f"ffmpeg {ffmpeg}", flush=True)
        runs: dict[tuple[str, str], list[Run]] = {}
        n = 0
        for r in range(a.rounds):
            for case in cases:
                order = ("ours", "reference") if r % 2 == 0 else ("reference", "ours")
                for tool in order:
                    n += 1
                    out = work / f"out_{n}"
                    if tool == "ours":
                        cmd = [sys.executable, "main.py", "--device", "cpu", "--video_paths", video,
                               "--on_extraction", "save_numpy", "--output_path", str(out),
                               *case.ours, *a.ours_args]
                        cwd, env = ROOT, base_env
                    else:
                        cmd = [sys.executable, str(launcher), *case.ref, "device=cpu",
                               f"video_paths=[{video}]", "on_extraction=save_numpy",
                               f"output_path={out}", f"tmp_path={work / f'tmp_{n}'}"]
                        cwd, env = ref_copy, ref_env
                    load = wait_quiet(a.max_load, a.wait_s)
                    wall, cpu, rss, rc = timed(cmd, cwd, env, work / f"log_{n}.txt")
                    runs.setdefault((case.name, tool), []).append(Run(wall, cpu, rss, load, rc, out))
                    print(f"round {r + 1} {case.name:8s} {tool:9s} {wall:7.2f} s wall, "
                          f"{cpu:7.2f} s CPU, {rss:6.0f} MB, load {load:.2f}, exit {rc}"
                          + ("" if rc == 0 else f" (log {work / f'log_{n}.txt'})"), flush=True)
        rows = []
        for case in cases:
            ours_runs, ref_runs = runs[(case.name, "ours")], runs[(case.name, "reference")]
            ours_ok = [x for x in ours_runs if x.rc == 0]
            ref_ok = [x for x in ref_runs if x.rc == 0]
            ref_out = find_npy(ref_runs[-1].out, stem, case.ref_key)
            if ref_out is None:
                case.notes.append("reference wrote no features (see its log)")
            if case.parity_video and ref_out is not None:
                reencoded = next(iter(sorted(work.glob(f"tmp_*/**/{case.parity_video}"))), None)
                if reencoded is None:
                    ours_out = None
                    case.notes.append("no re-encoded file of the reference to compare on")
                else:
                    out = work / f"parity_{case.name}"
                    subprocess.run([sys.executable, "main.py", "--device", "cpu", "--video_paths",
                                    str(reencoded), "--on_extraction", "save_numpy",
                                    "--output_path", str(out), *case.ours, *case.parity_ours],
                                   cwd=ROOT, env=base_env, check=True, capture_output=True)
                    ours_out = find_npy(out, Path(reencoded).stem, case.ours_key)
                    case.notes.append("features compared on the reference's 25 fps re-encode")
            else:
                ours_out = find_npy(ours_runs[-1].out, stem, case.ours_key)
            med = lambda xs, f: statistics.median(f(x) for x in xs) if xs else float("nan")  # noqa: E731
            ow, rw = med(ours_ok, lambda x: x.wall), med(ref_ok, lambda x: x.wall)
            rows.append((case.name, ow, rw, rw / ow if ours_ok and ref_ok else float("nan"),
                         med(ours_ok, lambda x: x.rss_mb) / 1024, med(ref_ok, lambda x: x.rss_mb) / 1024,
                         difference(ref_out, ours_out),
                         "; ".join(case.notes + [f"{len(ours_ok)}+{len(ref_ok)} runs, load "
                                   f"{min(x.load for x in ours_runs + ref_runs):.2f}-"
                                   f"{max(x.load for x in ours_runs + ref_runs):.2f}"])))
        print()
        print("| feature | ours wall s | reference wall s | speed-up | peak RSS ours / ref GB "
              "| max feature difference (rel.), shape | notes |")
        print("|---|---|---|---|---|---|---|")
        for name, ow, rw, ratio, orss, rrss, diff, notes in rows:
            print(f"| {name} | {ow:.1f} | {rw:.1f} | {ratio:.2f}x | {orss:.2f} / {rrss:.2f} | "
                  f"{diff} | {notes} |")
        print(f"\nmedians of whole runs; speed-up = reference / ours; {os.cpu_count()} CPUs; "
              f"{Path('/proc/cpuinfo').read_text().split('model name')[1].split(':')[1].splitlines()[0].strip() if Path('/proc/cpuinfo').exists() else ''}")
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
