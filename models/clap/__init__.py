"""CLAP audio embeddings (LAION CLAP through Hugging Face transformers)."""
