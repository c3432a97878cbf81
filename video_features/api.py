"""Python API: features as arrays, with the command line's options and defaults.

    import video_features as vf

    feats = vf.extract("a.mp4", feature_type="resnet", extraction_fps=1)   # one dict of arrays
    for out in vf.extract(["a.mp4", "b.mp4"], feature_type="clip"):       # an iterator
        print(out["path"], out.get("clip", out.get("error")))

    ex = vf.FeatureExtractor("i3d", device="cuda", stack_size=16, step_size=4)  # models stay loaded
    rgb = ex("a.mp4")["rgb"]

Options are those of ``python main.py`` (configs/<feature_type>.yml, checked the same way, so
an invalid value is a ConfigError naming the option); the extractor is built and run through the
same code as a command-line worker. Outputs are returned, not saved: use the command line (or
``video_features.utils.runner.run``) to write files with records and resuming.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Iterator

import numpy as np

from video_features.utils.config import Config, make_config
from video_features.utils.errors import FeatureError

log = logging.getLogger(__name__)

#: the input list of the configuration an API extractor is validated with; inputs come per call
_NO_INPUTS = ["<given per call>"]


class FeatureExtractor:
    """One feature type with its models loaded once, for any number of inputs."""

    def __init__(self, feature_type: str, **options: Any) -> None:
        from video_features.utils.record import run_record
        from video_features.utils.runner import build_extractor

        options.setdefault("progress", False)
        self.cfg: Config = make_config(feature_type, video_paths=_NO_INPUTS, **options)
        run_record(self.cfg)  # the same up-front weight check as a run: missing weights fail here
        device = "cpu" if self.cfg.device == "cpu" else f"cuda:{self.cfg.device_ids[0]}"
        self.extractor = build_extractor(self.cfg, device)

    @property
    def feature_type(self) -> str:
        return self.cfg.feature_type

    def __call__(self, path: str | os.PathLike) -> dict[str, np.ndarray]:
        """The outputs of one input (video, frame folder, audio file) as arrays; raises a
        FeatureError (VideoError for a bad input) with a one-line reason."""
        return self.extractor.extract(os.fspath(path))

    def iter(self, paths: Iterable[str | os.PathLike]) -> Iterator[dict[str, Any]]:
        """One dict per input, in order: its arrays and ``path``, or ``path`` and ``error`` (the
        one-line reason) for an input that failed; a bad input never stops the others."""
        for path in paths:
            path = os.fspath(path)
            try:
                out = self(path)
            except FeatureError as exc:
                log.warning("failed: %s: %s", path, exc)
                yield {"path": path, "error": str(exc)}
                continue
            yield {"path": path, **out}


def extract(paths: str | os.PathLike | Iterable[str | os.PathLike], feature_type: str,
            **options: Any) -> dict[str, np.ndarray] | Iterator[dict[str, Any]]:
    """Features of one input (a dict of arrays) or of several (an iterator of dicts, see
    :meth:`FeatureExtractor.iter`), with the options of the command line."""
    extractor = FeatureExtractor(feature_type, **options)
    if isinstance(paths, (str, os.PathLike)):
        return extractor(paths)
    return extractor.iter(paths)
