"""I3D (two-stream Inflated 3D ConvNet): network, checkpoints and labels."""
