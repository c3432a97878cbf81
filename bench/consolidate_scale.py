"""How long moving staged inputs into a consolidated output takes, and how long a rerun's
planning takes to find them, for each format.

Stages ``--inputs`` inputs (100 x 512 float32 features, fps and timestamps, as a worker writes
them) under ``--root``, moves them in as a run does (``consolidate`` every 64 inputs, then a final
one), then judges every input done as a rerun's planning does (a fresh writer, ``state``).

    python bench/consolidate_scale.py --inputs 5000 --root /tmp/cscale
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from video_features.utils import consolidate
    from video_features.utils.output import OutputWriter

    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=5000)
    ap.add_argument("--root", default="/tmp/cscale")
    ap.add_argument("--modes", default="save_hdf5,save_webdataset,save_parquet")
    args = ap.parse_args()
    root = Path(args.root)
    x = np.random.default_rng(0).standard_normal((100, 512)).astype(np.float32)
    ts = np.stack([np.arange(100) * 40.0, np.arange(1, 101) * 40.0], 1)
    feats = {"resnet": x, "fps": np.array(25.0), "timestamps_ms": ts}
    keys = list(feats)
    for mode in args.modes.split(","):
        shutil.rmtree(root, ignore_errors=True)
        out = root / "out"
        paths = [str(root / "in" / f"d{i // 1000:03d}" / f"v{i}.mp4") for i in range(args.inputs)]

        def writer() -> OutputWriter:
            return OutputWriter(mode, str(out), "resnet", str(root / "in"),
                                {"feature_type": "resnet"}, shard_size=1000)

        w = writer()
        stage = move = 0.0
        for start in range(0, len(paths), 64):
            t = time.perf_counter()
            for p in paths[start:start + 64]:
                w.write(p, feats)
            stage += time.perf_counter() - t
            t = time.perf_counter()
            consolidate.consolidate(w, final=False)
            move += time.perf_counter() - t
        t = time.perf_counter()
        consolidate.consolidate(w, final=True)
        move += time.perf_counter() - t
        getattr(consolidate, "_Store", object).__dict__.get("_cache", {}).clear()   # cold
        t = time.perf_counter()
        fresh = writer()
        done = sum(fresh.state(p, keys).status == "done" for p in paths)
        plan = time.perf_counter() - t
        t = time.perf_counter()
        getattr(fresh, "refresh", lambda: None)()
        again = sum(fresh.state(p, keys).status == "done" for p in paths[:100])
        refresh = time.perf_counter() - t
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"{mode:16s} {args.inputs} inputs: staging {stage:6.1f} s, moving in {move:6.1f} s "
              f"({args.inputs / move:6.0f} inputs/s), rerun planning {plan:5.1f} s "
              f"({done} done), refresh + 100 lookups {refresh * 1000:5.0f} ms ({again} done), "
              f"{size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
