"""Dual TV-L1 optical flow (an iterative solver, no weights), used by the I3D flow stream, the
flow outputs and fine-tuning."""
from video_features.models.tvl1.net import TVL1, TVL1Params

__all__ = ["TVL1", "TVL1Params"]
