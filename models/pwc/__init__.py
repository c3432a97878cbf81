"""PWC-Net optical flow (sniklaus/pytorch-pwc layout), used by the I3D flow stream."""
from models.pwc.net import PWCNet, correlation

__all__ = ["PWCNet", "correlation"]
