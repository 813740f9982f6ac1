"""A tiny Flamingo that trains in seconds on a CPU: for tests and smoke runs.

  python train.py --config configs/tiny.py --workdir /tmp/tiny
  python -m flamingo_jax.summary --config configs/tiny.py
"""
from flamingo_jax.data import synthetic
from flamingo_jax.train import config as train_config


def get_config(arg=None):
  config = train_config.defaults()
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
      media_token_id=synthetic.MEDIA_TOKEN_ID,
      eoc_token_id=synthetic.EOC_TOKEN_ID,
      trainable_token_ids=(synthetic.EOC_TOKEN_ID, synthetic.MEDIA_TOKEN_ID),
  )
  config.data.synthetic = dict(source="synthetic", batch_size=8, weight=1.0)
  config.total_steps = 20
  config.log_every = 5
  config.checkpoint_every = 10
  config.optimizer.lr = 1e-3
  config.optimizer.warmup_steps = 5
  return config
