"""NFNet-F (Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
Normalization"), as DeepMind's Haiku code and timm's `dm_nfnet_f*` build it, NHWC.

No normalisation layers: every conv standardises its own weights (scaled WS), each
residual branch sees its input scaled by beta = 1 / expected std, adds alpha * branch, and
a learned skip gain (init 0) starts every block as the identity. Activations are
multiplied by a constant gamma that keeps unit variance under N(0, 1) inputs.

The classifier (pool + linear) is left out: the output is the final grid after the 1x1
`final_conv` and activation, flattened to [N, h*w, final_width].

Parameter layout (names follow the Haiku module names):
  stem_conv{0..3}/{kernel,bias,gain}, final_conv/...
  stage_{s}/block_0/...            the stage's first (transition) block
  stage_{s}/blocks/...             blocks 1.. of the stage, leading axis = block - 1
  block: conv0 (1x1), conv1 and conv1b (3x3, grouped), conv2 (1x1), conv_shortcut (1x1,
  transition blocks only), se/{fc0,fc1}/{kernel,bias}, skip_gain []
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.config import NFNetConfig
from flamingo_jax.layers import activations
from flamingo_jax.layers.linear import Dense
from flamingo_jax.layers.scan import scan

# Gamma: 1 / std(act(z)) for z ~ N(0, 1), from DeepMind's nfnets code (also used by timm).
GAMMA = {
    "gelu": 1.7015043497085571,
    "gelu_tanh": 1.7015043497085571,
    "relu": 1.7139588594436646,
    "silu": 1.7881293296813965,
}
_CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
_TIMM_WS_EPS = 1e-5
_DEEPMIND_WS_EPS = 1e-4


def gamma_act(name: str):
  act, gamma = activations.get(name), GAMMA[name]
  return lambda x: act(x) * gamma


def standardize_weight(kernel: jax.Array, gain: jax.Array, mode: str) -> jax.Array:
  """Scaled weight standardisation of an HWIO kernel, per output channel, in float32.

  'timm' (ScaledStdConv2d): (w - mean) / sqrt(var + 1e-5) * gain / sqrt(fan_in).
  'deepmind' (WSConv2D):    (w - mean) * gain / sqrt(max(var * fan_in, 1e-4)).
  The two differ by ~eps / var, i.e. noticeably for wide fan-ins: use the one the weights
  were trained with.
  """
  w = kernel.astype(jnp.float32)
  fan_in = np.prod(w.shape[:-1])
  mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
  if mode == "timm":
    scale = jax.lax.rsqrt(var + _TIMM_WS_EPS) * fan_in ** -0.5
  elif mode == "deepmind":
    scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, _DEEPMIND_WS_EPS))
  else:
    raise ValueError(f"weight_standardization={mode!r}: use 'timm' or 'deepmind'")
  return (w - mean) * scale * gain.astype(jnp.float32)


class WSConv(nn.Module):
  """Conv with scaled weight standardisation, learned per-channel gain and bias; TF 'SAME'
  padding (what the dm_ / Haiku models use, asymmetric for stride 2 on even inputs)."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  groups: int = 1
  mode: str = "timm"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES),
        (k, k, x.shape[-1] // self.groups, self.features), self.param_dtype)
    gain = self.param("gain", nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
                      (self.features,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                      (self.features,), self.param_dtype)
    w = standardize_weight(kernel, gain, self.mode).astype(self.dtype)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), w, (self.stride, self.stride), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
    return y + bias.astype(self.dtype)


def avg_pool_2x2_same(x: jax.Array) -> jax.Array:
  """2x2 / stride 2 average pool, 'SAME' padded at the end, padding not counted (Haiku's
  avg_pool; equal to torch's ceil_mode=True, count_include_pad=False)."""
  window, strides = (1, 2, 2, 1), (1, 2, 2, 1)
  total = jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, window, strides, "SAME")
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, jnp.zeros((), x.dtype), jax.lax.add, window, strides, "SAME")
  return total / count


class SqueezeExcite(nn.Module):
  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    h = jnp.mean(x, axis=(1, 2))
    h = jax.nn.relu(Dense(self.hidden, ("conv_out", "se_hidden"), name="fc0", **kw)(h))
    h = Dense(x.shape[-1], ("se_hidden", "conv_out"), name="fc1", **kw)(h)
    return jax.nn.sigmoid(h)[:, None, None, :]


