"""OpenFlamingo-3B (mlfoundations/open_flamingo v2): CLIP ViT-L/14 + resampler + MPT-1B with
gated xattn before layer i when (i + 1) % 1 == 0. Load the released weights with
`flamingo_jax.load_openflamingo`.

  python -m flamingo_jax.summary --config configs/openflamingo_3b.py
"""
import ml_collections

from flamingo_jax import presets, trainable


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.model = dict(
      vision=presets.clip_vit_l14(),
      resampler=presets.openflamingo_resampler(),
      lm=presets.mpt(d_model=2048, num_layers=24, num_heads=16, qk_norm=True),
      xattn=presets.openflamingo_xattn(every=1),
      media_token_id=presets.OPENFLAMINGO_MEDIA_TOKEN_ID,
      eoc_token_id=presets.OPENFLAMINGO_EOC_TOKEN_ID,
      trainable_token_ids=(presets.OPENFLAMINGO_EOC_TOKEN_ID, presets.OPENFLAMINGO_MEDIA_TOKEN_ID),
      dtype="bfloat16",
      remat_policy="full",
  )
  config.trainable = trainable.DEFAULT_TRAINABLE
  return config
