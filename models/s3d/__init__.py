"""S3D clip features (Kinetics-400): the reference tool's kylemin/S3D weights or torchvision's."""
