"""Optical flow as the output (feature types raft and pwc)."""
