"""Model architectures, keeping Hugging Face parameter names."""
