"""The command line (``video-features`` once installed, ``python main.py`` in a checkout):
parse options, run the extraction, exit with its status.

Exit codes: 0 every input done (or skipped as already done), 1 some input failed,
2 the run could not start (invalid option, missing weights, no device).
"""
from __future__ import annotations

import logging
import os
import sys

from video_features.utils.errors import FeatureError


def main(argv: list[str] | None = None) -> int:
    """Help, the recipe list and usage errors answer without importing torch or any model
    library (utils/config.py reads the feature types' options from models/options_index.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["finetune"]:
        from video_features.finetune_options import main as finetune

        return finetune(argv[1:])
    if argv[:1] == ["check"]:
        from video_features.check import main as check

        return check(argv[1:])
    if argv[:1] == ["report"]:
        from video_features.report import main as report

        return report(argv[1:])
    if "--list_recipes" in argv:
        from video_features.utils.recipes import describe_recipes

        print(describe_recipes(), end="")
        return 0
    from video_features.utils.config import parse_configs
    from video_features.utils.runner import configure_logging, run

    configure_logging("info")
    try:
        cfgs = parse_configs(argv)
        configure_logging(cfgs[0].log_level)
        summary = run(cfgs)
    except FeatureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; rerun to complete the rest", file=sys.stderr)
        return 130
    print(summary.text(), file=sys.stderr)
    logging.shutdown()
    return summary.exit_code


def entry() -> None:
    """The installed command and main.py: :func:`main`, then the process ends at once. Every
    output is written and closed, and every worker process joined, when ``main`` returns; the
    interpreter's own teardown (freeing torch's and the model libraries' state) took another
    0.6 s of every run. A run that used Ray, or that left a child process (e.g. a data loader's
    worker), exits normally: Ray's exit handler stops the local Ray instance it started, and
    multiprocessing's ends the children."""
    code = main()
    import multiprocessing

    if "ray" in sys.modules or multiprocessing.active_children():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
