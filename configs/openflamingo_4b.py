"""OpenFlamingo-4B (mlfoundations/open_flamingo v2): CLIP ViT-L/14 + resampler + RedPajama-INCITE-3B with
gated xattn before layer i when (i + 1) % 2 == 0. Load the released weights with
`flamingo_jax.load_openflamingo`.

  python -m flamingo_jax.summary --config configs/openflamingo_4b.py
"""
from flamingo_jax import presets
from flamingo_jax.train import config as train_config


def get_config(arg=None):
  config = train_config.defaults()
  config.model = presets.openflamingo(presets.redpajama_incite_3b(), every=2)
  config.data = presets.openflamingo_data()
  return config
