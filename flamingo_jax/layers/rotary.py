"""Rotary position embeddings in the HF "rotate half" layout (LLaMA, GPT-NeoX).

Only the first `rotary_dim` channels of each head rotate (GPT-NeoX's partial rotary);
LLaMA rotates them all. Scaling: 'linear' (position interpolation) and 'llama3'.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  kind: str  # 'linear' | 'llama3'
  factor: float
  low_freq_factor: float = 1.0  # llama3 only
  high_freq_factor: float = 4.0  # llama3 only
  original_max_position: int = 8192  # llama3 only

  def __post_init__(self):
    if self.kind not in ("linear", "llama3"):
      raise ValueError(f"rope_scaling.kind={self.kind!r}: supported are 'linear' and 'llama3'")
    if self.factor <= 0:
      raise ValueError(f"rope_scaling.factor={self.factor} must be > 0")


def inverse_frequencies(rotary_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
  if scaling is None:
    return inv_freq
  if scaling.kind == "linear":
    return inv_freq / scaling.factor
  # llama3: leave high frequencies, divide low ones by `factor`, interpolate between.
  low_wavelen = scaling.original_max_position / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
  return jnp.where(mid, (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, *, rotary_dim: int, theta: float,
               scaling: RopeScaling | None = None) -> jax.Array:
  """Rotates x [B, T, H, D] at integer positions [B, T]; channels >= rotary_dim pass through."""
  inv_freq = inverse_frequencies(rotary_dim, theta, scaling)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rotary_dim/2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, rotary_dim]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
  half = rotary_dim // 2
  rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  return jnp.concatenate([rot * cos + rotated_half * sin, rest], axis=-1)
