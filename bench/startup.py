"""Start-up time of the command line: the median wall time of whole ``main.py`` processes that
answer without extracting anything (help, the recipe list, usage errors, and reruns that find
every input already extracted: their untimed first run extracts, with random weights).

Each case runs ``--runs`` times (after one untimed warm-up run that fills the OS file cache and
``__pycache__``), as a fresh interpreter, exactly as a user types it; the figures include the
interpreter's own start-up.

    python bench/startup.py                 # 7 runs per case
    python bench/startup.py --runs 15 --case help
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: outputs of the rerun cases, fresh for each invocation of this script
OUT = tempfile.mkdtemp(prefix="vf-startup-")


def _rerun(feature_type: str, *words: str) -> list[str]:
    return ["--feature_type", feature_type, "--video_paths", "sample/A.mp4", "--on_extraction",
            "save_numpy", "--output_path", OUT, "allow_random_weights=true", "device=cpu",
            "progress=false", *words]


#: name -> (arguments of main.py, expected exit code)
CASES = {
    "help": (["--help"], 0),
    "help resnet": (["--help", "--feature_type", "resnet"], 0),
    "list_recipes": (["--list_recipes"], 0),
    "unknown flag": (["--feature_typ", "resnet", "--video_paths", "a.mp4"], 2),
    "key=value typo": (["--feature_type", "resnet", "--video_paths", "a.mp4", "modle_name=x"], 2),
    "no feature_type": (["--video_paths", "a.mp4"], 2),
    "no inputs": (["--feature_type", "resnet"], 2),
    "finetune help": (["finetune", "--help"], 0),
    "finetune typo": (["finetune", "lrr=0.1"], 2),
    "rerun resnet": (_rerun("resnet", "extraction_fps=1"), 0),
    "rerun i3d rgb": (_rerun("i3d", "streams=rgb", "stack_size=16", "step_size=16"), 0),
    "rerun vggish": (_rerun("vggish"), 0),
}


def time_case(args: list[str], expected: int, runs: int) -> list[float]:
    cmd = [sys.executable, str(ROOT / "main.py"), *args]
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        if res.returncode != expected:
            raise SystemExit(f"{' '.join(args)}: exit code {res.returncode}, expected {expected}\n"
                             f"{res.stderr[-2000:]}")
        if i:  # the first run only warms the caches
            times.append(elapsed)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--runs", type=int, default=7, help="timed runs per case (default 7)")
    parser.add_argument("--case", nargs="+", choices=sorted(CASES), default=list(CASES),
                        help="the cases to time (default: all)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {args.runs} runs per case (median, min, max in s)")
    print(f"{'case':<18} {'median':>7} {'min':>7} {'max':>7}  command")
    for name in args.case:
        argv, expected = CASES[name]
        t = time_case(argv, expected, args.runs)
        print(f"{name:<18} {statistics.median(t):7.2f} {min(t):7.2f} {max(t):7.2f}  "
              f"main.py {' '.join(argv)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
