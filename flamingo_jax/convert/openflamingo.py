"""OpenFlamingo (mlfoundations/open_flamingo v2) → `Flamingo` config, params and tokenizer.

An OpenFlamingo model is three local artefacts plus its `checkpoint.pt`:
  vision      open_clip CLIP weights (the `.visual` tower is used; text tower ignored)
  lm          the frozen HF causal LM directory (LLaMA, MPT or GPT-NeoX)
  tokenizer   the LM's HF tokenizer directory
  checkpoint  the trainable state dict their training saves: `perceiver.*`, the gated
              xattn blocks at `lang_encoder.<layers path>.{i}.gated_cross_attn_layer.*`,
              the LM input embedding (with the trained `<image>` / `<|endofchunk|>` rows)
              and, when the output embedding's name contains 'embed' (GPT-NeoX's
              `embed_out`), the output embedding; a DDP `module.` prefix is accepted.

The tokenizer gets OpenFlamingo's special tokens exactly as their factory adds them, so
ids match; the vocabulary is `len(tokenizer)` as they resize the embeddings. Every key of
every file must be used: missing, unexpected and mis-shaped keys are all named in one
error (their loader's `strict=False` hides such mismatches).

    python -m flamingo_jax.convert.openflamingo --checkpoint checkpoint.pt \
        --vision ViT-L-14.pt --lm mpt-7b/ --tokenizer mpt-7b/ \
        --cross_attn_every_n_layers 4 --output converted/

writes orbax params, `config.json` and the tokenizer; `load_converted(dir)` restores them.
"""
import argparse
import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from flamingo_jax import presets
from flamingo_jax.config import ConfigError, FlamingoConfig
from flamingo_jax.convert.state_dict import CheckpointMismatchError, StateDict, check_tree, load
from flamingo_jax.layers.scan import stack_trees
from flamingo_jax.lm.token_rows import rows_from_lm

# OpenFlamingo's factory: `<|endofchunk|>` and `<image>` as additional special tokens, and
# `<PAD>` when the tokenizer has no pad token.
ENDOFCHUNK, IMAGE, PAD = "<|endofchunk|>", "<image>", "<PAD>"

# Where OpenFlamingo wraps the decoder layers (their factory's
# `__KNOWN_DECODER_LAYERS_ATTR_NAMES`), and the embeddings' names, per LM family.
LAYERS_PATH = {"llama": "model.layers", "mpt": "transformer.blocks", "gpt_neox": "gpt_neox.layers"}
INPUT_EMBED = {"llama": "model.embed_tokens", "mpt": "transformer.wte", "gpt_neox": "gpt_neox.embed_in"}
OUTPUT_EMBED = {"llama": "lm_head", "mpt": "lm_head", "gpt_neox": "embed_out"}

# open_clip model configs (`open_clip/model_configs/*.json`) of towers OpenFlamingo used or
# may use. OpenFlamingo's released models all use ViT-L-14 with the 'openai' weights,
# which open_clip builds with QuickGELU.
OPEN_CLIP_CONFIGS = {
    "ViT-L-14": dict(vision_cfg=dict(image_size=224, layers=24, width=1024, patch_size=14),
                     quick_gelu=True),
    "ViT-B-32": dict(vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=32),
                     quick_gelu=True),
    "ViT-B-16": dict(vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=16),
                     quick_gelu=True),
    "ViT-H-14": dict(vision_cfg=dict(image_size=224, layers=32, width=1280, head_width=80,
                                     patch_size=14)),
}

# --- configuration ---------------------------------------------------------------------------

def open_clip_config(vision: str | None, config: str | Mapping | None = None) -> dict:
  """The open_clip model config (a dict with 'vision_cfg') for the vision weights.

  `config`: an arch name from OPEN_CLIP_CONFIGS, an open_clip model-config dict (or just its
  'vision_cfg'), or a json file holding one (open_clip's `model_configs/*.json`, or a hub
  `open_clip_config.json` with 'model_cfg'). None: `open_clip_config.json` beside / inside
  `vision`, else ViT-L-14 (every released OpenFlamingo model's tower).
  """
  if config is None and vision is not None:
    folder = vision if os.path.isdir(vision) else os.path.dirname(vision)
    candidate = os.path.join(folder, "open_clip_config.json")
    config = candidate if os.path.exists(candidate) else None
  if config is None:
    config = "ViT-L-14"
  if isinstance(config, str):
    if config in OPEN_CLIP_CONFIGS:
      return json.loads(json.dumps(OPEN_CLIP_CONFIGS[config]))
    if not os.path.exists(config):
      raise ConfigError(f"vision_config: {config!r} is neither a known arch "
                        f"({sorted(OPEN_CLIP_CONFIGS)}) nor a json file")
    with open(config) as f:
      config = json.load(f)
  config = dict(config)
  if "model_cfg" in config:  # hub open_clip_config.json
    config = dict(config["model_cfg"])
  if "vision_cfg" not in config:  # a bare vision_cfg
    config = {"vision_cfg": config}
  return config


