"""Flamingo-80B (Alayrac et al. 2022, Tables 4-5): NFNet-F6 + Perceiver Resampler + a frozen
Chinchilla-shaped LM (80 layers, d 8192) with GATED XATTN-DENSE blocks from the first
layer, every 7.

  python -m flamingo_jax.summary --config configs/flamingo_80b.py
  python train.py --config configs/flamingo_80b.py --workdir DIR          # random batches of the paper's shapes
  python train.py --config configs/flamingo_80b.py:prepared --workdir DIR \
      --config.data.m3w.path=... --config.data.m3w.tokenizer=... (the same for align, ltip, vtp)
  python train_compile.py --config configs/flamingo_80b.py --topology v4:8x8x24
"""
from flamingo_jax import presets
from flamingo_jax.train import config as train_config

# Measured with flamingo_jax.summary: total 80.69B (paper 80B), trainable 10.19B
# (paper 10B xattn + 194M resampler). Departures: the xattn FFW hidden size is 41216
# (5.0·D), not 4·D: with keys/values from the 1536-wide resampler, 4·D gives 8.4B of
# xattn where the paper states 10B; the LM's gated FFW width 24448 reproduces 70B.


def get_config(arg=None):
  config = train_config.defaults()
  config.model = presets.flamingo(d_model=8192, num_layers=80, num_heads=64,
                                  lm_mlp_dim=24448, every=7, xattn_ff_dim=41216)
  # The paper's run: 1536 TPU v4 chips, 16-way Megatron parallelism (heads and FFW over
  # `tensor`; the embeddings' vocabulary too: 32,128 rows split 16 ways), the frozen NFNet
  # data parallel over the whole mesh. That leaves 1536 / 16 = 96 batch shards, over which the paper's per-dataset
  # batches 256 / 512 / 512 / 64 do not split (a batch is split evenly over the shards).
  # We use 288 / 576 / 576 / 96: each the next multiple of 96 at or above the paper's, so
  # that no dataset's gradient gets noisier than in the paper (3 / 6 / 6 / 1 examples per
  # shard; 1536 examples an update instead of 1344, +14%; the weights λ are the paper's).
  # Optimizer state: ZeRO stage 1 as in the paper: the Adam moments split over the 96 data
  # shards (zero-padded where 96 divides no dimension), the weights replicated over data.
  # Measured with train_compile.py (README): 16.01 GiB per chip, and a device feeds
  # collectives 14.4 GiB a step, against 9.03 GiB and 21.3 GiB with fsdp 4 (weights
  # gathered every step: --config.optimizer_sharding=params --config.mesh.fsdp=4).
  config.data = presets.paper_data(arg or "random", batch_sizes=PAPER_POD_BATCH)
  config.optimizer_sharding = "zero1"
  config.mesh = dict(slice=1, data=-1, fsdp=1, tensor=16)  # on 1536 chips: data 96
  return config


PAPER_POD_BATCH = dict(m3w=288, align=576, ltip=576, vtp=96)
