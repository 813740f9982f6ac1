"""The update step: weighted losses over several datasets, gradients of the trainable
subtree only, accumulated over datasets and micro-batches, skipped when not finite.

Train state (a plain dict, big_vision style):
  step                 int32   updates attempted (a skipped update still counts)
  params               the trainable subtree (float32)
  opt                  optax state of `params` only
  rng                  PRNG key
  nonfinite_total      int32   updates skipped because loss or gradient were not finite
  nonfinite_in_row     int32   consecutive skipped updates (the loop stops past a limit)
  skipped_records      {dataset: int32[len(loader.SKIP_REASONS)]} records the input
                       pipeline passed over so far, by reason (summed over the global
                       batch on device: every process's records, kept across resumes)
Frozen params are a separate argument, closed over by the loss, never differentiated.
"""
import itertools
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flamingo_jax import sharding
from flamingo_jax.train import partition
from flamingo_jax.train.update_layout import UpdateLayout

BATCH_KEYS = ("images", "vision_features", "media_mask", "input_ids", "attention_mask",
              "media_index", "targets", "loss_mask")


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
  """(sum of loss_mask-weighted token NLLs, sum of loss_mask), in float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def summed_loss(model, params, batch: Mapping[str, jax.Array], rng=None) -> jax.Array:
  """The batch's loss_mask-weighted sum of token NLLs under `params` (the whole tree)."""
  logits = model.apply({"params": params}, batch.get("images"), batch["input_ids"],
                       batch.get("attention_mask"), media_mask=batch.get("media_mask"),
                       media_index=batch.get("media_index"),
                       vision_features=batch.get("vision_features"),
                       rngs={} if rng is None else {"dropout": rng})
  return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]


def vision_features(model, params, batches: Mapping[str, Mapping[str, jax.Array]]) -> dict:
  """Dataset → `Flamingo.vision_features` of its images under `params` (the whole tree):
  every dataset's images (of one size) in one call of the frozen tower, so the program
  holds one vision tower, not one per dataset. The call takes each batch shard's images of
  every dataset side by side, so the concatenation is local to each device."""
  shards = sharding.batch_shards(jax.sharding.get_abstract_mesh())
  groups = {}
  for name, batch in sorted(batches.items()):
    images = batch.get("images")
    if images is not None and images.shape[1] > 0:
      groups.setdefault((images.shape[3:], images.dtype), []).append(name)
  out = {}
  for names in groups.values():
    split = lambda n: shards if batches[n]["images"].shape[0] % shards == 0 else 1
    k = min(split(n) for n in names)  # 1 where a batch does not split (no mesh check ran)
    rows = [batches[n]["images"].reshape((k, -1) + batches[n]["images"].shape[3:]) for n in names]
    images = jnp.concatenate(rows, axis=1)
    features = model.apply({"params": params}, images.reshape((-1, 1, 1) + images.shape[2:]),
                           method=type(model).vision_features)
    features = features.reshape((k, images.shape[1]) + features.shape[3:])
    offsets = itertools.accumulate(r.shape[1] for r in rows)
    for n, r, end in zip(names, rows, offsets):
      b, m, f = batches[n]["images"].shape[:3]
      own = features[:, end - r.shape[1]:end].reshape((b, m, f) + features.shape[2:])
      out[n] = nn.with_logical_constraint(own, ("act_batch", None, None, "act_len", "act_embed"))
  return out


def init_state(params, optimizer: optax.GradientTransformation, rng,
               skip_counters: Mapping[str, int] = {}, layout=UpdateLayout()) -> dict:
  """`skip_counters`: dataset name → number of skip reasons, for datasets whose batches
  carry `skipped`; `layout`: where the optimizer state lives (update_layout.py)."""
  zero = jnp.zeros((), jnp.int32)
  return dict(step=zero, params=params, opt=optimizer.init(layout.to_update(params)), rng=rng,
              nonfinite_total=zero, nonfinite_in_row=zero,
              skipped_records={n: jnp.zeros((r,), jnp.int32) for n, r in skip_counters.items()})


