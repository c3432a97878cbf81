"""video_features: deep features from videos (I3D, R(2+1)D, ResNet, VGGish, CLIP, ...).

The modules live in ``video_features.models`` (feature types and networks) and
``video_features.utils`` (configuration, decoding, pipeline, outputs). In a checkout they are
the repository's top-level ``models/`` and ``utils/`` folders, which this package spans; an
installed copy holds them inside the package, so nothing named ``models`` or ``utils`` is
installed at the top level.

Python API (see README): ``extract(paths, feature_type=..., **options)`` and
:class:`FeatureExtractor`.
"""
from __future__ import annotations

from pathlib import Path

_here = Path(__file__).resolve().parent
if not (_here / "utils").is_dir() and (_here.parent / "utils" / "config.py").is_file():
    __path__.append(str(_here.parent))  # a checkout: the package spans the repository root

from video_features.utils import __version__  # noqa: E402  (one place for it)


def __getattr__(name: str):  # the API imports torch: only when it is used
    if name in ("extract", "FeatureExtractor"):
        from video_features import api

        return getattr(api, name)
    raise AttributeError(name)
