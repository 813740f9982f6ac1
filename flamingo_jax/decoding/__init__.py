"""Decoding: the model's KV-cached decode state (state.py), the search loops (search.py,
logits_processors.py), `generate` and `score`, and prompt building (prompts.py)."""
from flamingo_jax.decoding.generate import generate
from flamingo_jax.decoding.scoring import score

__all__ = ["generate", "score"]