def _microbatches(batch: Mapping[str, jax.Array], n: int) -> dict:
  """[B, ...] → [n, B / n, ...], micro-batch j = rows j, j + n, j + 2n, ...: each device's
  contiguous share of the batch splits in place. (Micro-batch j = rows j·B/n ... would put
  each on a few devices: an all-gather of the whole batch.)"""
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by microbatches={n}")
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
  return {k: split(v) for k, v in batch.items()}


def make_train_step(model, optimizer: optax.GradientTransformation,
                    weights: Mapping[str, float], microbatches: int = 1, learning_rate=None,
                    layout=UpdateLayout()):
  """`step(state, frozen, batches) -> (state, metrics)`; `batches` maps dataset name → batch.

  Every dataset in `batches` contributes `weight * mean token loss` to one update (the
  paper's accumulation over all datasets); pass a single dataset for round-robin.
  `learning_rate` (the optimizer's schedule) adds metric `lr`: the rate this update
  applies, at optax's count = the updates applied so far (skipped ones do not count).
  `layout` (update_layout.py; ZeRO-1: the optimizer state's): where the gradients and the
  optimizer's update are computed.
  """

  def loss_fn(trainable, frozen, batch, count, rng):
    total = summed_loss(model, partition.merge(trainable, frozen), batch, rng)
    # Divided by the whole batch's token count, so micro-batch losses add up to the mean.
    return total / jnp.maximum(count, 1.0)

  value_and_grad = jax.value_and_grad(loss_fn)

  def step(state, frozen, batches):
    params = state["params"]
    rng = jax.random.fold_in(state["rng"], state["step"])
    grads = layout.to_update(jax.tree.map(jnp.zeros_like, params))
    metrics, total_loss = {}, 0.0
    skipped_records = dict(state["skipped_records"])
    features = vision_features(model, partition.merge(params, frozen), batches)
    for i, (name, batch) in enumerate(sorted(batches.items())):
      if "skipped" in batch:
        skipped_records[name] = skipped_records[name] + jnp.sum(batch["skipped"], axis=0)
      batch = {k: v for k, v in batch.items() if k in BATCH_KEYS}
      if name in features:
        batch["vision_features"] = features[name]
      count = jnp.sum(batch["loss_mask"].astype(jnp.float32))
      weight = weights[name]

      def accumulate(carry, micro, rng=jax.random.fold_in(rng, i), count=count, weight=weight):
        g_sum, loss_sum = carry
        loss, g = value_and_grad(params, frozen, micro, count, rng)
        g = layout.to_update(g)  # ZeRO-1: reduced into the moments' layout
        return (jax.tree.map(lambda a, b: a + weight * b, g_sum, g), loss_sum + loss), None

      # Micro-batches run one after another under scan: memory of one, gradient of all.
      (grads, loss), _ = jax.lax.scan(accumulate, (grads, jnp.zeros((), jnp.float32)),
                                      _microbatches(batch, microbatches))
      metrics[f"loss/{name}"] = loss
      metrics[f"loss_tokens/{name}"] = count
      total_loss = total_loss + weight * loss

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total_loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state["opt"], layout.to_update(params))
    updates = layout.to_weights(updates, params)  # applied in the weights' layout: an all-gather
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    skipped = (~finite).astype(jnp.int32)
    new_state = dict(
        step=state["step"] + 1,
        params=keep(new_params, params),
        opt=keep(new_opt, state["opt"]),
        rng=state["rng"],
        nonfinite_total=state["nonfinite_total"] + skipped,
        nonfinite_in_row=jnp.where(finite, 0, state["nonfinite_in_row"] + 1),
        skipped_records=skipped_records,
    )
    metrics.update(loss=total_loss, grad_norm=grad_norm, skipped=skipped,
                   nonfinite_total=new_state["nonfinite_total"])
    if learning_rate is not None:
      metrics["lr"] = learning_rate(state["step"] - state["nonfinite_total"])
    return new_state, metrics

  return step
