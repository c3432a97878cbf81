"""Side-by-side numeric check against a local checkout of v-iashin/video_features.

Both tools get the same random weights (written here in the reference's checkpoint layouts) and
the same video; the script prints shapes, timestamps and feature differences.  The reference runs
in a subprocess with its checkout as the working folder; it needs ``omegaconf`` importable (pass
``--reference_pythonpath`` for an extra site folder) and its own Python packages.

    python bench/compare_reference.py --reference_dir /path/to/video_features \
        --video sample/A.mp4 --features i3d resnet50

Only the reference's public extractor classes are called; nothing of it is copied here.  For I3D
the random file is placed at the path the reference loads (``models/i3d/checkpoints/i3d_rgb.pt``,
an existing file there is moved aside and restored afterwards); for ResNet-50 it is put in a
private torch hub cache under torchvision's file name.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_REF_DRIVER = textwrap.dedent("""
    import sys, time, numpy as np
    from omegaconf import OmegaConf
    kind, video, out = sys.argv[1:4]
    if kind == 'i3d':
        from video_features.models.i3d.extract_i3d import ExtractI3D as X
        over = dict(streams='rgb', stack_size=int(sys.argv[4]), step_size=int(sys.argv[5]))
        cfg, key = 'configs/i3d.yml', 'rgb'
    else:
        from video_features.models.resnet.extract_resnet import ExtractResNet as X
        over = dict(model_name='resnet50', batch_size=1)
        cfg, key = 'configs/resnet.yml', 'resnet'
    over.update(device='cpu', on_extraction='print')
    args = OmegaConf.merge(OmegaConf.load(cfg), OmegaConf.create(over))
    ex = X(args)
    t = time.perf_counter()
    d = ex.extract(video)
    print('reference extract seconds: %.2f' % (time.perf_counter() - t))
    np.savez(out, feats=d[key], ts=d['timestamps_ms'])
""")


def _compare(name: str, ref: np.ndarray, ref_ts: np.ndarray, ours: np.ndarray,
             ours_ts: np.ndarray) -> None:
    print(f"== {name}")
    print(f"shapes: reference {ref.shape}, ours {ours.shape}")
    print(f"timestamps equal: {ref_ts.shape == ours_ts.shape and np.array_equal(ref_ts, ours_ts)}")
    if ref.shape != ours.shape:
        return
    ref = ref.astype(np.float64)
    diff = np.abs(ref - ours.astype(np.float64))
    scale = np.abs(ref).max()
    rel_rows = np.linalg.norm(ref - ours, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-12)
    print(f"max abs diff {diff.max():.3e} (max |ref| {scale:.3e}, ratio {diff.max() / scale:.3e})")
    print(f"relative L2 per row: max {rel_rows.max():.3e}, median {np.median(rel_rows):.3e}")


def _run_reference(ref_dir: Path, kind: str, video: str, out: Path, env: dict,
                   extra: list[str]) -> dict:
    driver = out.with_suffix(".py")
    driver.write_text(_REF_DRIVER)
    subprocess.run([sys.executable, str(driver), kind, video, str(out), *extra],
                   cwd=ref_dir, env=env, check=True)
    d = np.load(out)
    return {"feats": d["feats"], "ts": d["ts"]}


def _run_ours(args_list: list[str], env: dict) -> None:
    subprocess.run([sys.executable, "main.py", *args_list], cwd=ROOT, env=env, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference_dir", required=True, type=Path)
    p.add_argument("--reference_pythonpath", default="",
                   help="extra folders (os.pathsep separated) for the reference's imports")
    p.add_argument("--video", default=str(ROOT / "sample" / "A.mp4"))
    p.add_argument("--features", nargs="+", default=["i3d"], choices=["i3d", "resnet50"])
    p.add_argument("--stack_size", type=int, default=16)
    p.add_argument("--step_size", type=int, default=16)
    a = p.parse_args()

    sys.path.insert(0, str(ROOT))
    ref_dir = a.reference_dir.resolve()
    video = str(Path(a.video).resolve())
    stem = Path(video).stem
    work = Path(tempfile.mkdtemp(prefix="cmp_ref_"))
    base_env = dict(os.environ, VIDEO_FEATURES_OFFLINE="1", TORCH_HOME=str(work / "torch_home"))
    ref_env = dict(base_env, PYTHONPATH=os.pathsep.join(
        x for x in [str(ref_dir), a.reference_pythonpath] if x))
    try:
        if "i3d" in a.features:
            from video_features.models.i3d.weights import write_random_checkpoint
            ckpt = work / "i3d_rgb_random.pt"
            write_random_checkpoint(str(ckpt), "video_features", "rgb", 400)
            target = ref_dir / "models" / "i3d" / "checkpoints" / "i3d_rgb.pt"
            backup = target.with_name(target.name + ".cmp_backup")
            if target.exists():
                target.replace(backup)
            try:
                shutil.copyfile(ckpt, target)
                ref = _run_reference(ref_dir, "i3d", video, work / "ref_i3d.npz", ref_env,
                                     [str(a.stack_size), str(a.step_size)])
            finally:
                target.unlink(missing_ok=True)
                if backup.exists():
                    backup.replace(target)
            out = work / "ours_i3d"
            _run_ours(["--feature_type", "i3d", "--device", "cpu", "--video_paths", video,
                       "streams=[rgb]", f"stack_size={a.stack_size}", f"step_size={a.step_size}",
                       f"checkpoint_path_rgb={ckpt}", "--on_extraction", "save_numpy",
                       "--output_path", str(out), "--input_root", str(Path(video).parent)],
                      base_env)
            found = {f.name: f for f in out.rglob("*.npy")}
            _compare("i3d rgb", ref["feats"], ref["ts"], np.load(found[f"{stem}_rgb.npy"]),
                     np.load(found[f"{stem}_timestamps_ms.npy"]))
        if "resnet50" in a.features:
            from video_features.models.resnet.weights import write_random_checkpoint as write_resnet
            ckpt = work / "torch_home" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
            write_resnet(ckpt, "resnet50")
            ref = _run_reference(ref_dir, "resnet", video, work / "ref_resnet.npz", ref_env, [])
            out = work / "ours_resnet"
            _run_ours(["--feature_type", "resnet", "--device", "cpu", "--video_paths", video,
                       "model_name=resnet50", f"checkpoint_path={ckpt}", "--on_extraction",
                       "save_numpy", "--output_path", str(out),
                       "--input_root", str(Path(video).parent)], base_env)
            found = {f.name: f for f in out.rglob("*.npy")}
            _compare("resnet50", ref["feats"], ref["ts"], np.load(found[f"{stem}_resnet.npy"]),
                     np.load(found[f"{stem}_timestamps_ms.npy"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
