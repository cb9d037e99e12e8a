"""Checkpoint loading: GGUF files and Hugging Face folders into one Checkpoint type."""
