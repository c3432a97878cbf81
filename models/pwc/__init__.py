"""PWC-Net optical flow (sniklaus/pytorch-pwc layout), used by the I3D flow stream."""
from video_features.models.pwc.net import PWCNet, correlation

__all__ = ["PWCNet", "correlation"]
