"""Vision-tower weights from local files: open_clip / OpenAI CLIP, HF CLIP, timm and
DeepMind Haiku NFNets.

Each `*_params` function takes a state dict (a mapping of numpy/torch arrays, or a path
that `state_dict.load` reads) and the model config, and returns the param tree of
`vision.build(config)` (what sits under 'params', scanned blocks stacked on axis 0).
Every key is accounted for: the parts the encoder does not use (CLIP's text tower and
projections, classifier heads) are skipped by name, anything else that is left over,
missing or mis-shaped makes `StateDict.finish` raise, naming the keys.

The `*_config` helpers derive our configs from the reference libraries' descriptions.
"""
import pickle
import re
from typing import Any, Mapping

import numpy as np

from flamingo_jax.config import NFNetConfig, ViTConfig
from flamingo_jax.convert.state_dict import StateDict, load
from flamingo_jax.layers.scan import stack_trees


def _state_dict(tensors, source: str) -> StateDict:
  if isinstance(tensors, str):
    source, tensors = tensors, load(tensors)
  return StateDict({k: np.asarray(_numpy(v)) for k, v in tensors.items()}, source)


def _numpy(v):
  if hasattr(v, "detach"):  # torch tensor
    v = v.detach().cpu()
    return (v.float() if v.dtype.is_floating_point else v).numpy()
  return v


def _linear(sd: StateDict, key: str, d_in: int, d_out: int, bias: bool = True) -> dict:
  """torch Linear [out, in] → our Dense kernel [in, out]."""
  out = {"kernel": sd.take(f"{key}.weight", (d_out, d_in)).T}
  if bias:
    out["bias"] = sd.take(f"{key}.bias", (d_out,))
  return out


def _norm(sd: StateDict, key: str, dim: int) -> dict:
  return {"scale": sd.take(f"{key}.weight", (dim,)), "bias": sd.take(f"{key}.bias", (dim,))}