def prepare_tokenizer(tokenizer, trust_remote_code: bool = False):
  """Loads a local HF tokenizer (or takes one) and adds OpenFlamingo's special tokens."""
  if isinstance(tokenizer, (str, os.PathLike)):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer), local_files_only=True,
                                              trust_remote_code=trust_remote_code)
  tokenizer.add_special_tokens({"additional_special_tokens": [ENDOFCHUNK, IMAGE]})
  if tokenizer.pad_token is None:
    tokenizer.add_special_tokens({"pad_token": PAD})
  return tokenizer


def _token_id(tokenizer, token: str) -> int:
  token_id = tokenizer.convert_tokens_to_ids(token)
  if token_id is None or token_id == tokenizer.unk_token_id:
    raise ConfigError(f"tokenizer: {token!r} is not a token; add OpenFlamingo's special "
                      "tokens first (prepare_tokenizer)")
  return token_id


def flamingo_config(vision_fields: Mapping, lm_fields: Mapping, tokenizer,
                    cross_attn_every_n_layers: int, dtype: str = "float32",
                    param_dtype: str = "float32") -> FlamingoConfig:
  """The FlamingoConfig of an OpenFlamingo model; the LM vocabulary becomes len(tokenizer)."""
  return FlamingoConfig.from_dict(dict(
      vision=dict(vision_fields, kind="vit"),
      # OpenFlamingo's Flamingo constructor fixes these shapes (none are arguments).
      resampler=presets.openflamingo_resampler(),
      lm=dict(lm_fields, vocab_size=len(tokenizer)),
      xattn=presets.openflamingo_xattn(cross_attn_every_n_layers),
      media_token_id=_token_id(tokenizer, IMAGE),
      eoc_token_id=_token_id(tokenizer, ENDOFCHUNK),
      # The two rows OpenFlamingo trains, as their own params (see lm/token_rows.py).
      trainable_token_ids=(_token_id(tokenizer, ENDOFCHUNK), _token_id(tokenizer, IMAGE)),
      dtype=dtype, param_dtype=param_dtype))


# --- weights ---------------------------------------------------------------------------------

def _f32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def _linear(sd: StateDict, key: str, d_in: int, d_out: int) -> dict:
  """Bias-free torch Linear [out, in] → {'kernel': [in, out]}."""
  return {"kernel": _f32(sd.take(f"{key}.weight", (d_out, d_in))).T}


def _layer_norm(sd: StateDict, key: str, dim: int) -> dict:
  return {"scale": _f32(sd.take(f"{key}.weight", (dim,))), "bias": _f32(sd.take(f"{key}.bias", (dim,)))}


def _kv(sd: StateDict, key: str, d_in: int, inner: int) -> tuple[dict, dict]:
  """A fused `to_kv` ([k | v] rows) → our separate key / value projections."""
  k, v = np.split(_f32(sd.take(f"{key}.weight", (2 * inner, d_in))), 2)
  return {"kernel": k.T}, {"kernel": v.T}


def _feed_forward(sd: StateDict, key: str, dim: int, mult: int) -> tuple[dict, dict]:
  """OpenFlamingo's FeedForward Sequential (0: LayerNorm, 1: Linear, 2: GELU, 3: Linear)
  → (ff_norm, ff) trees."""
  return _layer_norm(sd, f"{key}.0", dim), {"up": _linear(sd, f"{key}.1", dim, mult * dim),
                                            "down": _linear(sd, f"{key}.3", mult * dim, dim)}


def convert_resampler(sd: StateDict, config: FlamingoConfig, prefix: str = "perceiver.") -> dict:
  r, d = config.resampler, config.vision.out_dim
  inner = r.num_heads * r.head_dim
  out = {"latents": _f32(sd.take(prefix + "latents", (r.num_latents, d)))}
  layers = []
  for i in range(r.depth):
    p = f"{prefix}layers.{i}."
    key, value = _kv(sd, p + "0.to_kv", d, inner)
    ff_norm, ff = _feed_forward(sd, p + "1", d, r.ff_mult)
    layers.append({
        "media_norm": _layer_norm(sd, p + "0.norm_media", d),
        "latents_norm": _layer_norm(sd, p + "0.norm_latents", d),
        "attn": {"query": _linear(sd, p + "0.to_q", d, inner), "key": key, "value": value,
                 "out": _linear(sd, p + "0.to_out", inner, d)},
        "ff_norm": ff_norm, "ff": ff})
  out["layers"] = stack_trees(layers)
  out["norm"] = _layer_norm(sd, prefix + "norm", d)
  return out


