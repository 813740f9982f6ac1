"""Tiny random Flamingo models of every LM family for the decoding tests."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from config_files import load_config
from flamingo_jax.config import FlamingoConfig
from flamingo_jax.model import Flamingo

LM = {
    # GQA and llama3 RoPE scaling.
    "llama": dict(family="llama", num_kv_heads=2, tie_embeddings=False,
                  rope_scaling=dict(kind="llama3", factor=4.0, original_max_position=16)),
    # ALiBi with a non-power-of-two head count, QK LayerNorm, tied head.
    "mpt": dict(family="mpt", num_heads=6, head_dim=8, num_kv_heads=0, activation="gelu", qk_norm=True,
                tie_embeddings=True, alibi_bias_max=8.0),
    # Partial rotary, biases, parallel residual.
    "gpt_neox": dict(family="gpt_neox", num_kv_heads=0, rotary_pct=0.5, use_bias=True,
                     activation="gelu", tie_embeddings=False),
}
# 5 layers, a block every 2: two scanned groups and a one-layer tail.
CASES = [(family, placement) for family in LM for placement in ("first", "last")]


def make_config(family, placement, **overrides) -> FlamingoConfig:
  model = load_config("tiny").model.to_dict()
  model["lm"].update(num_layers=5, **LM[family])
  model["xattn"].update(every=2, placement=placement)
  model.update(overrides)
  return FlamingoConfig.from_dict(model)


def batch(config, seed=0):
  """Two left-padded rows of different lengths, each with two `<image>` tokens."""
  img = config.media_token_id
  rng = np.random.default_rng(seed)
  words = lambda n: list(rng.integers(10, 200, n))
  rows = [words(2) + [img] + words(3) + [img] + words(4),  # 11 tokens
          [img] + words(2) + [img] + words(3)]  # 7 tokens
  t = max(map(len, rows))
  ids = np.zeros((2, t), np.int32)
  mask = np.zeros((2, t), np.int32)
  for i, r in enumerate(rows):
    ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
  images = rng.normal(size=(2, 2, 1, 32, 32, 3)).astype(np.float32)
  return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(images)


@functools.lru_cache(maxsize=None)
def model_and_params(config):
  model = Flamingo(config)
  ids, mask, images = batch(config)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, ids, mask))["params"]
  # Open gates, so the xattn blocks matter.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, 0.8) if p[-1].key.endswith("_gate") else x, params)
  return model, params
