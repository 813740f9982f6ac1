"""Trainable embedding rows for a few new tokens inside a frozen vocabulary.

Flamingo adds `<image>` and `<|endofchunk|>` to a frozen LM, and those two rows must
learn. Making the whole [vocab, D] table trainable would cost a full-vocabulary gradient
and optimizer state; instead the rows of `token_ids` live in their own small parameters
(`new_tokens/embedding` [k, D] and, for an untied head, `new_tokens/head` [D, k]) that
replace the frozen rows on the way in and the frozen logits on the way out. The frozen
table's own rows for these ids are then unused.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.layers.linear import DEFAULT_KERNEL_INIT


class NewTokenRows(nn.Module):
  token_ids: tuple[int, ...]
  d_model: int
  tied: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    k = len(self.token_ids)
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, ("new_tokens", "embed")),
        (k, self.d_model), self.param_dtype)
    if not self.tied:
      self.head = self.param(
          "head", nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, ("embed", "new_tokens")),
          (self.d_model, k), self.param_dtype)

  def _match(self, input_ids: jax.Array) -> jax.Array:
    return (input_ids[..., None] == jnp.asarray(self.token_ids)).astype(self.dtype)  # [B, T, k]

  def embed(self, input_ids: jax.Array, x: jax.Array) -> jax.Array:
    """Replaces the frozen embeddings `x` [B, T, D] at the new tokens' positions."""
    match = self._match(input_ids)
    rows = jnp.einsum("btk,kd->btd", match, self.embedding.astype(self.dtype))
    return jnp.where(match.sum(-1, keepdims=True) > 0, rows, x)

  def logits(self, x: jax.Array, logits: jax.Array) -> jax.Array:
    """Replaces the frozen logits [B, T, V] of the new tokens."""
    head = self.embedding.T if self.tied else self.head
    new = jnp.einsum("btd,dk->btk", x, head.astype(self.dtype))
    return logits.at[..., jnp.asarray(self.token_ids)].set(new.astype(logits.dtype))


def rows_from_lm(lm_params, token_ids, tied: bool) -> dict:
  """`new_tokens` params copied from a pretrained LM's (frozen) embedding and head, so that
  the model computes exactly what the pretrained LM did before training. Numpy or jax
  arrays (sharded ones too: only the k rows are gathered)."""
  ids = np.asarray(token_ids)
  rows = {"embedding": lm_params["embed"]["embedding"][ids]}
  if not tied:
    rows["head"] = lm_params["lm_head"]["kernel"][:, ids]
  return rows


def with_rows(params: dict, config) -> dict:
  """`params` with `lm/new_tokens` filled from the frozen rows when the config trains new
  token rows and the params (e.g. a converted model saved without them) lack them."""
  if config.trainable_token_ids and "new_tokens" not in params["lm"]:
    params["lm"]["new_tokens"] = rows_from_lm(params["lm"], config.trainable_token_ids,
                                              config.lm.tie_embeddings)
  return params