def convert_xattn(sd: StateDict, config: FlamingoConfig, prefix: str) -> dict:
  """One GatedCrossAttentionBlock at `prefix` (ending in 'gated_cross_attn_layer.')."""
  x, d, dv = config.xattn, config.lm.d_model, config.vision.out_dim
  inner = x.num_heads * x.head_dim
  key, value = _kv(sd, prefix + "attn.to_kv", dv, inner)
  ff_norm, ff = _feed_forward(sd, prefix + "ff", d, x.ff_mult)
  return {
      # OpenFlamingo's gates are shape-[1] tensors; ours are scalars.
      "attn_gate": _f32(sd.take(prefix + "attn_gate", (1,))).reshape(()),
      "ff_gate": _f32(sd.take(prefix + "ff_gate", (1,))).reshape(()),
      "attn_norm": _layer_norm(sd, prefix + "attn.norm", d),
      "attn": {"query": _linear(sd, prefix + "attn.to_q", d, inner), "key": key, "value": value,
               "out": _linear(sd, prefix + "attn.to_out", inner, d)},
      "ff_norm": ff_norm, "ff": ff}


def _resize_rows(table: np.ndarray, rows: int) -> np.ndarray:
  """HF `resize_token_embeddings` for rows nobody trained: truncate, or append the mean of
  the old rows (transformers >= 4.46 samples them from N(mean, 1e-9 · cov), i.e. the mean
  up to noise; older versions drew them at random, so they never carried information)."""
  if rows <= table.shape[0]:
    return table[:rows]
  extra = np.broadcast_to(table.mean(axis=0, keepdims=True), (rows - table.shape[0], table.shape[1]))
  return np.concatenate([table, extra], axis=0)


def strip_ddp_prefix(tensors: Mapping[str, Any]) -> dict:
  """Drops the `module.` prefix DistributedDataParallel puts on every key."""
  if tensors and all(k.startswith("module.") for k in tensors):
    return {k[len("module."):]: v for k, v in tensors.items()}
  return dict(tensors)


def convert_checkpoint(sd: StateDict, config: FlamingoConfig, lm_top: Mapping,
                       layers_path: str, problems: list[str]) -> tuple[dict, list[dict], dict]:
  """OpenFlamingo's trainable state dict → (resampler params, xattn blocks in block order,
  the LM's top-level params with the checkpoint's embeddings).

  `lm_top`: the frozen LM's {'embed', 'final_norm', 'lm_head'?} at its own vocabulary.
  Problems other than missing / unexpected / mis-shaped keys are appended to `problems`.
  """
  from flamingo_jax.lm.decoder import layout

  lm, family = config.lm, config.lm.family
  resampler = convert_resampler(sd, config)
  root = f"lang_encoder.{layers_path}"
  xattn = [convert_xattn(sd, config, f"{root}.{i}.gated_cross_attn_layer.")
           for i in layout(config).xattn_layers()]

  top = dict(lm_top)
  embed_key = f"lang_encoder.{INPUT_EMBED[family]}.weight"
  embed = _f32(sd.take(embed_key, (lm.vocab_size, lm.d_model)))
  top["embed"] = {"embedding": embed}
  head_key = f"lang_encoder.{OUTPUT_EMBED[family]}.weight"
  if lm.tie_embeddings:
    # state_dict() lists a tied head under its own name too (named_parameters does not, so
    # their filter never drops it): it must be the embedding.
    if head_key in sd:
      head = sd.take(head_key, (lm.vocab_size, lm.d_model))
      both_fit = all(np.shape(sd.tensors[k]) == embed.shape for k in (head_key, embed_key))
      if both_fit and not np.array_equal(_f32(head), embed):
        problems.append(f"{sd.source}: {head_key} differs from {embed_key}, but the LM ties them")
  elif head_key in sd:
    top["lm_head"] = {"kernel": _f32(sd.take(head_key, (lm.vocab_size, lm.d_model))).T}
  else:
    # Not saved (frozen, and not named 'embed', e.g. LLaMA's lm_head): the LM's own rows.
    top["lm_head"] = {"kernel": _resize_rows(top["lm_head"]["kernel"].T, lm.vocab_size).T}
  return resampler, xattn, top


