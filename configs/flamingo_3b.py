"""Flamingo-3B (Alayrac et al. 2022, Tables 4-5): NFNet-F6 + Perceiver Resampler + a frozen
Chinchilla-shaped LM (24 layers, d 2048) with GATED XATTN-DENSE blocks from the first
layer, every 1.

  python -m flamingo_jax.summary --config configs/flamingo_3b.py
  python train.py --config configs/flamingo_3b.py --workdir DIR          # random batches of the paper's shapes
  python train.py --config configs/flamingo_3b.py:prepared --workdir DIR \
      --config.data.m3w.path=... --config.data.m3w.tokenizer=... (the same for align, ltip, vtp)
  python train_compile.py --config configs/flamingo_3b.py --topology v4:4x4x4
"""
from flamingo_jax import presets
from flamingo_jax.train import config as train_config

# Measured with flamingo_jax.summary: total 3.233B (paper 3.2B), trainable 1.395B
# (paper 1.2B xattn + 194M resampler). Departures: the xattn FFW hidden size is 8832
# (4.3·D), not 4·D = 8192: with the stated heads and widths 4·D gives 1.16B of xattn and a
# trainable total 5% under the paper's; the LM's gated FFW width 5888 reproduces 1.4B.


def get_config(arg=None):
  config = train_config.defaults()
  config.model = presets.flamingo(d_model=2048, num_layers=24, num_heads=16,
                                  lm_mlp_dim=5888, every=1, xattn_ff_dim=8832)
  config.data = presets.paper_data(arg or "random")
  return config
