"""R(2+1)D-18 clip features (torchvision, Kinetics-400)."""