def _other_layer_paths(sd: StateDict, expected: str) -> list[str]:
  """Known decoder-layer paths the checkpoint's xattn keys use, other than `expected`."""
  found = set()
  for key in sd.keys():
    if ".gated_cross_attn_layer." in key:
      path = key.split(".gated_cross_attn_layer.")[0].rsplit(".", 1)[0].removeprefix("lang_encoder.")
      if path != expected:
        found.add(path)
  return sorted(found)


def load_vision_weights(path: str) -> dict[str, np.ndarray]:
  """open_clip vision weights: a state-dict file, a directory holding one (hub layout), or
  OpenAI's TorchScript CLIP archive (what open_clip's 'openai' weights are)."""
  if os.path.isdir(path):
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
      if os.path.exists(os.path.join(path, name)):
        return load(os.path.join(path, name))
    return load(path)
  if not _is_torchscript(path):
    return load(path)
  import torch
  module = torch.jit.load(path, map_location="cpu")
  # OpenAI's archives keep these hyper-parameters as tensors beside the weights.
  meta = ("input_resolution", "context_length", "vocab_size")
  return {k: (v.float() if v.is_floating_point() else v).numpy()
          for k, v in module.state_dict().items() if k not in meta}


def _is_torchscript(path: str) -> bool:
  import zipfile
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(name.endswith("/constants.pkl") for name in z.namelist())


def load_openflamingo(checkpoint: str, vision: str, lm: str, tokenizer, *,
                      cross_attn_every_n_layers: int = 1,
                      vision_config: str | Mapping | None = None,
                      final_ln_on_tokens: bool = False,
                      decoder_layers_attr_name: str | None = None,
                      lm_config_overrides: Mapping[str, Any] | None = None,
                      dtype: str = "float32", param_dtype: str = "float32",
                      trust_remote_code: bool = False):
  """Builds `(Flamingo model, params, tokenizer)` from OpenFlamingo's artefacts (all local).

  checkpoint: OpenFlamingo's `checkpoint.pt` (or a training checkpoint holding
    'model_state_dict'). vision: open_clip weights (file or directory); vision_config:
    see `open_clip_config`. lm: the frozen LM's HF directory. tokenizer: an HF tokenizer
    directory or object (OpenFlamingo's special tokens are added to it).
    cross_attn_every_n_layers: as given to OpenFlamingo (1 for 3B, 2 for 4B, 4 for 9B).
    final_ln_on_tokens: feed the resampler layer-normed patch tokens (open_clip >= 2.23's
    behaviour); the released weights were trained without. decoder_layers_attr_name:
    overrides the layers path the checkpoint's xattn keys are under.

  Raises CheckpointMismatchError naming every missing, unexpected or mis-shaped key of the
  three weight files, and ConfigError for configurations we would compute differently.
  """
  from flamingo_jax.convert.hf_lm import convert_lm, lm_config_from_hf
  from flamingo_jax.convert.vision import vit_config_from_open_clip, vit_params_from_open_clip
  from flamingo_jax.lm.decoder import stack_layers
  from flamingo_jax.model import Flamingo

  tokenizer = prepare_tokenizer(tokenizer, trust_remote_code)
  with open(os.path.join(lm, "config.json")) as f:
    lm_fields = lm_config_from_hf(json.load(f))
  lm_fields.update(lm_config_overrides or {})
  vit = vit_config_from_open_clip(open_clip_config(vision, vision_config),
                                  final_ln_on_tokens=final_ln_on_tokens)
  config = flamingo_config(dataclasses.asdict(vit), lm_fields, tokenizer,
                           cross_attn_every_n_layers, dtype, param_dtype)
  layers_path = decoder_layers_attr_name or LAYERS_PATH[config.lm.family]

  # Convert all three files, then report every problem of every file at once.
  lm_sd = StateDict(load(lm), source=f"LM weights {lm}")
  # The LM file holds its own vocabulary; the checkpoint holds the resized embeddings.
  lm_layers, lm_top = convert_lm(
      lm_sd, dataclasses.replace(config.lm, vocab_size=lm_fields["vocab_size"]))
  of_sd = StateDict(strip_ddp_prefix(load(checkpoint)),
                    source=f"OpenFlamingo checkpoint {checkpoint}")
  errors = []
  resampler, xattn, top = convert_checkpoint(of_sd, config, lm_top, layers_path, errors)
  try:  # the vision converter checks its own keys
    vision_params = vit_params_from_open_clip(load_vision_weights(vision), config.vision,
                                              source=f"vision weights {vision}")
  except CheckpointMismatchError as e:
    errors.append(str(e))
  for sd in (of_sd, lm_sd):
    try:
      sd.finish()
    except CheckpointMismatchError as e:
      errors.append(str(e))
  if errors:
    others = _other_layer_paths(of_sd, layers_path)
    if others:
      errors.append(f"hint: the checkpoint's xattn blocks are under {others}, not "
                    f"{layers_path!r}; is --lm the LM it was trained with?")
    embed_key = f"lang_encoder.{INPUT_EMBED[config.lm.family]}.weight"
    rows = np.shape(of_sd.tensors.get(embed_key))[:1]
    if rows and rows[0] != config.lm.vocab_size:
      errors.append(f"hint: the checkpoint's embedding has {rows[0]} rows, the tokenizer "
                    f"with OpenFlamingo's special tokens {config.lm.vocab_size}; is "
                    "--tokenizer the one it was trained with?")
    raise CheckpointMismatchError("\n".join(errors))

  top["new_tokens"] = rows_from_lm(top, config.trainable_token_ids, config.lm.tie_embeddings)
  params = {"vision": vision_params, "resampler": resampler,
            "lm": {**top, **stack_layers(config, lm_layers, xattn)}}
  # The per-layer trees are views of the loaded tensors: drop them before the dtype cast.
  del lm_sd, of_sd, lm_layers, lm_top, xattn, top
  model = Flamingo(config)
  check_tree(params, abstract_params(model), what="converted OpenFlamingo params")
  return model, _to_jax(params, config.weight_dtype), tokenizer


