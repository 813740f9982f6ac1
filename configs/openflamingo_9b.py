"""OpenFlamingo-9B (mlfoundations/open_flamingo v2): CLIP ViT-L/14 + resampler + MPT-7B with
gated xattn before layer i when (i + 1) % 4 == 0. Load the released weights with
`flamingo_jax.load_openflamingo`.

  python -m flamingo_jax.summary --config configs/openflamingo_9b.py
"""
from flamingo_jax import presets
from flamingo_jax.train import config as train_config


def get_config(arg=None):
  config = train_config.defaults()
  mpt_7b = presets.mpt(d_model=4096, num_layers=32, num_heads=32)
  config.model = presets.openflamingo(mpt_7b, every=4)
  config.data = presets.openflamingo_data()
  return config
