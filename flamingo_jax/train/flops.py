"""Training FLOPs that know what is frozen, and MFU.

Each component's forward FLOPs come from XLA's cost model on the real model (scans
unrolled, see layers/scan.py), at the real batch shapes. A training step then costs

    vision      1 × forward     frozen and stop-gradient: no backward at all
    resampler   3 × forward     if it trains (forward + activation and weight gradients)
    xattn       3 × forward     (forward with xattn minus the bare LM's forward)
    lm          2 × forward     frozen: forward + activation gradient, no weight gradient
                                (3 × if some of its layers train; 1 × if nothing upstream does)

summed over the datasets of one update. MFU = that / (step time × devices × peak).
"""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax import trainable as trainable_rule
from flamingo_jax.layers.scan import unrolled
from flamingo_jax.lm.decoder import DecoderLM
from flamingo_jax.summary import abstract_params, component

# Dense bf16 peak FLOP/s per chip, by a substring of `jax.devices()[0].device_kind`.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def peak_flops_per_device(device=None) -> float:
  """The table's value for this device kind; on CPU, a matmul measured now."""
  device = device or jax.devices()[0]
  for kind, peak in PEAK_FLOPS.items():
    if kind.lower() in device.device_kind.lower():
      return peak
  if device.platform == "cpu":
    return measure_matmul_flops(device)
  raise ValueError(f"no peak FLOP/s known for device kind {device.device_kind!r}; set "
                   "config.peak_flops_per_device")


def measure_matmul_flops(device, n: int = 1024, repeats: int = 5) -> float:
  x = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    f(x).block_until_ready()
  return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def _forward_flops(fn, *args) -> float:
  with unrolled():
    return float(jax.jit(fn).lower(*args).cost_analysis()["flops"])


def forward_flops(model, batch) -> dict[str, float]:
  """Forward FLOPs per component for one batch (a dict of arrays or ShapeDtypeStructs)."""
  config = model.config
  params = nn.unbox(abstract_params(config))
  ids = batch["input_ids"]
  media_index = batch.get("media_index", jax.ShapeDtypeStruct(ids.shape, jnp.int32))
  out = dict(vision=0.0, resampler=0.0)
  media = None
  images = batch.get("images")
  if images is not None and images.shape[1]:
    b, m, f = images.shape[:3]
    flat = jax.ShapeDtypeStruct((b * m * f,) + images.shape[3:], images.dtype)
    vision = lambda p, x: model.apply({"params": p}, x, method=lambda mod, x: mod.vision(x))
    out["vision"] = _forward_flops(vision, params, flat)
    features = jax.eval_shape(vision, params, flat)
    features = jax.ShapeDtypeStruct((b, m, f) + features.shape[1:], features.dtype)
    resample = lambda p, x: model.apply({"params": p}, x, method=lambda mod, x: mod.resampler(x))
    out["resampler"] = _forward_flops(resample, params, features)
    media = jax.eval_shape(resample, params, features)
  lm_logits = lambda p, i, md, mi: model.apply(
      {"params": p}, i, media=md, media_index=mi, method=lambda mod, *a, **k: mod.lm_logits(*a, **k))
  with_xattn = _forward_flops(lm_logits, params, ids, media, media_index)
  holds_layers = lambda k: k in ("groups", "tail") or k.startswith("group_")
  bare_params = {k: ({n: v for n, v in sub.items() if n != "xattn"} if holds_layers(k) else sub)
                 for k, sub in params["lm"].items()}
  bare = DecoderLM(config, with_xattn=False)
  out["lm"] = _forward_flops(lambda p, i: bare.apply({"params": p}, i), bare_params, ids)
  out["xattn"] = with_xattn - out["lm"]
  return out


def multipliers(config, trainable_patterns) -> dict[str, int]:
  """Forward-pass multiples per component for one training step (see module docstring)."""
  params = abstract_params(config)
  mask = trainable_rule.trainable_mask(nn.unbox(params), trainable_patterns)
  trains = {name: False for name in ("vision", "resampler", "xattn", "lm", "embeddings")}
  for path, t in jax.tree_util.tree_leaves_with_path(mask):
    trains[component(trainable_rule.path_str(path))] |= bool(t)
  upstream_of_lm = trains["resampler"] or trains["xattn"] or trains["embeddings"]
  return dict(
      vision=1,
      resampler=3 if trains["resampler"] else 1,
      xattn=3 if trains["xattn"] else (2 if trains["resampler"] else 1),
      lm=3 if trains["lm"] else (2 if upstream_of_lm else 1),
  )


def train_step_flops(model, batches: dict, trainable_patterns) -> float:
  """FLOPs of one update over `batches` (dataset name → batch or its shapes)."""
  mult = multipliers(model.config, trainable_patterns)
  total = 0.0
  for batch in batches.values():
    fwd = forward_flops(model, batch)
    total += sum(mult[k] * v for k, v in fwd.items())
  return total


def analytic_lm_forward_flops(config, batch: int, seq: int) -> float:
  """2 · (matmul params) · tokens + attention scores (QKᵀ and AV, full T² as in PaLM's
  MFU): a cross-check for the XLA count of the bare LM."""
  lm = config.lm
  hd, kv = lm.dim_per_head, lm.kv_heads
  attn = lm.d_model * hd * (2 * lm.num_heads + 2 * kv)
  mlp = lm.d_model * lm.mlp_dim * (3 if lm.family == "llama" else 2)
  head = lm.d_model * lm.vocab_size
  matmul = (lm.num_layers * (attn + mlp) + head) * batch * seq
  scores = lm.num_layers * 2 * 2 * batch * seq * seq * lm.num_heads * hd
  return 2 * matmul + scores
