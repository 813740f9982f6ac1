"""The update step: weighted losses over several datasets, gradients of the trainable
subtree only, accumulated over datasets and micro-batches, skipped when not finite. The
frozen vision tower runs once over every dataset's images, the resampler once over their
features (stills and clips in one call: perceiver.py), and the LM once over every
dataset's rows packed to one length (packing.py): the program holds one of each, however
many datasets.

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
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flamingo_jax import sharding
from flamingo_jax.inputs import check_inputs, media_index_from_tokens
from flamingo_jax.train import packing, partition
from flamingo_jax.train.update_layout import UpdateLayout

BATCH_KEYS = ("images", "vision_features", "media_mask", "input_ids", "attention_mask",
              "media_index", "targets", "loss_mask")


def token_nll(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """loss_mask-weighted token NLLs [B, T], in float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return nll * loss_mask.astype(jnp.float32)


def summed_loss(model, params, batch: Mapping[str, jax.Array], rng=None) -> jax.Array:
  """The batch's loss_mask-weighted sum of token NLLs under `params` (the whole tree)."""
  return summed_losses(model, params, {"": batch}, rng)[""]


def _local_shards(sizes) -> int:
  """The batch shards arrays of these leading sizes split over: the mesh's, or 1 where one
  does not divide (no mesh check ran; a sharded step checks its batches against the mesh)."""
  shards = sharding.batch_shards(jax.sharding.get_abstract_mesh())
  return shards if all(b % shards == 0 for b in sizes) else 1


def _call_side_by_side(fn, xs: Mapping[str, jax.Array], lead: int) -> dict:
  """name → `fn`'s output for `xs[name]` with its first `lead` axes flattened. Arrays of
  one (trailing shape, dtype) form a group, each batch shard's rows of every array side by
  side (a concatenation local to each device); fn: (groups [N_g, ...], shards) → [N_g, ...]
  for each group."""
  if not xs:
    return {}
  groups = {}
  for name, x in sorted(xs.items()):
    groups.setdefault((x.shape[lead:], x.dtype), []).append(name)
  groups = list(groups.values())
  shards = _local_shards([x.shape[0] for x in xs.values()])
  flat = [[xs[n].reshape((-1,) + xs[n].shape[lead:]) for n in names] for names in groups]
  ys = fn([sharding.side_by_side(f, shards) for f in flat], shards)
  out = {}
  for names, f, y in zip(groups, flat, ys):
    for n, part in zip(names, sharding.unstack_side_by_side(y, [len(x) for x in f], shards)):
      out[n] = part.reshape(xs[n].shape[:lead] + part.shape[1:])
  return out


def _lm_inputs(config, batch) -> dict:
  """One dataset's token inputs and media mask, defaults spelt out (so datasets pack)."""
  images, ids = batch.get("images"), batch["input_ids"]
  check_inputs(config, images, ids, batch.get("attention_mask"), batch.get("media_mask"),
               batch.get("media_index"))
  out = dict(input_ids=ids, targets=batch["targets"], loss_mask=batch["loss_mask"],
             attention_mask=batch.get("attention_mask", jnp.ones(ids.shape, jnp.int32)),
             media_index=batch.get("media_index", media_index_from_tokens(ids, config.media_token_id)))
  if images is not None and images.shape[1]:
    out["media_mask"] = batch.get("media_mask", jnp.ones(images.shape[:2], bool))
  return out


def _resampled(module, batches) -> dict:
  """Dataset → its media's visual tokens [B, M, L, D] (datasets with media): one resampler
  call over every dataset's media, grouped by feature shape (frames, tokens)."""
  features = {}
  for name, batch in batches.items():
    images = batch.get("images")
    if images is not None and images.shape[1]:
      f = batch.get("vision_features")
      features[name] = module.vision_features(images) if f is None else f
  return _call_side_by_side(module.resampler, features, lead=2)


