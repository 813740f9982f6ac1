"""Frozen decoder-only LMs. Each family module (llama, mpt, gpt_neox) exports `Layer`
(one decoder layer: `(x, *, attn: SelfAttentionInputs) -> x`) and `final_norm(config, **kw)`;
one whose self-attention takes a bias every layer shares (ALiBi) also exports
`attention_bias(config, attn) -> [B, H, 1, S + T]`, built once per LM call (`attn.bias`)."""
import importlib

from flamingo_jax.layers.attention import Attention, SelfAttentionInputs


def family(name: str):
  return importlib.import_module(f"flamingo_jax.lm.{name}")


def self_attention(config, h, attn: SelfAttentionInputs, **kw):
  """The layer's `attn` submodule, shaped by the LM config, applied to h [B, T, D].
  Call it inside a layer's compact `__call__` (the submodule is created there)."""
  c = config
  module = Attention(c.num_heads, c.dim_per_head, c.kv_heads, qkv_bias=c.use_bias,
                     out_bias=c.use_bias, rope_dim=c.rope_dim, rope_theta=c.rope_theta,
                     rope_scaling=c.rope_scaling, qk_norm=c.qk_norm, qk_norm_eps=c.norm_eps,
                     kv_cache=True, impl=c.attention_impl, name="attn", **kw)
  return module(h, mask=attn.mask, bias=attn.bias, positions=attn.positions,
                cache_rows=attn.cache_rows)
