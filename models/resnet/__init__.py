"""Frame-wise ResNet features (torchvision's ImageNet-1k models)."""
