"""Demo: a tiny Flamingo learns a few-shot task in context, on a CPU, in minutes.

  python train.py --config configs/demo.py --workdir /tmp/flamingo_demo

Episodes of coloured shapes (flamingo_jax/data/synthetic.py): each episode's hidden rule
decides whether the answer names the colour or the shape, and only the in-context
examples reveal it. With 0 shots a model can at best guess the attribute; with 4 it can
read the rule. The run ends with the held-out accuracy at 0 and 4 shots (answers ranked
by log-likelihood) in WORKDIR/demo_results.json and the loss curve in WORKDIR/loss.png.

No pretrained weights exist offline, so the LM trains from scratch here together with the
resampler and xattn blocks; the vision tower stays frozen (random), as does every vision
tower in Flamingo. Measured on this project's 2-core CPU machine (shared), 1200 steps:
3 minutes, 0-shot 0.447, 4-shot 0.615, chance 0.125.
"""
from flamingo_jax.data import synthetic
from flamingo_jax.train import config as train_config


def get_config(arg=None):
  config = train_config.defaults()
  config.model = dict(
      vision=dict(kind="vit", image_size=32, patch_size=16, width=256, depth=1, num_heads=4,
                  mlp_dim=512, activation="gelu"),
      resampler=dict(depth=2, num_heads=4, head_dim=16, num_latents=8, ff_mult=2,
                     activation="squared_relu", max_frames=1, dim=64),
      lm=dict(family="llama", vocab_size=synthetic.VOCAB_SIZE, d_model=64, num_layers=4,
              num_heads=4, num_kv_heads=4, mlp_dim=128, activation="silu",
              tie_embeddings=False, max_seq_len=16),
      xattn=dict(every=1, placement="first", num_heads=4, head_dim=16, ff_mult=2,
                 activation="squared_relu"),
      media_token_id=synthetic.MEDIA_TOKEN_ID,
      eoc_token_id=synthetic.EOC_TOKEN_ID,
  )
  config.trainable = ("resampler/.*", "lm/.*")
  config.data.fewshot = dict(
      source="synthetic", batch_size=32, weight=1.0,
      task=dict(image_size=32, max_shots=4, train_min_shots=0, min_radius=0.34,
                max_radius=0.42, max_shift=0.08, noise_std=0.04))
  config.total_steps = 1200
  config.log_every = 50
  config.checkpoint_every = 600
  config.optimizer.lr = 5e-3
  config.optimizer.warmup_steps = 50
  config.eval = dict(kind="synthetic_fewshot", dataset="fewshot", shots=(0, 4), episodes=512)
  return config
