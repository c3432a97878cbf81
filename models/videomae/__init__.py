"""VideoMAE video transformers (Hugging Face transformers) as clip feature extractors."""
