"""OpenFlamingo-3B (mlfoundations/open_flamingo v2): CLIP ViT-L/14 + resampler + MPT-1B with
gated xattn before layer i when (i + 1) % 1 == 0. Load the released weights with
`flamingo_jax.load_openflamingo`.

  python -m flamingo_jax.summary --config configs/openflamingo_3b.py
"""
from flamingo_jax import presets
from flamingo_jax.train import config as train_config


def get_config(arg=None):
  config = train_config.defaults()
  mpt_1b = presets.mpt(d_model=2048, num_layers=24, num_heads=16, qk_norm=True)
  config.model = presets.openflamingo(mpt_1b, every=1)
  config.data = presets.openflamingo_data()
  return config
