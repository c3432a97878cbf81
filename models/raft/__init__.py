"""RAFT optical flow (princeton-vl/RAFT layout), used by the I3D flow stream."""
from video_features.models.raft.net import RAFT

__all__ = ["RAFT"]
