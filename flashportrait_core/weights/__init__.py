"""Model files: reading them tensor by tensor, what a file holds and where its weights go, LoRA key conversion."""
