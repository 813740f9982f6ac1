"""A tiny Flamingo that runs in seconds on a CPU: for tests and smoke runs.

  python -m flamingo_jax.summary --config configs/tiny.py
"""
import ml_collections

from flamingo_jax import trainable


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.model = dict(
      vision=dict(kind="vit", image_size=32, patch_size=8, width=32, depth=2, num_heads=2,
                  mlp_dim=64, activation="gelu"),
      resampler=dict(depth=2, num_heads=2, head_dim=16, num_latents=8, ff_mult=2,
                     activation="squared_relu", max_frames=4),
      lm=dict(family="llama", vocab_size=256, d_model=64, num_layers=4, num_heads=4,
              num_kv_heads=2, mlp_dim=128, activation="silu", tie_embeddings=False,
              max_seq_len=128),
      xattn=dict(every=2, placement="first", num_heads=2, head_dim=16, ff_mult=2,
                 activation="squared_relu"),
      media_token_id=255,
      eoc_token_id=254,
      trainable_token_ids=(254, 255),
  )
  config.trainable = trainable.DEFAULT_TRAINABLE
  return config
