"""Weight import from local PyTorch / safetensors / Haiku files (never from a hub)."""
