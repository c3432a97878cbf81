"""torchvision's Kinetics-400 video models (R3D, MC3, R(2+1)D, S3D, MViT, Video Swin) as one
clip feature type: the vector each model feeds its final classifier."""