class NFBlock(nn.Module):
  """Bottleneck block: 1x1 → grouped 3x3 → grouped 3x3 → 1x1 → SE, alpha/beta-scaled residual.

  `beta` and `drop_rate` are call arguments (not attributes) so one scanned module serves
  all but the first block of a stage; under scan they arrive per block.
  """
  config: NFNetConfig
  out_ch: int
  stride: int = 1
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, beta: jax.Array, drop_rate: jax.Array) -> jax.Array:
    c = self.config
    act = gamma_act(c.activation)
    conv = lambda *a, **k: WSConv(*a, mode=c.weight_standardization, dtype=self.dtype,
                                  param_dtype=self.param_dtype, **k)
    groups = int(self.out_ch * c.bottleneck_ratio) // c.group_width
    width = groups * c.group_width

    out = act(x) * beta.astype(self.dtype)
    if self.stride > 1 or x.shape[-1] != self.out_ch:
      # Transition block: the shortcut is the (pooled) pre-activated input, projected.
      shortcut = avg_pool_2x2_same(out) if self.stride > 1 else out
      shortcut = conv(self.out_ch, 1, name="conv_shortcut")(shortcut)
    else:
      shortcut = x

    out = conv(width, 1, name="conv0")(out)
    out = conv(width, 3, self.stride, groups, name="conv1")(act(out))
    out = conv(width, 3, 1, groups, name="conv1b")(act(out))
    out = conv(self.out_ch, 1, name="conv2")(act(out))
    se_hidden = max(1, int(self.out_ch * c.se_ratio))
    # x2 restores the signal variance that the sigmoid gate (~0.5 at init) halves.
    out = 2.0 * SqueezeExcite(se_hidden, name="se", dtype=self.dtype,
                              param_dtype=self.param_dtype)(out) * out

    if not self.deterministic and c.stochastic_depth_rate > 0:
      # DeepMind's StochDepth: drop whole residual branches per example, no rescaling.
      u = jax.random.uniform(self.make_rng("dropout"), (x.shape[0], 1, 1, 1))
      out = out * jnp.floor(1.0 - drop_rate + u).astype(self.dtype)
    skip_gain = self.param("skip_gain", nn.with_logical_partitioning(nn.initializers.zeros_init(), ()),
                           (), self.param_dtype)
    return out * (skip_gain.astype(self.dtype) * c.alpha) + shortcut


class _ScannedBlock(NFBlock):
  """NFBlock with scan's (carry, per-step inputs) signature."""

  def __call__(self, x, step):
    beta, drop_rate = step
    return super().__call__(x, beta, drop_rate), None


class NFStage(nn.Module):
  """A transition block (`block_0`), then the stage's other blocks scanned (`blocks`)."""
  config: NFNetConfig
  out_ch: int
  stride: int
  deterministic: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, betas: jax.Array, drop_rates: jax.Array) -> jax.Array:
    """betas, drop_rates: [depth] (see `block_schedule`)."""
    kw = dict(deterministic=self.deterministic, dtype=self.dtype, param_dtype=self.param_dtype)
    x = NFBlock(self.config, self.out_ch, self.stride, name="block_0", **kw)(
        x, betas[0], drop_rates[0])
    if betas.shape[0] > 1:
      blocks = scan(_ScannedBlock, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True}, length=betas.shape[0] - 1,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = blocks(self.config, self.out_ch, 1, name="blocks", **kw)(x, (betas[1:], drop_rates[1:]))
    return x


def block_schedule(config: NFNetConfig) -> list[list[tuple[float, float]]]:
  """(beta, stochastic-depth rate) per block, per stage.

  beta = 1 / expected std of the block input: the variance grows by alpha^2 per block and
  is reset to 1 after each stage's transition block (whose shortcut is a fresh conv).
  Drop rate grows linearly with the overall block index, rate * index / num_blocks.
  """
  depths = config.stage_depths
  total = sum(depths)
  var, index, out = 1.0, 0, []
  for depth in depths:
    stage = []
    for b in range(depth):
      stage.append((var ** -0.5, config.stochastic_depth_rate * index / total))
      if b == 0:
        var = 1.0
      var += config.alpha ** 2
      index += 1
    out.append(stage)
  return out


class NFNet(nn.Module):
  config: NFNetConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """images [N, H, W, C] (normalised) → [N, ceil(H/32) * ceil(W/32), out_dim].

    Training with stochastic depth (`deterministic=False`, rate > 0) needs a 'dropout' rng."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = lambda *a, **k: WSConv(*a, mode=c.weight_standardization, **kw, **k)
    act = gamma_act(c.activation)

    s = c.stem_width
    x = images.astype(self.dtype)
    for i, (ch, stride) in enumerate(zip((s // 8, s // 4, s // 2, s), (2, 1, 1, 2))):
      if i:
        x = act(x)
      x = conv(ch, 3, stride, name=f"stem_conv{i}")(x)

    for si, (width, schedule) in enumerate(zip(c.widths, block_schedule(c))):
      # Stage 0 keeps the resolution: the 4-conv stem already downsampled by 4.
      betas, rates = (jnp.asarray(v, jnp.float32) for v in zip(*schedule))
      x = NFStage(c, width, 1 if si == 0 else 2, deterministic, name=f"stage_{si}", **kw)(
          x, betas, rates)

    x = act(conv(c.out_dim, 1, name="final_conv")(x))
    n, h, w, d = x.shape
    return x.reshape(n, h * w, d)
