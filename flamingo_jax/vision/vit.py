"""CLIP-style Vision Transformer (open_clip / OpenAI CLIP / HF CLIPVisionModel towers).

images [N, H, W, C] → patch conv (no bias) → [CLS] + patches + learned positions →
ln_pre → pre-LN blocks → tokens [N, V, width]. V is the patch count, plus one when
`keep_cls`. `final_ln_on_tokens` applies ln_post to the returned tokens (open_clip >= 2.23
does; <= 2.22, HF's last_hidden_state and the OpenFlamingo weights do not).

Parameter layout:
  patch_embed/kernel [p, p, C, width], class_embedding [width], pos_embedding [1 + V, width],
  ln_pre/{scale,bias}, ln_post/{scale,bias} (only with final_ln_on_tokens),
  blocks/{ln_1, attn/{query,key,value,out}, ln_2, mlp/{up,down}}  leading axis = block
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.config import ViTConfig
from flamingo_jax.layers.attention import Attention
from flamingo_jax.layers.mlp import MLP
from flamingo_jax.layers.norms import LayerNorm
from flamingo_jax.layers.scan import scan


class ViTBlock(nn.Module):
  """x + attn(ln_1(x)), then + mlp(ln_2(x)); scanned, hence the (carry, _) signature."""
  config: ViTConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, _=None):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(eps=c.ln_eps, name="ln_1", **kw)(x)
    x = x + Attention(c.num_heads, c.width // c.num_heads, qkv_bias=True, out_bias=True,
                      name="attn", **kw)(h)
    h = LayerNorm(eps=c.ln_eps, name="ln_2", **kw)(x)
    x = x + MLP(c.mlp_dim, activation=c.activation, use_bias=True, name="mlp", **kw)(h)
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
    return x, None


class ViT(nn.Module):
  config: ViTConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """images [N, H, W, C] (normalised) → tokens [N, V, width]. No dropout: `deterministic`
    is accepted for a uniform vision-encoder interface."""
    del deterministic
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = c.patch_size
    if images.shape[1:3] != (c.image_size, c.image_size):
      raise ValueError(f"images are {images.shape[1]}x{images.shape[2]}, the ViT's position "
                       f"embeddings are for vision.image_size={c.image_size}")
    x = nn.Conv(c.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, name="patch_embed",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("conv_height", "conv_width", "conv_in", "embed")),
                **kw)(images.astype(self.dtype))
    n = x.shape[0]
    x = x.reshape(n, -1, c.width)
    init = nn.initializers.normal(stddev=c.width ** -0.5)
    cls = self.param("class_embedding", nn.with_logical_partitioning(init, ("embed",)),
                     (c.width,), self.param_dtype)
    pos = self.param("pos_embedding", nn.with_logical_partitioning(init, ("vis_len", "embed")),
                     (x.shape[1] + 1, c.width), self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (n, 1, c.width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
    x = LayerNorm(eps=c.ln_eps, name="ln_pre", **kw)(x)
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))

    blocks = scan(ViTBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=c.depth, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = blocks(c, name="blocks", **kw)(x, None)

    if not c.keep_cls:
      x = x[:, 1:]
    if c.final_ln_on_tokens:
      x = LayerNorm(eps=c.ln_eps, name="ln_post", **kw)(x)
    return x
