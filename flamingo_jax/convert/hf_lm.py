"""HF transformers LMs (LLaMA, MPT, GPT-NeoX) → `DecoderLM` configs and params.

Also MosaicML's own (remote-code) checkpoints, which OpenFlamingo's released models use:
`mosaic_gpt` (MosaicGPT, mosaicml/examples v0.0.4: mpt-1b-redpajama-200b, OpenFlamingo-3B)
and `mpt` configs written by MosaicML's `MPTConfig` (nested `attn_config`, `no_bias`,
`norm_type`: mpt-7b, OpenFlamingo-9B). Both become family 'mpt'.

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

SUPPORTED = ("llama", "mpt", "gpt_neox", "mosaic_gpt")

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
  if not is_dict or model_type == "mosaic_gpt":  # not a transformers model type
    return hf_config
  if model_type == "mpt":
    _check_mosaicml_mpt_dict(hf_config)
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
  if isinstance(c, Mapping):
    return _mosaic_gpt(c)
  convert = {"llama": _llama, "mpt": _mpt, "gpt_neox": _gpt_neox, "mosaic_gpt": _mosaic_gpt}
  fields = convert[c.model_type](c)
  if c.model_type == "mpt" and isinstance(hf_config, Mapping) and "norm_eps" in hf_config:
    # Later MosaicML MPTConfigs set the LayerNorm eps as `norm_eps` (HF: layer_norm_epsilon).
    fields["norm_eps"] = float(hf_config["norm_eps"])
  return fields


def _reject(field: str, ok, why: str) -> None:
  if not ok:
    raise ConfigError(f"{field}: {why}")


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
  _reject("attn_config.alibi", get("alibi", True),
          "False (learned positions) is not supported; only ALiBi MPTs are")
  _reject("attn_config.attn_type", get("attn_type", "multihead_attention") == "multihead_attention",
          f"{get('attn_type')!r} is not supported; only 'multihead_attention'")
  # HF MPT clamps the fused qkv to [-clip_qkv, clip_qkv]; our Attention has no such clamp.
  _reject("attn_config.clip_qkv", not get("clip_qkv"),
          f"{get('clip_qkv')} is not supported (qkv clamping); only None")
  _reject("attn_config.prefix_lm", not get("prefix_lm", False), "True is not supported")
  _reject("attn_config.attn_uses_sequence_id", not get("attn_uses_sequence_id", False),
          "True is not supported")
  scale = get("softmax_scale")
  _reject("attn_config.softmax_scale",
          scale is None or math.isclose(scale, head_dim ** -0.5, rel_tol=1e-6),
          f"{scale} is not supported; only None (= 1/sqrt(head_dim) = {head_dim ** -0.5:.6g})")
  _reject("no_bias", getattr(c, "no_bias", True), "False (MPT with biases) is not supported")
  _reject("logit_scale", getattr(c, "logit_scale", None) is None,
          f"{c.logit_scale!r} is not supported; only None")
  norm = getattr(c, "norm_type", "low_precision_layernorm")
  _reject("norm_type", norm in ("layernorm", "low_precision_layernorm"),
          f"{norm!r} is not supported; only (low_precision_)layernorm")
  return dict(
      family="mpt", vocab_size=c.vocab_size, d_model=c.d_model, num_layers=c.n_layers,
      num_heads=c.n_heads, mlp_dim=int(c.expansion_ratio * c.d_model), activation="gelu",
      norm_eps=c.layer_norm_epsilon, use_bias=False, tie_embeddings=bool(c.tie_word_embeddings),
      # HF's MptModel always builds ALiBi with bias_max 8, whatever the config says; the
      # config value is what MosaicML's own code (and the training run) used.
      alibi_bias_max=float(get("alibi_bias_max", 8)),
      # MosaicML's qk_ln (a LayerNorm over all of q and of k); HF's MptForCausalLM has no
      # such option, so only MosaicML checkpoints have the `attn.q_ln` / `attn.k_ln` weights.
      qk_norm=bool(get("qk_ln", False)), max_seq_len=c.max_seq_len)


# MosaicML-only `mpt` config fields (later llm-foundry versions) and the values under which
# they leave the math as above; HF's MptConfig would silently drop them.
_MOSAICML_MPT_NEUTRAL = {
    "attn_config.rope": (False, None),
    "attn_config.qk_gn": (False, None),
    "attn_config.sliding_window_size": (-1, None),
    "attn_config.attn_logit_softcapping": (None,),
    "ffn_config.ffn_type": ("mptmlp", None),
    "ffn_config.ffn_act_fn": (None,),
    "ffn_config.ffn_hidden_size": (None,),
    "final_logit_softcapping": (None,),
    "block_overrides": (None, {}),
}


def _check_mosaicml_mpt_dict(d: Mapping) -> None:
  """Checks on a raw `mpt` config.json that AutoConfig would lose: fields only MosaicML's
  MPTConfig has, its attn_type values HF refuses, and its defaults where they differ from
  HF's (`no_bias` and `attn_config.alibi` default to False in MosaicML's code)."""
  attn = d.get("attn_config") or {}
  for field, neutral in _MOSAICML_MPT_NEUTRAL.items():
    outer, _, inner = field.rpartition(".")
    value = (d.get(outer) or {}).get(inner) if outer else d.get(inner)
    _reject(field, value in neutral, f"{value!r} is not supported; only {neutral[0]!r}")
  attn_type = attn.get("attn_type", "multihead_attention")
  _reject("attn_config.attn_type", attn_type == "multihead_attention",
          f"{attn_type!r} is not supported; only 'multihead_attention'")
  remote = "auto_map" in d or "MPTForCausalLM" in (d.get("architectures") or ())
  if remote:  # MosaicML's MPTConfig wrote every field; missing ones mean its defaults
    _reject("no_bias", d.get("no_bias", False), "False (MPT with biases) is not supported")
    _reject("attn_config.alibi", attn.get("alibi", False),
            "False (learned positions) is not supported; only ALiBi MPTs are")


# MosaicGPTConfig's defaults (mosaicml/examples v0.0.4,
# examples/llm/src/models/mosaic_gpt/configuration_mosaic_gpt.py), for omitted fields.
_MOSAIC_GPT_DEFAULTS = dict(
    d_model=2048, n_heads=16, n_layers=24, mlp_ratio=4, max_seq_len=2048, vocab_size=50368,
    attn_qk_ln=False, attn_clip_qkv=None, softmax_scale=None, prefix_lm=False,
    attn_uses_sequence_id=False, alibi=False, alibi_bias_max=8, logit_scale=None,
    no_bias=False, norm_type="low_precision_layernorm", multiquery_attention=False)


def _mosaic_gpt(c) -> dict[str, Any]:
  """MosaicGPT: pre-LN blocks `ln_1` → attn (fused Wqkv, optional q/k LayerNorm over all
  heads, ALiBi) → `ln_2` → mlp (mlp_up, exact GELU, mlp_down); final `ln_f`; the head is
  always the embedding (`F.linear(x, wte.weight)`); LayerNorms at torch's eps 1e-5
  (LPLayerNorm is LayerNorm computed at autocast precision); `no_bias` strips every bias."""
  get = (lambda k: c.get(k, _MOSAIC_GPT_DEFAULTS.get(k))) if isinstance(c, Mapping) else (
      lambda k: getattr(c, k, _MOSAIC_GPT_DEFAULTS.get(k)))
  d_model, n_heads = int(get("d_model")), int(get("n_heads"))
  head_dim = d_model // n_heads
  _reject("alibi", get("alibi"), "False (learned positions, `wpe`) is not supported; only ALiBi")
  # v0.0.4 took slope_h = 2^-(h * bias_max / n_heads); from 2023-04-25 MosaicML switched to
  # HF's interleaved slopes. They agree exactly when n_heads is a power of two.
  _reject("n_heads", n_heads & (n_heads - 1) == 0,
          f"{n_heads} is not a power of two: MosaicGPT versions disagree on its ALiBi slopes")
  _reject("attn_clip_qkv", not get("attn_clip_qkv"),
          f"{get('attn_clip_qkv')} is not supported (qkv clamping); only None")
  scale = get("softmax_scale")
  _reject("softmax_scale", scale is None or math.isclose(scale, head_dim ** -0.5, rel_tol=1e-6),
          f"{scale} is not supported; only None (= 1/sqrt(head_dim) = {head_dim ** -0.5:.6g})")
  _reject("prefix_lm", not get("prefix_lm"), "True is not supported")
  _reject("attn_uses_sequence_id", not get("attn_uses_sequence_id"), "True is not supported")
  _reject("multiquery_attention", not get("multiquery_attention"), "True is not supported")
  _reject("logit_scale", get("logit_scale") is None,
          f"{get('logit_scale')!r} is not supported; only None")
  _reject("no_bias", get("no_bias"), "False (MosaicGPT with biases) is not supported")
  norm = get("norm_type")  # llm-foundry's last MosaicGPTs; v0.0.4 has low_precision_layernorm
  _reject("norm_type", norm in ("layernorm", "low_precision_layernorm"),
          f"{norm!r} is not supported; only (low_precision_)layernorm")
  return dict(
      family="mpt", vocab_size=int(get("vocab_size")), d_model=d_model,
      num_layers=int(get("n_layers")), num_heads=n_heads, mlp_dim=int(get("mlp_ratio")) * d_model,
      activation="gelu", norm_eps=1e-5, use_bias=False, tie_embeddings=True,
      alibi_bias_max=float(get("alibi_bias_max")), qk_norm=bool(get("attn_qk_ln")),
      max_seq_len=int(get("max_seq_len")))


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
                layers="transformer.blocks", attn_norm="norm_1", mlp_norm="norm_2",
                up="ffn.up_proj", down="ffn.down_proj"),
    # MosaicGPT (model_type mosaic_gpt): family 'mpt', recognised by its `transformer.ln_f`.
    "mosaic_gpt": dict(embed="transformer.wte", final_norm="transformer.ln_f", head="lm_head",
                       layers="transformer.blocks", attn_norm="ln_1", mlp_norm="ln_2",
                       up="mlp.mlp_up", down="mlp.mlp_down"),
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
    if lm.qk_norm:  # MosaicML's q_ln / k_ln: over all heads at once
      attn["q_norm"] = _norm(sd, p + "attn.q_ln", h * hd, False)
      attn["k_norm"] = _norm(sd, p + "attn.k_ln", h * hd, False)
    mlp = {"up": _linear(sd, p + names["up"], d, lm.mlp_dim, False),
           "down": _linear(sd, p + names["down"], lm.mlp_dim, d, False)}
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
  OpenFlamingo (`….layers.{i}.decoder_layer.…`) are recognised, and for family 'mpt'
  MosaicGPT's names (`transformer.ln_f`, `ln_1`, `mlp.mlp_up`, …) as well as MPT's.
  """
  names = _NAMES[lm.family]
  if lm.family == "mpt" and f"{prefix}{_NAMES['mosaic_gpt']['final_norm']}.weight" in state_dict:
    names = _NAMES["mosaic_gpt"]
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
  """A local HF LM directory (config.json + safetensors or .bin; MosaicML's `mosaic_gpt` and
  remote-code `mpt` directories too) → (LMConfig, params) with
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
