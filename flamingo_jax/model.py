"""Flamingo: frozen vision encoder → Perceiver Resampler → frozen LM with gated xattn.

The call is split so decoding can reuse work: `encode_media` runs once per set of
images, `lm_logits` runs the LM over tokens given the resampled visual tokens (a forward
pass, or a decoding step through the KV cache). `__call__` is both, for training.
"""
import dataclasses

import flax.linen as nn
import jax

from flamingo_jax import sharding, vision
from flamingo_jax.config import FlamingoConfig
from flamingo_jax.inputs import check_inputs, media_index_from_tokens
from flamingo_jax.layers.attention import SelfAttentionInputs
from flamingo_jax.lm.decoder import DecoderLM
from flamingo_jax.perceiver import PerceiverResampler


class Flamingo(nn.Module):
  config: FlamingoConfig

  def setup(self):
    c = self.config
    kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype)
    self.vision = vision.build(c.vision, **kw)
    self.resampler = PerceiverResampler(c.resampler, c.remat_policy, **kw)
    self.lm = DecoderLM(c)

  def vision_features(self, images: jax.Array) -> jax.Array:
    """images [B, M, F, H, W, C] → the vision tower's features [B, M, F, V, D], computed
    data parallel over the whole mesh (sharding.data_parallel: `tensor` too), then laid
    out for the resampler and LM (the batch over the batch axes)."""
    b, m, f = images.shape[:3]
    features = sharding.data_parallel(self.vision, images.reshape((b * m * f,) + images.shape[3:]),
                                      chunk=self.config.vision_chunk)
    # The vision tower is frozen: no gradient flows into it, whatever the optimizer mask.
    features = jax.lax.stop_gradient(features.reshape((b, m, f) + features.shape[1:]))
    return nn.with_logical_constraint(features, ("act_batch", None, None, "act_len", "act_embed"))

  def encode_media(self, images: jax.Array | None, vision_features=None) -> jax.Array | None:
    """images [B, M, F, H, W, C] → visual tokens [B, M, num_latents, D] (None without
    media), from `vision_features` when given (computed beforehand)."""
    if images is None or images.shape[1] == 0:
      return None
    return self.resampler(self.vision_features(images) if vision_features is None else vision_features)

  def lm_logits(self, input_ids, attention_mask=None, *, media=None, media_index=None,
                media_mask=None, positions=None, segments=None,
                cached: SelfAttentionInputs | None = None, logits_at=None) -> jax.Array:
    """Logits [B, T or K, vocab] given resampled `media` [B, M, L, D] (None: text only, or
    decoding after the prompt); `segments`, `cached` and `logits_at` as in `DecoderLM`."""
    if media_index is None:
      media_index = media_index_from_tokens(input_ids, self.config.media_token_id)
    return self.lm(input_ids, attention_mask, media=media, media_index=media_index,
                   media_mask=media_mask, positions=positions, segments=segments,
                   cached=cached, logits_at=logits_at)

  def __call__(self, images, input_ids, attention_mask=None, *, media_mask=None,
               media_index=None, positions=None, cached: SelfAttentionInputs | None = None,
               logits_at=None, vision_features=None) -> jax.Array:
    """Logits [B, T, vocab]. `images` may be None (or have M = 0) for text-only batches.
    `vision_features`: `vision_features(images)` computed beforehand (the train step runs
    the frozen tower once over every dataset's images); `images` are then only checked."""
    check_inputs(self.config, images, input_ids, attention_mask, media_mask, media_index)
    media = self.encode_media(images, vision_features)
    return self.lm_logits(input_ids, attention_mask, media=media, media_index=media_index,
                          media_mask=media_mask, positions=positions, cached=cached,
                          logits_at=logits_at)


def unscanned(model: Flamingo, params: dict) -> tuple[Flamingo, dict]:
  """(model, params) in the layout that decodes fastest: `scan_layers=False`, the LM's
  stacked groups split per group (FlamingoConfig.scan_layers). The split copies the LM's
  weights: call it right after loading and drop the scanned params."""
  if not model.config.scan_layers:
    return model, params
  from flamingo_jax.lm.decoder import unstack_groups
  params = dict(params)
  params["lm"] = unstack_groups(params.pop("lm"))
  return Flamingo(dataclasses.replace(model.config, scan_layers=False)), params
