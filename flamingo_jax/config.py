"""Typed, validated model configuration.

`configs/*.py` return `ml_collections.ConfigDict`s (editable from the command line);
`FlamingoConfig.from_dict(config.model)` turns the model part into frozen dataclasses
that the modules hold. Every check names the offending field and says how to fix it,
and runs before anything is allocated or compiled.
"""
import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from flamingo_jax.layers.rotary import RopeScaling


class ConfigError(ValueError):
  """A configuration value that cannot work; the message names the field."""


def _require(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ConfigError(f"{field}: {message}")


def _positive(obj, *names: str) -> None:
  for name in names:
    value = getattr(obj, name)
    _require(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")


def _one_of(value, field: str, choices) -> None:
  _require(value in choices, field, f"{value!r} is not one of {sorted(choices)}")


LM_FAMILIES = ("llama", "mpt", "gpt_neox")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu", "squared_relu")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """CLIP-style ViT (open_clip / HF CLIP vision tower), returning patch tokens."""
  image_size: int = 224
  patch_size: int = 14
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_dim: int = 4096
  activation: str = "gelu"  # open_clip ViT-L/14 'openai' weights use 'quick_gelu'
  ln_eps: float = 1e-5
  keep_cls: bool = False
  # open_clip >= 2.23 applies ln_post to the returned tokens; <= 2.22 did not, and the
  # released OpenFlamingo weights were trained on un-normalised tokens.
  final_ln_on_tokens: bool = False

  def check(self):
    _positive(self, "image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim")
    _require(self.image_size % self.patch_size == 0, "patch_size",
             f"{self.patch_size} must divide image_size={self.image_size}")
    _require(self.width % self.num_heads == 0, "num_heads",
             f"{self.num_heads} must divide width={self.width}")
    _one_of(self.activation, "activation", ACTIVATIONS)

  @property
  def out_dim(self) -> int:
    return self.width


@dataclasses.dataclass(frozen=True)
class NFNetConfig:
  """Normalizer-free ResNet, F-series (Brock et al. 2021); returns the flattened final grid.

  `variant` fixes the depths ((k+1) * [1, 2, 6, 3] for F_k); the remaining shape fields
  default to every F variant's values and exist for small test models.
  """
  variant: str = "F6"
  image_size: int = 320
  stochastic_depth_rate: float = 0.0
  # 'gelu' is exact GELU (timm's dm_nfnet_*); DeepMind's Haiku code used jax.nn.gelu's
  # tanh approximation: 'gelu_tanh'.
  activation: str = "gelu"
  depths: tuple[int, ...] = ()  # () = from `variant`
  widths: tuple[int, ...] = (256, 512, 1536, 1536)
  stem_width: int = 128  # the stem's convs have stem_width // 8, // 4, // 2 and x1 channels
  group_width: int = 128
  bottleneck_ratio: float = 0.5
  se_ratio: float = 0.5
  alpha: float = 0.2
  final_width: int = 0  # 0 = 2 * widths[-1]
  # Scaled weight standardisation: 'timm' divides by sqrt(var + 1e-5) and by sqrt(fan_in);
  # 'deepmind' (Haiku WSConv2D) by sqrt(max(var * fan_in, 1e-4)).
  weight_standardization: str = "timm"

  def __post_init__(self):
    # Lists from a ConfigDict / JSON: stored as tuples so the config stays hashable.
    for name in ("depths", "widths"):
      object.__setattr__(self, name, tuple(getattr(self, name)))

  def check(self):
    _require(self.variant in [f"F{i}" for i in range(8)], "variant",
             f"{self.variant!r} is not one of F0..F7")
    _positive(self, "image_size", "stem_width", "group_width")
    _require(0.0 <= self.stochastic_depth_rate < 1.0, "stochastic_depth_rate", "must be in [0, 1)")
    _one_of(self.activation, "activation", ("gelu", "gelu_tanh", "relu", "silu"))
    for name in ("depths", "widths"):
      value = tuple(getattr(self, name))
      _require(len(value) == 4 or (name == "depths" and not value), name,
               f"needs one entry per stage (4), got {value!r}")
      _require(all(isinstance(v, int) and v > 0 for v in value), name,
               f"entries must be positive integers, got {value!r}")
    _require(self.stem_width % 8 == 0, "stem_width", f"{self.stem_width} must be a multiple of 8")
    _require(0.0 < self.bottleneck_ratio, "bottleneck_ratio", "must be > 0")
    for w in self.widths:
      _require(int(w * self.bottleneck_ratio) >= self.group_width, "group_width",
               f"{self.group_width} exceeds the bottleneck width {int(w * self.bottleneck_ratio)} "
               f"of stage width {w} (widths * bottleneck_ratio)")
    _require(0.0 < self.se_ratio <= 1.0, "se_ratio", "must be in (0, 1]")
    _require(self.alpha > 0, "alpha", "must be > 0")
    _require(self.final_width >= 0, "final_width", "must be >= 0 (0 = 2 * widths[-1])")
    _one_of(self.weight_standardization, "weight_standardization", ("timm", "deepmind"))

  @property
  def stage_depths(self) -> tuple[int, ...]:
    if self.depths:
      return tuple(self.depths)
    k = int(self.variant[1:]) + 1
    return tuple(k * d for d in (1, 2, 6, 3))

  @property
  def out_dim(self) -> int:
    return self.final_width or 2 * self.widths[-1]  # 3072 for every F variant


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
  depth: int = 6
  num_heads: int = 8
  head_dim: int = 64
  num_latents: int = 64
  ff_mult: int = 4
  activation: str = "gelu"  # paper: 'squared_relu'
  max_frames: int = 0  # > 0: learned temporal embeddings for up to this many frames
  # Working width; 0 = the vision feature width. Otherwise the features are first
  # projected to it (the paper: NFNet-F6's 3072 channels → 1536).
  dim: int = 0
  ln_eps: float = 1e-5

  def check(self):
    _positive(self, "depth", "num_heads", "head_dim", "num_latents", "ff_mult")
    _require(self.max_frames >= 0, "max_frames", "must be >= 0 (0 = no temporal embeddings)")
    _require(self.dim >= 0, "dim", "must be >= 0 (0 = the vision feature width)")
    _one_of(self.activation, "activation", ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class XAttnConfig:
  every: int = 1  # one GATED XATTN-DENSE block per `every` LM layers
  # 'first': before layers 0, N, 2N, ... (paper); 'last': before layer i when (i+1) % N == 0
  # (OpenFlamingo).
  placement: str = "last"
  num_heads: int = 8
  head_dim: int = 64
  ff_mult: int = 4
  ff_dim: int = 0  # FFW hidden size; 0 = ff_mult * d_model
  activation: str = "gelu"  # paper: 'squared_relu'
  # OpenFlamingo runs the block's FFW on every token, media or not; the paper's block adds
  # nothing to a token that has no image to look at.
  ff_without_media: bool = False
  ln_eps: float = 1e-5

  def check(self):
    _positive(self, "every", "num_heads", "head_dim", "ff_mult")
    _require(self.ff_dim >= 0, "ff_dim", "must be >= 0 (0 = ff_mult * d_model)")
    _one_of(self.placement, "placement", ("first", "last"))
    _one_of(self.activation, "activation", ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """A decoder-only LM. `family` picks the layer structure; the other fields its dims."""
  family: str = "llama"
  vocab_size: int = 32000
  d_model: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 0  # 0 = num_heads (no GQA)
  head_dim: int = 0  # 0 = d_model // num_heads
  mlp_dim: int = 11008
  activation: str = "silu"  # llama: gated silu (SwiGLU); mpt / gpt_neox: gelu
  norm_eps: float = 1e-5
  use_bias: bool = False  # gpt_neox: True
  tie_embeddings: bool = False
  rope_theta: float = 10000.0
  rotary_pct: float = 1.0  # gpt_neox: fraction of head_dim that rotates
  rope_scaling: RopeScaling | None = None
  alibi_bias_max: float = 8.0  # mpt
  qk_norm: bool = False  # mpt: LayerNorm over the full q and k (MosaicML attn_qk_ln / qk_ln)
  parallel_residual: bool = True  # gpt_neox
  max_seq_len: int = 2048
  # Self-attention without a KV cache (training, scoring): 'einsum' (layers/attention.py,
  # the reference), 'cudnn' (jax.nn.dot_product_attention's fused kernel; GPU) or 'xla'
  # (the same call lowered by XLA: its CPU parity test). ALiBi (mpt) stays on 'einsum'.
  attention_impl: str = "einsum"

  def check(self):
    _one_of(self.family, "family", LM_FAMILIES)
    _one_of(self.attention_impl, "attention_impl", ("einsum", "cudnn", "xla"))
    _positive(self, "vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim", "max_seq_len")
    if not self.head_dim:
      _require(self.d_model % self.num_heads == 0, "num_heads",
               f"{self.num_heads} must divide d_model={self.d_model} (or set head_dim)")
    _require(self.kv_heads > 0 and self.num_heads % self.kv_heads == 0, "num_kv_heads",
             f"{self.num_kv_heads} must divide num_heads={self.num_heads}")
    _one_of(self.activation, "activation", ACTIVATIONS)
    _require(0.0 < self.rotary_pct <= 1.0, "rotary_pct", "must be in (0, 1]")
    _require(not self.qk_norm or self.family == "mpt", "qk_norm",
             "only the mpt family implements it")
    _require(self.rope_dim % 2 == 0, "rotary_pct",
             f"rotary dims {self.rope_dim} (= rotary_pct * head_dim) must be even")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def rope_dim(self) -> int:
    if self.family == "mpt":
      return 0  # ALiBi, no rotary
    return int(self.dim_per_head * self.rotary_pct)


@dataclasses.dataclass(frozen=True)
class FlamingoConfig:
  vision: ViTConfig | NFNetConfig
  resampler: ResamplerConfig
  lm: LMConfig
  xattn: XAttnConfig
  media_token_id: int = -1  # the `<image>` id; -1 = media index must always be given
  eoc_token_id: int = -1  # `<|endofchunk|>`
  # Tokens whose embedding (and head) rows train inside the frozen vocabulary, as
  # separate small parameters (lm/token_rows.py); typically (eoc_token_id, media_token_id).
  trainable_token_ids: tuple[int, ...] = ()
  dtype: str = "float32"  # activations
  param_dtype: str = "float32"
  # The backward's recomputation of the LM's layer groups and the resampler's layers
  # (layers/remat.py): 'none' | 'full' | 'dots' (save matmul outputs).
  remat_policy: str = "none"
  # False: the LM's layer groups are separate modules `group_0`, ... instead of one
  # scanned stack `groups` (lm/decoder.py `unstack_groups` converts). For decoding: a
  # decode step inside a while loop that slices stacked weights copies every slice at
  # every step on backends that do not fuse the slice into the matmul (XLA:CPU does not).
  scan_layers: bool = True
  # Images each device encodes at a time, under a loop (0: all at once). On TPU a
  # convolution's compile time grows with the images it holds (sharding.data_parallel).
  vision_chunk: int = 0

  def check(self):
    for name in ("vision", "resampler", "lm", "xattn"):
      try:
        getattr(self, name).check()
      except ConfigError as e:
        raise ConfigError(f"{name}.{e}") from None
    _require(self.xattn.every <= self.lm.num_layers, "xattn.every",
             f"{self.xattn.every} exceeds lm.num_layers={self.lm.num_layers}: no block would be placed")
    _one_of(self.dtype, "dtype", DTYPES)
    _one_of(self.param_dtype, "param_dtype", DTYPES)
    _one_of(self.remat_policy, "remat_policy", ("none", "full", "dots"))
    _require(self.vision_chunk >= 0, "vision_chunk", f"{self.vision_chunk} must be >= 0 (0 = all at once)")
    for name in ("media_token_id", "eoc_token_id"):
      value = getattr(self, name)
      _require(-1 <= value < self.lm.vocab_size, name,
               f"{value} is outside the vocabulary (lm.vocab_size={self.lm.vocab_size}); "
               "resize the vocabulary after adding the special tokens")
    ids = tuple(self.trainable_token_ids)
    _require(len(set(ids)) == len(ids) and all(0 <= i < self.lm.vocab_size for i in ids),
             "trainable_token_ids", f"{ids} must be distinct ids in [0, lm.vocab_size="
             f"{self.lm.vocab_size})")

  def __post_init__(self):
    object.__setattr__(self, "trainable_token_ids", tuple(self.trainable_token_ids))

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "FlamingoConfig":
    """Builds and checks a config from a (ConfigDict or plain) mapping."""
    d = _to_plain(d)
    vision = dict(d.pop("vision", {}))
    kind = vision.pop("kind", "vit")
    _one_of(kind, "vision.kind", ("vit", "nfnet"))
    lm = dict(d.pop("lm", {}))
    if lm.get("rope_scaling"):
      lm["rope_scaling"] = _build(RopeScaling, lm["rope_scaling"], "lm.rope_scaling")
    else:
      lm["rope_scaling"] = None
    parts = dict(
        vision=_build(ViTConfig if kind == "vit" else NFNetConfig, vision, "vision"),
        resampler=_build(ResamplerConfig, d.pop("resampler", {}), "resampler"),
        lm=_build(LMConfig, lm, "lm"),
        xattn=_build(XAttnConfig, d.pop("xattn", {}), "xattn"),
    )
    config = _build(cls, {**d, **parts}, "model")
    config.check()
    return config

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["vision"]["kind"] = "vit" if isinstance(self.vision, ViTConfig) else "nfnet"
    return d


def _to_plain(d) -> dict:
  if hasattr(d, "to_dict"):
    d = d.to_dict()
  return {k: _to_plain(v) if isinstance(v, Mapping) or hasattr(v, "to_dict") else v
          for k, v in dict(d).items()}


def _build(cls, d: Mapping[str, Any], path: str):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ConfigError(f"{path}.{unknown[0]}: unknown field; {cls.__name__} has {sorted(known)}")
  try:
    return cls(**d)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{path}: {e}") from None