def _conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch OIHW → HWIO."""
  return np.transpose(w, (2, 3, 1, 0))


# ---------------------------------------------------------------------------------------
# ViT: open_clip / OpenAI CLIP


# Top-level keys of a full open_clip CLIP checkpoint that belong to the text side.
_OPEN_CLIP_TEXT = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                   "text_projection", "logit_scale", "logit_bias", "attn_mask", "text.")


def _square(name: str, value):
  if isinstance(value, (tuple, list)):
    if len(set(value)) != 1:
      raise ValueError(f"vision_cfg.{name}={value!r}: only square sizes are supported")
    value = value[0]
  return value


def vit_config_from_open_clip(cfg: Mapping[str, Any], *, quick_gelu: bool | None = None,
                              keep_cls: bool = False, final_ln_on_tokens: bool = False) -> ViTConfig:
  """ViTConfig from an open_clip model config (`{'vision_cfg': ..., 'quick_gelu': ...}`, as in
  open_clip's model_configs/*.json) or from its `vision_cfg` alone (then pass `quick_gelu`:
  True for the OpenAI-pretrained weights and the '-quickgelu' models).

  `final_ln_on_tokens` defaults to False, the token convention of open_clip <= 2.22 and of
  the OpenFlamingo weights; set it to match how the downstream weights were trained.
  """
  if "vision_cfg" in cfg:
    if quick_gelu is None:
      quick_gelu = bool(cfg.get("quick_gelu", False))
    cfg = cfg["vision_cfg"]
  # Options that change the tower's structure or its state dict layout.
  unsupported = {"timm_model_name": None, "ls_init_value": None, "attentional_pool": False,
                 "no_ln_pre": False, "pos_embed_type": "learnable", "act_kwargs": None,
                 "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
                 "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                 "scale_fc": False}
  for name, default in unsupported.items():
    value = cfg.get(name, default)
    if value not in (default, None, False, {}) and not (name == "block_type" and value == "default"):
      raise ValueError(f"vision_cfg.{name}={value!r} is not supported by our ViT")
  norm_kwargs = dict(cfg.get("norm_kwargs") or {})
  ln_eps = norm_kwargs.pop("eps", 1e-5)
  if norm_kwargs:
    raise ValueError(f"vision_cfg.norm_kwargs={cfg['norm_kwargs']!r}: only 'eps' is supported")
  image_size = _square("image_size", cfg.get("image_size", 224))
  patch_size = _square("patch_size", cfg.get("patch_size", 16))
  width = cfg.get("width", 768)
  head_width = cfg.get("head_width", 64)
  config = ViTConfig(
      image_size=image_size, patch_size=patch_size, width=width, depth=cfg.get("layers", 12),
      num_heads=width // head_width, mlp_dim=int(width * cfg.get("mlp_ratio", 4.0)),
      activation="quick_gelu" if quick_gelu else "gelu", ln_eps=ln_eps, keep_cls=keep_cls,
      final_ln_on_tokens=final_ln_on_tokens)
  config.check()
  return config


def vit_params_from_open_clip(tensors, config: ViTConfig, *, prefix: str | None = None,
                              source: str = "open_clip checkpoint") -> dict:
  """open_clip `VisionTransformer` weights → our ViT params.

  `tensors`: a full CLIP state dict (vision keys under 'visual.', text tower skipped), a
  vision-tower state dict (no prefix), or anything else with `prefix` naming where the
  tower lives (e.g. 'vision_encoder.' in an OpenFlamingo state dict; keys outside it are
  skipped). `visual.proj` (the contrastive projection) is skipped; `ln_post` is used only
  when `config.final_ln_on_tokens`.
  """
  sd = _state_dict(tensors, source)
  if prefix is None:
    prefix = "visual." if any(k.startswith("visual.") for k in sd.keys()) else ""
    if prefix:
      for k in list(sd.keys()):
        if k.startswith(_OPEN_CLIP_TEXT):
          sd.skip(k)
  elif prefix:
    sd.skip(*[k for k in sd.keys() if not k.startswith(prefix)])
  c = config
  w, p = c.width, c.patch_size
  grid = (c.image_size // p) ** 2
  params = {
      "patch_embed": {"kernel": _conv_kernel(sd.take(f"{prefix}conv1.weight", (w, 3, p, p)))},
      "class_embedding": sd.take(f"{prefix}class_embedding", (w,)),
      "pos_embedding": sd.take(f"{prefix}positional_embedding", (grid + 1, w)),
      "ln_pre": _norm(sd, f"{prefix}ln_pre", w),
  }
  blocks = []
  for i in range(c.depth):
    b = f"{prefix}transformer.resblocks.{i}"
    qkv_w = sd.take(f"{b}.attn.in_proj_weight", (3 * w, w))
    qkv_b = sd.take(f"{b}.attn.in_proj_bias", (3 * w,))
    attn = {name: {"kernel": qkv_w[j * w:(j + 1) * w].T, "bias": qkv_b[j * w:(j + 1) * w]}
            for j, name in enumerate(("query", "key", "value"))}
    attn["out"] = _linear(sd, f"{b}.attn.out_proj", w, w)
    blocks.append({
        "ln_1": _norm(sd, f"{b}.ln_1", w), "attn": attn, "ln_2": _norm(sd, f"{b}.ln_2", w),
        "mlp": {"up": _linear(sd, f"{b}.mlp.c_fc", w, c.mlp_dim),
                "down": _linear(sd, f"{b}.mlp.c_proj", c.mlp_dim, w)},
    })
  params["blocks"] = stack_trees(blocks)
  if c.final_ln_on_tokens:
    params["ln_post"] = _norm(sd, f"{prefix}ln_post", w)
  else:
    sd.skip(f"{prefix}ln_post.weight", f"{prefix}ln_post.bias")
  sd.skip(f"{prefix}proj")
  sd.finish()
  return params


# ---------------------------------------------------------------------------------------
# ViT: Hugging Face CLIPVisionModel / CLIPModel


_HF_NON_VISION = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")


def vit_config_from_hf(hf_config, *, keep_cls: bool = True,
                       final_ln_on_tokens: bool = False) -> ViTConfig:
  """ViTConfig from a `transformers.CLIPVisionConfig` (or a `CLIPConfig`, via its
  `vision_config`). The defaults reproduce `last_hidden_state`: CLS kept, no ln_post
  (HF applies post_layernorm to the pooled output only)."""
  hf_config = getattr(hf_config, "vision_config", hf_config)
  act = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
         "gelu_pytorch_tanh": "gelu_tanh"}.get(hf_config.hidden_act)
  if act is None:
    raise ValueError(f"hidden_act={hf_config.hidden_act!r} is not supported by our ViT")
  config = ViTConfig(
      image_size=hf_config.image_size, patch_size=hf_config.patch_size,
      width=hf_config.hidden_size, depth=hf_config.num_hidden_layers,
      num_heads=hf_config.num_attention_heads, mlp_dim=hf_config.intermediate_size,
      activation=act, ln_eps=hf_config.layer_norm_eps, keep_cls=keep_cls,
      final_ln_on_tokens=final_ln_on_tokens)
  config.check()
  return config


def vit_params_from_hf(tensors, config: ViTConfig, *, prefix: str = "vision_model.",
                       source: str = "HF CLIP checkpoint") -> dict:
  """HF `CLIPVisionModel` / `CLIPVisionModelWithProjection` / `CLIPModel` weights → our ViT
  params. The text tower and projections are skipped; `post_layernorm` becomes ln_post
  when `config.final_ln_on_tokens`, else it is skipped."""
  sd = _state_dict(tensors, source)
  for k in list(sd.keys()):
    if k.startswith(_HF_NON_VISION):
      sd.skip(k)
  c = config
  w, p = c.width, c.patch_size
  grid = (c.image_size // p) ** 2
  e = f"{prefix}embeddings"
  sd.skip(f"{e}.position_ids")  # a buffer that older checkpoints saved
  params = {
      "patch_embed": {"kernel": _conv_kernel(sd.take(f"{e}.patch_embedding.weight", (w, 3, p, p)))},
      "class_embedding": sd.take(f"{e}.class_embedding", (w,)),
      "pos_embedding": sd.take(f"{e}.position_embedding.weight", (grid + 1, w)),
      "ln_pre": _norm(sd, f"{prefix}pre_layrnorm", w),  # sic: HF's spelling
  }
  blocks = []
  for i in range(c.depth):
    b = f"{prefix}encoder.layers.{i}"
    blocks.append({
        "ln_1": _norm(sd, f"{b}.layer_norm1", w),
        "attn": {name: _linear(sd, f"{b}.self_attn.{hf}_proj", w, w)
                 for name, hf in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "out"))},
        "ln_2": _norm(sd, f"{b}.layer_norm2", w),
        "mlp": {"up": _linear(sd, f"{b}.mlp.fc1", w, c.mlp_dim),
                "down": _linear(sd, f"{b}.mlp.fc2", c.mlp_dim, w)},
    })
  params["blocks"] = stack_trees(blocks)
  if c.final_ln_on_tokens:
    params["ln_post"] = _norm(sd, f"{prefix}post_layernorm", w)
  else:
    sd.skip(f"{prefix}post_layernorm.weight", f"{prefix}post_layernorm.bias")
  sd.finish()
  return params


# ---------------------------------------------------------------------------------------
# NFNet: timm dm_nfnet_f*

# DeepMind's evaluation resolutions (timm's dm_nfnet_f* test_input_size).
_NFNET_TEST_SIZE = {"F0": 256, "F1": 320, "F2": 352, "F3": 416, "F4": 512, "F5": 544,
                    "F6": 576, "F7": 608}


def nfnet_config_from_timm(name: str, **overrides) -> NFNetConfig:
  """NFNetConfig for a timm model name: 'dm_nfnet_f3', 'timm/dm_nfnet_f3.dm_in1k', ... Only
  the dm_ models (DeepMind's architecture) are supported: timm's own nfnet_f* / eca_nfnet_*
  differ in padding, skip-init, attention and channel rounding."""
  base = name.split("/")[-1].split(".")[0]
  m = re.fullmatch(r"dm_nfnet_f([0-7])", base)
  if not m:
    raise ValueError(f"{name!r}: only timm's dm_nfnet_f0..f6 (and the paper's F7) are supported")
  variant = f"F{m.group(1)}"
  config = NFNetConfig(**{"variant": variant, "image_size": _NFNET_TEST_SIZE[variant],
                          **overrides})
  config.check()
  return config


def _block_layout(config: NFNetConfig):
  """Per stage, per block: (in_ch, out_ch, width, groups, se_hidden, has_shortcut)."""
  c = config
  in_ch, stages = c.stem_width, []
  for si, (out_ch, depth) in enumerate(zip(c.widths, c.stage_depths)):
    groups = int(out_ch * c.bottleneck_ratio) // c.group_width
    blocks = []
    for b in range(depth):
      shortcut = b == 0 and (si > 0 or in_ch != out_ch)
      blocks.append((in_ch, out_ch, groups * c.group_width, groups,
                     max(1, int(out_ch * c.se_ratio)), shortcut))
      in_ch = out_ch
    stages.append(blocks)
  return stages


def _stem_channels(config: NFNetConfig):
  s = config.stem_width
  return list(zip((3, s // 8, s // 4, s // 2), (s // 8, s // 4, s // 2, s)))


def _nfnet_tree(config: NFNetConfig, conv, dense, scalar) -> dict:
  """Our NFNet tree, pulling each tensor through `conv(name, k, in/groups, out)`,
  `dense(name, in, out)` and `scalar(name)`, where `name` is our block-local path."""
  params = {f"stem_conv{i}": conv(f"stem_conv{i}", 3, cin, cout)
            for i, (cin, cout) in enumerate(_stem_channels(config))}
  for si, blocks in enumerate(_block_layout(config)):
    trees = []
    for bi, (cin, cout, width, groups, se_hidden, shortcut) in enumerate(blocks):
      at = (si, bi)
      tree = {
          "conv0": conv((at, "conv0"), 1, cin, width),
          "conv1": conv((at, "conv1"), 3, width // groups, width),
          "conv1b": conv((at, "conv1b"), 3, width // groups, width),
          "conv2": conv((at, "conv2"), 1, width, cout),
          "se": {"fc0": dense((at, "se.fc0"), cout, se_hidden),
                 "fc1": dense((at, "se.fc1"), se_hidden, cout)},
          "skip_gain": scalar((at, "skip_gain")),
      }
      if shortcut:
        tree["conv_shortcut"] = conv((at, "conv_shortcut"), 1, cin, cout)
      trees.append(tree)
    stage = {"block_0": trees[0]}
    if len(trees) > 1:
      stage["blocks"] = stack_trees(trees[1:])
    params[f"stage_{si}"] = stage
  params["final_conv"] = conv("final_conv", 1, config.widths[-1], config.out_dim)
  return params


_TIMM_BLOCK = {"conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3",
               "conv_shortcut": "downsample.conv", "se.fc0": "attn_last.fc1",
               "se.fc1": "attn_last.fc2", "skip_gain": "skipinit_gain"}


def nfnet_params_from_timm(tensors, config: NFNetConfig,
                           source: str = "timm dm_nfnet checkpoint") -> dict:
  """timm `dm_nfnet_f*` weights (NormFreeNet, NCHW) → our NFNet params. The classifier
  `head.fc` is skipped. Note timm's weight standardisation: use
  `weight_standardization='timm'` with these weights."""
  sd = _state_dict(tensors, source)

  def key(name):
    if isinstance(name, str):
      return {f"stem_conv{i}": f"stem.conv{i + 1}" for i in range(4)}.get(name, name)
    (si, bi), local = name
    return f"stages.{si}.{bi}.{_TIMM_BLOCK[local]}"

  def conv(name, k, cin, cout):
    t = key(name)
    return {"kernel": _conv_kernel(sd.take(f"{t}.weight", (cout, cin, k, k))),
            "bias": sd.take(f"{t}.bias", (cout,)),
            "gain": sd.take(f"{t}.gain", (cout, 1, 1, 1)).reshape(cout)}

  def dense(name, cin, cout):  # SE 1x1 convs with bias
    t = key(name)
    return {"kernel": sd.take(f"{t}.weight", (cout, cin, 1, 1)).reshape(cout, cin).T,
            "bias": sd.take(f"{t}.bias", (cout,))}

  params = _nfnet_tree(config, conv, dense, lambda name: sd.take(key(name), ()))
  sd.skip("head.fc.weight", "head.fc.bias")
  sd.finish()
  return params


# ---------------------------------------------------------------------------------------
# NFNet: DeepMind Haiku (deepmind-research/nfnets)
#
# Haiku names modules 'NFNet/~/stem_conv0', 'NFNet/~/nf_block' (then nf_block_1, ...,
# numbered over all stages), with sub-modules conv0, conv1, conv1b, conv2, conv_shortcut
# and squeeze_excite/~/linear, linear_1; convs hold w [HWIO], bias, gain; the block holds
# skip_gain; the classifier is 'NFNet/~/linear'. The released F*_haiku.npz files are
# pickles of {module: {param: array}}; flat 'module/param' npz archives are read as well.


def load_haiku(path: str) -> dict[str, np.ndarray]:
  """Flat {'module/param': array} from a Haiku params file (npz archive or pickle).

  Pickles of Haiku's own mapping types need haiku importable to unpickle."""
  with open(path, "rb") as f:
    magic = f.read(2)
  if magic == b"PK":  # zip: a real npz
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  with open(path, "rb") as f:
    tree = pickle.load(f)
  return {f"{module}/{name}": np.asarray(v) for module, params in tree.items()
          for name, v in params.items()}


def nfnet_params_from_haiku(tensors, config: NFNetConfig, *, root: str = "NFNet",
                            source: str = "Haiku NFNet params") -> dict:
  """DeepMind Haiku NFNet params → our NFNet params. `tensors` is flat
  {'NFNet/~/stem_conv0/w': ...} (see `load_haiku`) or nested {module: {param: array}}.
  The classifier 'NFNet/~/linear' is skipped. These weights expect
  `weight_standardization='deepmind'` and activation 'gelu_tanh' (jax.nn.gelu's default)."""
  if isinstance(tensors, str):
    source, tensors = tensors, load_haiku(tensors)
  if tensors and all(isinstance(v, Mapping) for v in tensors.values()):
    tensors = {f"{m}/{n}": v for m, ps in tensors.items() for n, v in ps.items()}
  sd = _state_dict(tensors, source)
  block_index = {}
  for si, blocks in enumerate(_block_layout(config)):
    for bi in range(len(blocks)):
      n = len(block_index)
      block_index[(si, bi)] = "nf_block" + (f"_{n}" if n else "")

  def key(name):
    if isinstance(name, str):
      return f"{root}/~/{name}"
    at, local = name
    block = f"{root}/~/{block_index[at]}"
    if local == "skip_gain":
      return f"{block}/skip_gain"
    if local.startswith("se."):
      return f"{block}/~/squeeze_excite/~/" + {"se.fc0": "linear", "se.fc1": "linear_1"}[local]
    return f"{block}/~/{local}"

  def conv(name, k, cin, cout):
    t = key(name)
    return {"kernel": sd.take(f"{t}/w", (k, k, cin, cout)), "bias": sd.take(f"{t}/bias", (cout,)),
            "gain": sd.take(f"{t}/gain", (cout,))}

  def dense(name, cin, cout):
    t = key(name)
    return {"kernel": sd.take(f"{t}/w", (cin, cout)), "bias": sd.take(f"{t}/b", (cout,))}

  params = _nfnet_tree(config, conv, dense, lambda name: sd.take(key(name), ()))
  sd.skip(f"{root}/~/linear/w", f"{root}/~/linear/b")
  sd.finish()
  return params


__all__ = [
    "vit_config_from_open_clip", "vit_params_from_open_clip", "vit_config_from_hf",
    "vit_params_from_hf", "nfnet_config_from_timm", "nfnet_params_from_timm", "load_haiku",
    "nfnet_params_from_haiku",
]
