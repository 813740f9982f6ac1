"""Demo: a tiny Flamingo learns in-context on CPU (draft; numbers to be measured)."""
import ml_collections

from flamingo_jax.data import synthetic


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.model = dict(
      vision=dict(kind="vit", image_size=32, patch_size=4, width=64, depth=1, num_heads=2,
                  mlp_dim=128, activation="gelu"),
      resampler=dict(depth=2, num_heads=4, head_dim=16, num_latents=8, ff_mult=2,
                     activation="squared_relu", max_frames=1),
      lm=dict(family="llama", vocab_size=synthetic.VOCAB_SIZE, d_model=64, num_layers=2,
              num_heads=4, num_kv_heads=4, mlp_dim=128, activation="silu",
              tie_embeddings=False, max_seq_len=16),
      xattn=dict(every=1, placement="first", num_heads=4, head_dim=16, ff_mult=2,
                 activation="squared_relu"),
      media_token_id=synthetic.MEDIA_TOKEN_ID,
      eoc_token_id=synthetic.EOC_TOKEN_ID,
  )
  config.trainable = ("resampler/.*", "lm/.*")
  config.total_steps = 1000
  config.batch_size = 32
  config.lr = 3e-3
  config.warmup_steps = 50
  config.seed = 0
  config.log_every = 50
  config.checkpoint_every = 500
  config.eval_episodes = 512
  return config
