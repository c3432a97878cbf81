"""timm image models run frame-wise (feature type ``timm``): pooled pre-logits per frame."""
