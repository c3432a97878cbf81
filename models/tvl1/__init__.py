"""Dual TV-L1 optical flow (an iterative solver, no weights), used by the I3D flow stream, the
flow outputs and fine-tuning. ``TVL1`` and ``TVL1Params`` are imported from ``net`` on first use,
so that reading the ``tvl1_*`` options (``options``) does not import torch."""
from __future__ import annotations

from typing import Any

__all__ = ["TVL1", "TVL1Params"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from video_features.models.tvl1 import net

        return getattr(net, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
