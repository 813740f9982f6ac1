"""The model's batch format, and checks that name the bad field.

    images          [B, M, F, H, W, C] float   M media slots, F frames each (images: F = 1)
    media_mask      [B, M] bool                which slots hold media (default: all)
    input_ids       [B, T] int
    attention_mask  [B, T] {0, 1}              0 = padding (default: all 1)
    media_index     [B, T] int                 the media slot each token looks at, -1 = none

`media_index` defaults to OpenFlamingo's rule, derived from `<image>` tokens: a token
looks at the latest `<image>` at or before it. Data pipelines that need the paper's
previous/next-image association pass it explicitly.

Shape, rank and dtype checks are static and always run; checks on values run only when
the arrays are concrete (outside `jax.jit`), e.g. on the host before a batch is sharded.
"""
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.config import FlamingoConfig, ViTConfig


class FlamingoInputError(ValueError):
  """A batch the model cannot take; the message names the field."""


def media_index_from_tokens(input_ids: jax.Array, media_token_id: int) -> jax.Array:
  """index of the latest `<image>` token at or before each position (-1 before the first)."""
  return jnp.cumsum(input_ids == media_token_id, axis=-1, dtype=jnp.int32) - 1


def _concrete(x) -> bool:
  return x is not None and not isinstance(x, jax.core.Tracer)


def check_inputs(config: FlamingoConfig, images, input_ids, attention_mask=None,
                 media_mask=None, media_index=None) -> None:
  def fail(field, msg):
    raise FlamingoInputError(f"{field}: {msg}")

  if input_ids.ndim != 2:
    fail("input_ids", f"expected [batch, time], got shape {input_ids.shape}")
  if not jnp.issubdtype(input_ids.dtype, jnp.integer):
    fail("input_ids", f"expected an integer dtype, got {input_ids.dtype}")
  b, t = input_ids.shape
  if attention_mask is not None and attention_mask.shape != (b, t):
    fail("attention_mask", f"shape {attention_mask.shape} must equal input_ids' {(b, t)}")
  if media_index is not None:
    if media_index.shape != (b, t):
      fail("media_index", f"shape {media_index.shape} must equal input_ids' {(b, t)}")
    if not jnp.issubdtype(media_index.dtype, jnp.integer):
      fail("media_index", f"expected an integer dtype, got {media_index.dtype}")
  elif config.media_token_id < 0:
    fail("media_index", "not given and the config has no media_token_id to derive it from "
         "`<image>` tokens; pass media_index or set model.media_token_id")

  num_media = 0
  if images is not None:
    if images.ndim != 6:
      fail("images", f"expected [batch, media, frames, height, width, channels], got shape "
           f"{images.shape}; add the frames axis (F = 1) for still images")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      fail("images", f"expected a float dtype (normalised pixels), got {images.dtype}")
    if images.shape[0] != b:
      fail("images", f"batch {images.shape[0]} != input_ids batch {b}")
    if images.shape[-1] != 3:
      fail("images", f"expected 3 channels last (NHWC), got shape {images.shape}")
    if isinstance(config.vision, ViTConfig):
      size = config.vision.image_size
      if images.shape[3:5] != (size, size):
        fail("images", f"height/width {images.shape[3:5]} must be vision.image_size={size} "
             "(the ViT's position embeddings are fixed); resize in the input pipeline")
    num_media = images.shape[1]
    if media_mask is not None and media_mask.shape != (b, num_media):
      fail("media_mask", f"shape {media_mask.shape} must be [batch, media] = {(b, num_media)}")

  # Value checks: only on concrete (host or un-jitted) arrays.
  if media_index is None and _concrete(input_ids):
    counts = np.sum(np.asarray(input_ids) == config.media_token_id, axis=1)
    if counts.max(initial=0) > num_media:
      row = int(np.argmax(counts))
      fail("input_ids", f"row {row} has {counts[row]} <image> tokens (id {config.media_token_id}) "
           f"but images has {num_media} media slots; add slots or remove <image> tokens")
    media_index = media_index_from_tokens(np.asarray(input_ids), config.media_token_id)
  if _concrete(media_index):
    mi = np.asarray(media_index)
    if mi.size and (mi.min() < -1 or mi.max() >= num_media):
      fail("media_index", f"values must lie in [-1, {num_media}) (-1 = no media; {num_media} "
           f"media slots), got range [{mi.min()}, {mi.max()}]")
    if _concrete(media_mask) and num_media:
      mm = np.asarray(media_mask).astype(bool)
      used = np.take_along_axis(mm, np.maximum(mi, 0), axis=1) | (mi < 0)
      if not used.all():
        row, pos = map(int, np.argwhere(~used)[0])
        fail("media_index", f"token {pos} of row {row} looks at media slot {mi[row, pos]}, "
             "which media_mask marks empty")
