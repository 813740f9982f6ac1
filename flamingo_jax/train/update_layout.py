"""Where a train step's gradients, optimizer state and update live.

By default the weights' own layout. Under ZeRO-1 (config.optimizer_sharding='zero1') each
trainable leaf is also split over the batch axes its weight does not use
(`sharding.zero1`): the step reduces the gradients into that layout, the optimizer
updates its shards there, and the new weights are all-gathered back into their own
layout. A leaf none of whose dimensions divides those axes (every power-of-two dimension
under a data axis of 96) is zero-padded at the end of one dimension the weight does not
split (so the weights' shards keep their boundaries): the padding has
zero gradient, zero moments and zero weight decay, so the update is the unpadded one, and
a checkpoint restores under another mesh's padding (checkpoint.py: orbax pads or
truncates array ends).
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from flamingo_jax import sharding


@dataclasses.dataclass(frozen=True)
class UpdateLayout:
  """`abstract`: over the trainable subtree, ShapeDtypeStructs of each leaf's (padded)
  shape with its sharding; None for the weights' own layout (then both maps are the
  identity)."""
  abstract: Any = None

  def to_update(self, tree):
    """Weights' layout → update layout (zero-padded, then constrained)."""
    if self.abstract is None:
      return tree

    def pad(x, target):
      if x.shape != target.shape:
        x = jnp.pad(x, [(0, n - m) for m, n in zip(x.shape, target.shape)])
      return jax.lax.with_sharding_constraint(x, target.sharding)
    return jax.tree.map(pad, tree, self.abstract)

  def to_weights(self, tree, weights):
    """Update layout → the shapes of `weights` (the padding dropped); the caller's output
    shardings put them back into the weights' layout."""
    if self.abstract is None:
      return tree
    return jax.tree.map(lambda x, w: x[tuple(slice(n) for n in w.shape)], tree, weights)

  def opt_shardings(self, optimizer: optax.GradientTransformation, shardings):
    """The optimizer state's shardings: `shardings` (each parameter-shaped leaf as its
    parameter) with the parameter-shaped subtrees in this layout."""
    if self.abstract is None:
      return shardings
    layout = jax.tree.map(lambda x: x.sharding, self.abstract)
    return optax.tree_map_params(optimizer, lambda _, s: s, shardings, layout,
                                 transform_non_params=lambda s: s)


def zero1(shardings, abstract) -> UpdateLayout:
  """ZeRO-1 over trainable `shardings` (NamedShardings) of leaves shaped as `abstract`."""
  def one(s, x):
    s, shape = sharding.zero1(s, x.shape)
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=s)
  return UpdateLayout(jax.tree.map(one, shardings, abstract))