def summed_losses(model, params, batches: Mapping[str, Mapping[str, jax.Array]], rng=None) -> dict:
  """Dataset → its batch's loss_mask-weighted sum of token NLLs under `params` (the whole
  tree). Every dataset's rows run in one LM call, packed to one text length
  (train/packing.py), each batch shard's rows packed locally."""
  names = sorted(batches)
  shards = _local_shards([batches[n]["input_ids"].shape[0] for n in names])

  def forward(module):
    inputs = {n: _lm_inputs(module.config, batches[n]) for n in names}
    packed, layout = packing.pack(inputs, _resampled(module, batches), shards)
    logits = module.lm_logits(packed["input_ids"], packed["attention_mask"],
                              media=packed.get("media"), media_index=packed["media_index"],
                              media_mask=packed.get("media_mask"), positions=packed["positions"],
                              segments=packed.get("segments"))
    nll = token_nll(logits, packed["targets"], packed["loss_mask"])
    return packing.sums_by_dataset(nll, layout, shards)

  return model.apply({"params": params}, method=forward, rngs={} if rng is None else {"dropout": rng})


def vision_features(model, params, batches: Mapping[str, Mapping[str, jax.Array]]) -> dict:
  """Dataset → `Flamingo.vision_features` of its images under `params` (the whole tree):
  every dataset's images (of one size) in one call of the frozen tower, so the program
  holds one vision tower, not one per dataset. The call takes each batch shard's images of
  every dataset side by side, so the concatenation is local to each device."""
  images = {n: b["images"] for n, b in batches.items()
            if b.get("images") is not None and b["images"].shape[1] > 0}
  encode = lambda x: model.apply({"params": params}, x[:, None, None],
                                 method=type(model).vision_features)[:, 0, 0]
  features = _call_side_by_side(lambda xs, _: [encode(x) for x in xs], images, lead=3)
  return {n: nn.with_logical_constraint(f, ("act_batch", None, None, "act_len", "act_embed"))
          for n, f in features.items()}


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

  def loss_fn(trainable, frozen, batches, counts, rng):
    sums = summed_losses(model, partition.merge(trainable, frozen), batches, rng)
    # Each divided by its whole batch's token count, so micro-batch losses add up to the mean.
    losses = {n: sums[n] / jnp.maximum(counts[n], 1.0) for n in sums}
    return sum(weights[n] * losses[n] for n in losses), losses

  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, frozen, batches):
    params = state["params"]
    rng = jax.random.fold_in(state["rng"], state["step"])
    grads = layout.to_update(jax.tree.map(jnp.zeros_like, params))
    metrics = {}
    skipped_records = dict(state["skipped_records"])
    features = vision_features(model, partition.merge(params, frozen), batches)
    inputs, counts = {}, {}
    for name, batch in sorted(batches.items()):
      if "skipped" in batch:
        skipped_records[name] = skipped_records[name] + jnp.sum(batch["skipped"], axis=0)
      inputs[name] = {k: v for k, v in batch.items() if k in BATCH_KEYS}
      if name in features:
        inputs[name]["vision_features"] = features[name]
      counts[name] = jnp.sum(batch["loss_mask"].astype(jnp.float32))

    def accumulate(carry, micro):
      g_sum, loss_sums = carry
      (_, micro_losses), g = value_and_grad(params, frozen, micro, counts, rng)
      g = layout.to_update(g)  # ZeRO-1: reduced into the moments' layout
      return (jax.tree.map(jnp.add, g_sum, g),
              jax.tree.map(jnp.add, loss_sums, micro_losses)), None

    # Micro-batches run one after another under scan: memory of one, gradient of all.
    zero = {n: jnp.zeros((), jnp.float32) for n in inputs}
    (grads, losses), _ = jax.lax.scan(
        accumulate, (grads, zero), {n: _microbatches(b, microbatches) for n, b in inputs.items()})
    for name in sorted(losses):
      metrics[f"loss/{name}"] = losses[name]
      metrics[f"loss_tokens/{name}"] = counts[name]
    total_loss = sum(weights[n] * losses[n] for n in sorted(losses))

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
