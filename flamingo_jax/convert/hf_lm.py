"""HF transformers LMs (LLaMA, MPT, GPT-NeoX) → `DecoderLM` configs and params.

`lm_config_from_hf` maps an HF config to LMConfig fields, refusing options our layers do
not implement. `convert_lm` turns an HF state dict into per-layer trees in our naming
(kernels [in, out], fused QKV split), leaving the scan layout to `stack_layers`, so that
the OpenFlamingo loader can interleave its xattn blocks. `load_hf_lm` does both for a
local HF directory.
"""
import dataclasses
import json
import math
import os
from typing import Any, Mapping

import numpy as np

from flamingo_jax.config import ConfigError, FlamingoConfig, LMConfig
from flamingo_jax.convert.state_dict import StateDict, check_tree, load

SUPPORTED = ("llama", "mpt", "gpt_neox")

# HF `hidden_act` → our activation names. gelu_new / gelu_fast / gelu_pytorch_tanh are all
# the tanh approximation.
_ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
    "quick_gelu": "quick_gelu",
}


def _hf_config(hf_config):
  """An HF config object, building one (with that model's defaults) from a config.json dict."""
  is_dict = isinstance(hf_config, Mapping)
  model_type = hf_config.get("model_type") if is_dict else getattr(hf_config, "model_type", None)
  if model_type not in SUPPORTED:
    raise ConfigError(f"model_type: {model_type!r} is not supported; supported are {list(SUPPORTED)}")
  if not is_dict:
    return hf_config
  from transformers import AutoConfig
  return AutoConfig.for_model(model_type, **{k: v for k, v in hf_config.items() if k != "model_type"})


