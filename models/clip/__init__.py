"""Frame-wise CLIP image embeddings: OpenAI's released CLIP checkpoints and open_clip's
pretrained models (LAION, SigLIP, SigLIP 2, ...), built with open_clip_torch."""