def _to_jax(tree: dict, dtype) -> dict:
  """Casts a nested dict of numpy arrays in place, leaf by leaf, so that each host copy is
  freed as soon as its device copy exists (a 9B model in float32 is 36 GB)."""
  import jax.numpy as jnp
  for key, value in tree.items():
    tree[key] = _to_jax(value, dtype) if isinstance(value, dict) else jnp.asarray(value, dtype)
  return tree


def abstract_params(model) -> dict:
  """The model's parameter shapes and dtypes, unboxed, without allocating them."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  c = model.config
  size = c.vision.image_size
  images = jnp.zeros((1, 1, 1, size, size, 3), jnp.float32)
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), images, ids)))["params"]


# --- converted directories -------------------------------------------------------------------

def save_converted(output: str, model, params, tokenizer) -> None:
  """Writes `output/{params (orbax), config.json, tokenizer/}`."""
  import orbax.checkpoint as ocp

  output = os.path.abspath(output)
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, "config.json"), "w") as f:
    json.dump(model.config.to_dict(), f, indent=2)
  tokenizer.save_pretrained(os.path.join(output, "tokenizer"))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(output, "params"), params, force=True)
  checkpointer.wait_until_finished()


def load_converted(path: str):
  """`(Flamingo model, params, tokenizer)` from a directory `save_converted` wrote."""
  from transformers import AutoTokenizer

  from flamingo_jax.load_model import restore_converted

  path = os.path.abspath(path)
  model, params = restore_converted(path)
  tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"), local_files_only=True)
  return model, params, tokenizer


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="OpenFlamingo checkpoint.pt")
  p.add_argument("--vision", required=True, help="open_clip vision weights (file or directory)")
  p.add_argument("--vision_config", default=None,
                 help=f"arch name {sorted(OPEN_CLIP_CONFIGS)} or open_clip config json "
                      "(default: open_clip_config.json beside --vision, else ViT-L-14)")
  p.add_argument("--lm", required=True, help="the frozen LM's HF directory")
  p.add_argument("--tokenizer", required=True, help="HF tokenizer directory")
  p.add_argument("--cross_attn_every_n_layers", type=int, required=True)
  p.add_argument("--decoder_layers_attr_name", default=None)
  p.add_argument("--final_ln_on_tokens", action="store_true",
                 help="layer-norm the patch tokens (open_clip >= 2.23); off for released weights")
  p.add_argument("--dtype", default="float32", help="activation dtype stored in the config")
  p.add_argument("--param_dtype", default="float32", help="dtype the params are saved in")
  p.add_argument("--output", required=True)
  a = p.parse_args(argv)
  model, params, tokenizer = load_openflamingo(
      a.checkpoint, a.vision, a.lm, a.tokenizer,
      cross_attn_every_n_layers=a.cross_attn_every_n_layers, vision_config=a.vision_config,
      final_ln_on_tokens=a.final_ln_on_tokens, decoder_layers_attr_name=a.decoder_layers_attr_name,
      dtype=a.dtype, param_dtype=a.param_dtype)
  save_converted(a.output, model, params, tokenizer)
  print(f"wrote {a.output}")


if __name__ == "__main__":
  main()