def _activation(name: str) -> str:
  if name not in _ACTIVATIONS:
    raise ConfigError(f"hidden_act: {name!r} is not supported; supported are {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def _rope_scaling(scaling: Mapping | None) -> dict | None:
  if not scaling:
    return None
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind == "default":
    return None
  if kind == "linear":
    return dict(kind="linear", factor=float(scaling["factor"]))
  if kind == "llama3":
    return dict(kind="llama3", factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position=int(scaling["original_max_position_embeddings"]))
  raise ConfigError(f"rope_scaling: type {kind!r} is not supported; supported are "
                    "'default', 'linear' and 'llama3'")


def lm_config_from_hf(hf_config) -> dict[str, Any]:
  """LMConfig fields (a plain dict, as `FlamingoConfig.from_dict` takes under 'lm') from an
  HF config object or a config.json dict. Raises ConfigError on anything we would compute
  differently from the checkpoint's own model."""
  c = _hf_config(hf_config)
  return {"llama": _llama, "mpt": _mpt, "gpt_neox": _gpt_neox}[c.model_type](c)


def _llama(c) -> dict[str, Any]:
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  attn_bias, mlp_bias = bool(getattr(c, "attention_bias", False)), bool(getattr(c, "mlp_bias", False))
  if attn_bias != mlp_bias:
    raise ConfigError(f"attention_bias={attn_bias}, mlp_bias={mlp_bias}: LMConfig.use_bias "
                      "covers both, so they must agree")
  return dict(
      family="llama", vocab_size=c.vocab_size, d_model=c.hidden_size,
      num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
      num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
      head_dim=0 if head_dim * c.num_attention_heads == c.hidden_size else head_dim,
      mlp_dim=c.intermediate_size, activation=_activation(c.hidden_act), norm_eps=c.rms_norm_eps,
      use_bias=attn_bias, tie_embeddings=bool(c.tie_word_embeddings),
      rope_theta=float(c.rope_theta), rope_scaling=_rope_scaling(c.rope_scaling),
      max_seq_len=c.max_position_embeddings)


def _mpt(c) -> dict[str, Any]:
  a = c.attn_config
  get = (lambda k, default=None: a.get(k, default)) if isinstance(a, Mapping) else (
      lambda k, default=None: getattr(a, k, default))
  head_dim = c.d_model // c.n_heads

  def reject(field, ok, why):
    if not ok:
      raise ConfigError(f"{field}: {why}")

  reject("attn_config.alibi", get("alibi", True),
         "False (learned positions) is not supported; only ALiBi MPTs are")
  reject("attn_config.attn_type", get("attn_type", "multihead_attention") == "multihead_attention",
         f"{get('attn_type')!r} is not supported; only 'multihead_attention'")
  # HF MPT clamps the fused qkv to [-clip_qkv, clip_qkv]; our Attention has no such clamp.
  reject("attn_config.clip_qkv", not get("clip_qkv"),
         f"{get('clip_qkv')} is not supported (qkv clamping); only None")
  reject("attn_config.qk_ln", not get("qk_ln", False), "True (q/k LayerNorm) is not supported")
  reject("attn_config.prefix_lm", not get("prefix_lm", False), "True is not supported")
  reject("attn_config.attn_uses_sequence_id", not get("attn_uses_sequence_id", False),
         "True is not supported")
  scale = get("softmax_scale")
  reject("attn_config.softmax_scale",
         scale is None or math.isclose(scale, head_dim ** -0.5, rel_tol=1e-6),
         f"{scale} is not supported; only None (= 1/sqrt(head_dim) = {head_dim ** -0.5:.6g})")
  reject("no_bias", getattr(c, "no_bias", True), "False (MPT with biases) is not supported")
  reject("logit_scale", getattr(c, "logit_scale", None) is None,
         f"{c.logit_scale!r} is not supported; only None")
  norm = getattr(c, "norm_type", "low_precision_layernorm")
  reject("norm_type", norm in ("layernorm", "low_precision_layernorm"),
         f"{norm!r} is not supported; only (low_precision_)layernorm")
  return dict(
      family="mpt", vocab_size=c.vocab_size, d_model=c.d_model, num_layers=c.n_layers,
      num_heads=c.n_heads, mlp_dim=int(c.expansion_ratio * c.d_model), activation="gelu",
      norm_eps=c.layer_norm_epsilon, use_bias=False, tie_embeddings=bool(c.tie_word_embeddings),
      # HF's MptModel always builds ALiBi with bias_max 8, whatever the config says; the
      # config value is what MosaicML's own code (and the training run) used.
      alibi_bias_max=float(get("alibi_bias_max", 8)), max_seq_len=c.max_seq_len)


def _gpt_neox(c) -> dict[str, Any]:
  if not getattr(c, "attention_bias", True):
    raise ConfigError("attention_bias: False is not supported; GPT-NeoX layers use biases "
                      "on every projection (LMConfig.use_bias)")
  return dict(
      family="gpt_neox", vocab_size=c.vocab_size, d_model=c.hidden_size,
      num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
      mlp_dim=c.intermediate_size, activation=_activation(c.hidden_act), norm_eps=c.layer_norm_eps,
      use_bias=True, tie_embeddings=bool(c.tie_word_embeddings),
      rope_theta=float(getattr(c, "rope_theta", None) or c.rotary_emb_base),
      rotary_pct=float(c.rotary_pct), rope_scaling=_rope_scaling(c.rope_scaling),
      parallel_residual=bool(c.use_parallel_residual), max_seq_len=c.max_position_embeddings)


# --- weights -------------------------------------------------------------------------------

# HF key names: (embedding, final norm, untied head, layer list) and, per layer, the norms.
_NAMES = {
    "llama": dict(embed="model.embed_tokens", final_norm="model.norm", head="lm_head",
                  layers="model.layers", attn_norm="input_layernorm",
                  mlp_norm="post_attention_layernorm"),
    "mpt": dict(embed="transformer.wte", final_norm="transformer.norm_f", head="lm_head",
                layers="transformer.blocks", attn_norm="norm_1", mlp_norm="norm_2"),
    "gpt_neox": dict(embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
                     head="embed_out", layers="gpt_neox.layers", attn_norm="input_layernorm",
                     mlp_norm="post_attention_layernorm"),
}
# Buffers older checkpoints saved: rotary caches and GPT-NeoX's causal mask (`attention.bias`
# is that mask, not a parameter: the projections' biases live under query_key_value / dense).
_LAYER_BUFFERS = ("self_attn.rotary_emb.inv_freq", "attention.rotary_emb.inv_freq",
                  "attention.bias", "attention.masked_bias")
_TOP_BUFFERS = ("model.rotary_emb.inv_freq", "gpt_neox.rotary_emb.inv_freq")


def _f32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def _linear(sd: StateDict, key: str, d_in: int, d_out: int, bias: bool) -> dict:
  """torch Linear [out, in] → {'kernel': [in, out], 'bias': [out]}."""
  out = {"kernel": _f32(sd.take(f"{key}.weight", (d_out, d_in))).T}
  if bias:
    out["bias"] = _f32(sd.take(f"{key}.bias", (d_out,)))
  return out


def _norm(sd: StateDict, key: str, dim: int, bias: bool) -> dict:
  out = {"scale": _f32(sd.take(f"{key}.weight", (dim,)))}
  if bias:
    out["bias"] = _f32(sd.take(f"{key}.bias", (dim,)))
  return out


def _layer(sd: StateDict, lm: LMConfig, p: str, names: dict) -> dict:
  d, h, k, hd, b = lm.d_model, lm.num_heads, lm.kv_heads, lm.dim_per_head, lm.use_bias
  norm_bias = b and lm.family != "llama"  # RMSNorm has no bias
  norms = {"attn_norm": _norm(sd, p + names["attn_norm"], d, norm_bias),
           "mlp_norm": _norm(sd, p + names["mlp_norm"], d, norm_bias)}
  if lm.family == "llama":
    attn = {"query": _linear(sd, p + "self_attn.q_proj", d, h * hd, b),
            "key": _linear(sd, p + "self_attn.k_proj", d, k * hd, b),
            "value": _linear(sd, p + "self_attn.v_proj", d, k * hd, b),
            "out": _linear(sd, p + "self_attn.o_proj", h * hd, d, b)}
    mlp = {"gate": _linear(sd, p + "mlp.gate_proj", d, lm.mlp_dim, b),
           "up": _linear(sd, p + "mlp.up_proj", d, lm.mlp_dim, b),
           "down": _linear(sd, p + "mlp.down_proj", lm.mlp_dim, d, b)}
  elif lm.family == "mpt":
    # Wqkv's output is [q | k | v], each head-major.
    w = _f32(sd.take(p + "attn.Wqkv.weight", (3 * h * hd, d)))
    attn = {name: {"kernel": part.T} for name, part in zip(("query", "key", "value"), np.split(w, 3))}
    attn["out"] = _linear(sd, p + "attn.out_proj", h * hd, d, False)
    mlp = {"up": _linear(sd, p + "ffn.up_proj", d, lm.mlp_dim, False),
           "down": _linear(sd, p + "ffn.down_proj", lm.mlp_dim, d, False)}
  else:
    # query_key_value's output is laid out [heads, (q, k, v), head_dim].
    w = _f32(sd.take(p + "attention.query_key_value.weight", (3 * h * hd, d))).reshape(h, 3, hd, d)
    bias = _f32(sd.take(p + "attention.query_key_value.bias", (3 * h * hd,))).reshape(h, 3, hd)
    attn = {name: {"kernel": w[:, i].reshape(h * hd, d).T, "bias": bias[:, i].reshape(h * hd)}
            for i, name in enumerate(("query", "key", "value"))}
    attn["out"] = _linear(sd, p + "attention.dense", h * hd, d, True)
    mlp = {"up": _linear(sd, p + "mlp.dense_h_to_4h", d, lm.mlp_dim, True),
           "down": _linear(sd, p + "mlp.dense_4h_to_h", lm.mlp_dim, d, True)}
  sd.skip(*(p + name for name in _LAYER_BUFFERS))
  return {**norms, "attn": attn, "mlp": mlp}


def convert_lm(state_dict: StateDict, lm: LMConfig, prefix: str = "") -> tuple[list[dict], dict]:
  """HF state dict (keys under `prefix`) → (per-layer param trees in HF order, top-level
  {'embed', 'final_norm', 'lm_head' (untied only)}), float32 with [in, out] kernels.

  Takes every key it uses from `state_dict` and skips known buffers; the caller calls
  `state_dict.finish()` once everything else it holds is converted. Layers wrapped by
  OpenFlamingo (`….layers.{i}.decoder_layer.…`) are recognised.
  """
  names = _NAMES[lm.family]
  root = f"{prefix}{names['layers']}"
  wrapped = any(key.startswith(f"{root}.0.decoder_layer.") for key in state_dict.keys())
  layers = [_layer(state_dict, lm, f"{root}.{i}." + ("decoder_layer." if wrapped else ""), names)
            for i in range(lm.num_layers)]
  d, v, bias = lm.d_model, lm.vocab_size, lm.use_bias and lm.family != "llama"
  embed = _f32(state_dict.take(f"{prefix}{names['embed']}.weight", (v, d)))
  top = {"embed": {"embedding": embed},
         "final_norm": _norm(state_dict, prefix + names["final_norm"], d, bias)}
  head = f"{prefix}{names['head']}.weight"
  if lm.tie_embeddings:
    # Tied checkpoints may still store a copy of the embedding as the head.
    if head in state_dict:
      copy = state_dict.take(head, (v, d))
      if not np.array_equal(_f32(copy), embed):
        raise ConfigError(f"tie_embeddings: the config ties the head to the embedding, but "
                          f"{head} differs from {prefix}{names['embed']}.weight")
  else:
    top["lm_head"] = {"kernel": _f32(state_dict.take(head, (v, d))).T}
  state_dict.skip(*(prefix + name for name in _TOP_BUFFERS))
  return layers, top


# --- a whole local HF model --------------------------------------------------------------------

def lm_only_config(lm: LMConfig | Mapping[str, Any], every: int = 1,
                   placement: str = "last") -> FlamingoConfig:
  """A FlamingoConfig around `lm` (other parts at defaults) for running the bare LM; the
  xattn layout fixes how `DecoderLM` groups the layers, so it is part of the params' layout."""
  if isinstance(lm, LMConfig):
    lm = dataclasses.asdict(lm)
  return FlamingoConfig.from_dict({"lm": lm, "xattn": {"every": every, "placement": placement}})


def load_hf_lm(path: str, config_overrides: Mapping[str, Any] | None = None, *, every: int = 1,
               placement: str = "last") -> tuple[LMConfig, dict]:
  """A local HF LM directory (config.json + safetensors or .bin) → (LMConfig, params) with
  params in the `DecoderLM(config, with_xattn=False)` layout for xattn `every`/`placement`
  (see `lm_only_config`). Raises CheckpointMismatchError naming every key that does not fit."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from flamingo_jax.lm.decoder import DecoderLM, stack_layers

  with open(os.path.join(path, "config.json")) as f:
    fields = lm_config_from_hf(json.load(f))
  fields.update(config_overrides or {})
  config = lm_only_config(fields, every, placement)
  sd = StateDict(load(path), source=path)
  layers, top = convert_lm(sd, config.lm)
  sd.finish()
  params = {**top, **stack_layers(config, layers, None)}

  model = DecoderLM(config, with_xattn=False)
  ids = jnp.zeros((1, 1), jnp.int32)
  expected = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), ids)))
  check_tree(params, expected["params"], what=f"params converted from {path}")
  return config.lm, params
