"""MosaicML's own LM checkpoints (OpenFlamingo's released LMs) through `load_hf_lm`.

OpenFlamingo-3B's LM (mpt-1b-redpajama-200b) is a `mosaic_gpt` (MosaicGPT, mosaicml/examples
v0.0.4) checkpoint; OpenFlamingo-9B's (mpt-7b) is an `mpt` checkpoint with MosaicML's
remote-code config.json. Neither code base is installed, so the reference is transformers'
MptForCausalLM, whose math is MosaicGPT's / MPT's for these configs (pre-LN, fused Wqkv,
ALiBi with bias_max 8, exact GELU MLP, no biases, head = embedding), with its weights
written under MosaicML's key names by the tables below. MosaicML's QK LayerNorm
(`attn_qk_ln` / `attn_config.qk_ln`, which mpt-1b uses) has no HF counterpart: the
reference gets it from a forward hook on each `Wqkv` that applies torch LayerNorms to the
q and k thirds of its output, which is where MosaicML's attention applies `q_ln` / `k_ln`
(after Wqkv and the chunk into q, k, v; before the head split).
"""
import json
import os
import re

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import jax
import jax.numpy as jnp

from flamingo_jax.config import ConfigError
from flamingo_jax.convert.hf_lm import convert_lm, lm_config_from_hf, lm_only_config, load_hf_lm
from flamingo_jax.convert.state_dict import CheckpointMismatchError, StateDict
from flamingo_jax.lm.decoder import DecoderLM
from tests.parity import assert_parity, relative_error

VOCAB, D, HEADS, LAYERS, T, MAX_LEN = 160, 64, 4, 2, 12, 32

# HF MptForCausalLM key → MosaicGPT key (v0.0.4's mosaic_gpt.py / gpt_blocks.py /
# attention.py: ModuleDict transformer{wte, blocks[GPTBlock{ln_1, attn{Wqkv, q_ln, k_ln,
# out_proj}, ln_2, mlp{mlp_up, mlp_down}}], ln_f}). None: not in the checkpoint (MosaicGPT's
# logits are F.linear(x, wte.weight); it has no lm_head module).
MOSAIC_GPT_KEYS = [
    (r"transformer\.wte\.weight", r"transformer.wte.weight"),
    (r"transformer\.blocks\.(\d+)\.norm_1\.weight", r"transformer.blocks.\1.ln_1.weight"),
    (r"transformer\.blocks\.(\d+)\.attn\.Wqkv\.weight", r"transformer.blocks.\1.attn.Wqkv.weight"),
    (r"transformer\.blocks\.(\d+)\.attn\.out_proj\.weight",
     r"transformer.blocks.\1.attn.out_proj.weight"),
    (r"transformer\.blocks\.(\d+)\.norm_2\.weight", r"transformer.blocks.\1.ln_2.weight"),
    (r"transformer\.blocks\.(\d+)\.ffn\.up_proj\.weight",
     r"transformer.blocks.\1.mlp.mlp_up.weight"),
    (r"transformer\.blocks\.(\d+)\.ffn\.down_proj\.weight",
     r"transformer.blocks.\1.mlp.mlp_down.weight"),
    (r"transformer\.norm_f\.weight", r"transformer.ln_f.weight"),
    (r"lm_head\.weight", None),
]
# HF key → MosaicML MPT key (llm-foundry modeling_mpt.py of May 2023: MPTForCausalLM{
# transformer: MPTModel{wte, blocks[MPTBlock{norm_1, attn{Wqkv, q_ln, k_ln, out_proj},
# norm_2, ffn{up_proj, down_proj}}], norm_f}}, logits F.linear(x, wte.weight)). HF kept
# the names; only the head differs.
MOSAICML_MPT_KEYS = [(r"lm_head\.weight", None), (r"(.*)", r"\1")]


def _rename(key: str, table) -> str | None:
  for pattern, new in table:
    if re.fullmatch(pattern, key):
      return None if new is None else re.sub(pattern, new, key)
  raise AssertionError(f"{key}: not in the mapping table")


# MosaicGPTConfig.to_dict() fields (mosaicml/examples v0.0.4, configuration_mosaic_gpt.py),
# valued as in mpt-1b-redpajama-200b (ALiBi, QK LayerNorm, no biases; model card), at test
# size. The hub file also carries architectures / auto_map / transformers_version.
def _mosaic_gpt_config(qk_ln: bool, **overrides) -> dict:
  config = {
      "architectures": ["MosaicGPT"],
      "auto_map": {"AutoConfig": "configuration_mosaic_gpt.MosaicGPTConfig",
                   "AutoModelForCausalLM": "mosaic_gpt.MosaicGPT"},
      "model_type": "mosaic_gpt", "d_model": D, "n_heads": HEADS, "n_layers": LAYERS,
      "mlp_ratio": 4, "max_seq_len": MAX_LEN, "vocab_size": VOCAB, "attn_pdrop": 0.0,
      "resid_pdrop": 0.0, "emb_pdrop": 0.0, "attn_impl": "torch", "attn_qk_ln": qk_ln,
      "attn_clip_qkv": None, "softmax_scale": None, "prefix_lm": False,
      "attn_uses_sequence_id": False, "alibi": True, "alibi_bias_max": 8, "init_device": "cpu",
      "logit_scale": None, "no_bias": True, "verbose": 0, "param_init_fn": "kaiming_normal_",
      "init_div_is_residual": True, "init_std": 0.02, "emb_init_std": None,
      "emb_init_uniform_lim": None, "init_gain": 0, "fan_mode": "fan_in",
      "init_nonlinearity": "relu", "embedding_fraction": 1.0, "low_precision_layernorm": True,
      "use_cache": False, "tokenizer_name": "EleutherAI/gpt-neox-20b",
      "torch_dtype": "float32", "transformers_version": "4.27.4",
  }
  config.update(overrides)
  return config


# mosaicml/mpt-7b's config.json (MosaicML MPTConfig, transformers 4.28.1), at test size.
def _mosaicml_mpt_config(qk_ln: bool, attn=None, **overrides) -> dict:
  config = {
      "architectures": ["MPTForCausalLM"],
      "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
                      "attn_type": "multihead_attention", "attn_uses_sequence_id": False,
                      "clip_qkv": None, "prefix_lm": False, "qk_ln": qk_ln,
                      "softmax_scale": None, **(attn or {})},
      "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig",
                   "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
      "d_model": D, "emb_pdrop": 0, "embedding_fraction": 1.0, "expansion_ratio": 4,
      "init_config": {"emb_init_std": None, "emb_init_uniform_lim": None, "fan_mode": "fan_in",
                      "init_div_is_residual": True, "init_gain": 0, "init_nonlinearity": "relu",
                      "init_std": 0.02, "name": "kaiming_normal_", "verbose": 0},
      "init_device": "cpu", "learned_pos_emb": True, "logit_scale": None,
      "max_seq_len": MAX_LEN, "model_type": "mpt", "n_heads": HEADS, "n_layers": LAYERS,
      "no_bias": True, "norm_type": "low_precision_layernorm", "resid_pdrop": 0,
      "tokenizer_name": "EleutherAI/gpt-neox-20b", "torch_dtype": "bfloat16",
      "transformers_version": "4.28.1", "use_cache": False, "verbose": 0, "vocab_size": VOCAB,
  }
  config.update(overrides)
  return config


def _reference(seed: int, qk_ln: bool):
  """(HF MPT with MosaicML's q/k LayerNorms hooked in when qk_ln, {layer: (q_ln, k_ln)})."""
  torch.manual_seed(seed)
  model = transformers.MptForCausalLM(transformers.MptConfig(
      vocab_size=VOCAB, d_model=D, n_heads=HEADS, n_layers=LAYERS, expansion_ratio=4,
      max_seq_len=MAX_LEN, initializer_range=0.1)).eval()
  with torch.no_grad():  # norms at 1 would hide swapped or dropped tensors
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  norms = {}
  if qk_ln:
    for i, block in enumerate(model.transformer.blocks):
      q_ln, k_ln = (torch.nn.LayerNorm(D, bias=False) for _ in range(2))  # no_bias: no LN bias
      with torch.no_grad():
        q_ln.weight.copy_(1 + 0.3 * torch.randn(D))
        k_ln.weight.copy_(1 + 0.3 * torch.randn(D))

      def hook(module, inputs, out, q_ln=q_ln, k_ln=k_ln):
        q, k, v = out.chunk(3, dim=-1)
        return torch.cat([q_ln(q), k_ln(k), v], dim=-1)

      block.attn.Wqkv.register_forward_hook(hook)
      norms[i] = (q_ln, k_ln)
  return model, norms


def _mosaicml_tensors(model, norms, table) -> dict[str, torch.Tensor]:
  out = {}
  for key, value in model.state_dict().items():
    new = _rename(key, table)
    if new is not None:
      out[new] = value.detach().clone().contiguous()
  for i, (q_ln, k_ln) in norms.items():
    out[f"transformer.blocks.{i}.attn.q_ln.weight"] = q_ln.weight.detach().clone()
    out[f"transformer.blocks.{i}.attn.k_ln.weight"] = k_ln.weight.detach().clone()
  return out


def _write(path, config: dict, tensors: dict, shards: int = 1) -> str:
  """A hub-style directory: config.json and pytorch_model.bin, or `shards` .bin files with
  pytorch_model.bin.index.json (as mpt-7b ships)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  if shards == 1:
    torch.save(tensors, os.path.join(path, "pytorch_model.bin"))
    return str(path)
  keys = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
    part = {k: tensors[k] for k in keys[s::shards]}
    torch.save(part, os.path.join(path, name))
    weight_map.update({k: name for k in part})
  with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return str(path)


def _batch():
  """3 rows: full, right-padded by 4, left-padded by 3."""
  ids = np.random.default_rng(0).integers(0, VOCAB, (3, T))
  mask = np.ones((3, T), np.int64)
  mask[1, T - 4:] = 0
  mask[2, :3] = 0
  return ids, mask


def _hf_logits(model, ids, mask) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _our_logits(path, ids, mask):
  lm, params = load_hf_lm(path)
  model = DecoderLM(lm_only_config(lm), with_xattn=False)
  apply = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))
  return lm, np.asarray(apply(params, jnp.asarray(ids), jnp.asarray(mask)))


CASES = {  # name: (config builder, key table, .bin shards)
    "mosaic_gpt": (_mosaic_gpt_config, MOSAIC_GPT_KEYS, 1),
    "mosaicml_mpt": (_mosaicml_mpt_config, MOSAICML_MPT_KEYS, 2),
}


@pytest.mark.parametrize("qk_ln", [True, False], ids=["qk_ln", "no_qk_ln"])
@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_reference(name, qk_ln, tmp_path):
  make_config, table, shards = CASES[name]
  model, norms = _reference(seed=1, qk_ln=qk_ln)
  path = _write(tmp_path / name, make_config(qk_ln), _mosaicml_tensors(model, norms, table), shards)
  ids, mask = _batch()
  lm, ours = _our_logits(path, ids, mask)
  assert (lm.family, lm.qk_norm, lm.tie_embeddings, lm.use_bias) == ("mpt", qk_ln, True, False)
  reference = _hf_logits(model, ids, mask)
  assert_parity(ours, reference, where=mask)
  if qk_ln:  # the hook must matter, or this case would test nothing beyond the plain one
    plain, _ = _reference(seed=1, qk_ln=False)
    assert relative_error(_hf_logits(plain, ids, mask), reference, where=mask) > 1e-2


def test_qk_norm_flag_and_weights_must_agree(tmp_path):
  """A checkpoint with q_ln / k_ln under a config without qk_ln (or the reverse) is refused,
  naming the keys, rather than silently dropping or inventing the norms."""
  model, norms = _reference(seed=2, qk_ln=True)
  tensors = _mosaicml_tensors(model, norms, MOSAIC_GPT_KEYS)
  path = _write(tmp_path / "extra", _mosaic_gpt_config(qk_ln=False), tensors)
  with pytest.raises(CheckpointMismatchError, match=r"transformer\.blocks\.1\.attn\.k_ln\.weight"):
    load_hf_lm(path)
  tensors = {k: v for k, v in tensors.items() if "_ln." not in k}
  path = _write(tmp_path / "missing", _mosaic_gpt_config(qk_ln=True), tensors)
  with pytest.raises(CheckpointMismatchError, match=r"transformer\.blocks\.0\.attn\.q_ln\.weight"):
    load_hf_lm(path)


def test_openflamingo_wrapped_mosaic_gpt_keys(tmp_path):
  """OpenFlamingo's `lang_encoder.` prefix and `decoder_layer.` wrapping, on MosaicGPT names."""
  model, norms = _reference(seed=3, qk_ln=True)
  tensors = {k: v.numpy() for k, v in _mosaicml_tensors(model, norms, MOSAIC_GPT_KEYS).items()}
  lm = lm_only_config(lm_config_from_hf(_mosaic_gpt_config(qk_ln=True))).lm
  plain = StateDict(tensors)
  layers, top = convert_lm(plain, lm)
  plain.finish()
  wrapped = {"lang_encoder." + re.sub(r"^(transformer\.blocks\.\d+\.)", r"\1decoder_layer.", k): v
             for k, v in tensors.items()}
  sd = StateDict(wrapped)
  layers2, top2 = convert_lm(sd, lm, prefix="lang_encoder.")
  sd.finish()
  for a, b in [(layers, layers2), (top, top2)]:
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
  assert set(layers[0]["attn"]) == {"query", "key", "value", "out", "q_norm", "k_norm"}


def test_released_configs():
  """The released LMs' configs at full size: mpt-1b-redpajama-200b (mosaic_gpt) and mpt-7b."""
  mpt1b = _mosaic_gpt_config(qk_ln=True, d_model=2048, n_heads=16, n_layers=24,
                             max_seq_len=2048, vocab_size=50432)
  assert lm_config_from_hf(mpt1b) == dict(
      family="mpt", vocab_size=50432, d_model=2048, num_layers=24, num_heads=16, mlp_dim=8192,
      activation="gelu", norm_eps=1e-5, use_bias=False, tie_embeddings=True,
      alibi_bias_max=8.0, qk_norm=True, max_seq_len=2048)
  mpt7b = _mosaicml_mpt_config(qk_ln=False, d_model=4096, n_heads=32, n_layers=32,
                               max_seq_len=2048, vocab_size=50432)
  assert lm_config_from_hf(mpt7b) == dict(
      family="mpt", vocab_size=50432, d_model=4096, num_layers=32, num_heads=32, mlp_dim=16384,
      activation="gelu", norm_eps=1e-5, use_bias=False, tie_embeddings=True,
      alibi_bias_max=8.0, qk_norm=False, max_seq_len=2048)


@pytest.mark.parametrize("config,field", [
    (_mosaic_gpt_config(False, attn_clip_qkv=6.0), "attn_clip_qkv"),
    (_mosaic_gpt_config(False, softmax_scale=0.5), "softmax_scale"),
    (_mosaic_gpt_config(False, logit_scale="inv_sqrt_d_model"), "logit_scale"),
    (_mosaic_gpt_config(False, no_bias=False), "no_bias"),
    (_mosaic_gpt_config(False, alibi=False), "alibi"),
    (_mosaic_gpt_config(False, n_heads=6, d_model=48), "n_heads"),
    (_mosaic_gpt_config(False, prefix_lm=True), "prefix_lm"),
    (_mosaic_gpt_config(False, multiquery_attention=True), "multiquery_attention"),
    (_mosaic_gpt_config(False, norm_type="rmsnorm"), "norm_type"),
    (_mosaicml_mpt_config(False, attn={"clip_qkv": 6.0}), "attn_config.clip_qkv"),
    (_mosaicml_mpt_config(False, attn={"softmax_scale": 0.5}), "attn_config.softmax_scale"),
    (_mosaicml_mpt_config(False, attn={"alibi": False}), "attn_config.alibi"),
    (_mosaicml_mpt_config(False, attn={"attn_type": "grouped_query_attention"}),
     "attn_config.attn_type"),
    (_mosaicml_mpt_config(False, attn={"rope": True}), "attn_config.rope"),
    (_mosaicml_mpt_config(False, logit_scale=0.5), "logit_scale"),
    (_mosaicml_mpt_config(False, no_bias=False), "no_bias"),
    (_mosaicml_mpt_config(False, norm_type="rmsnorm"), "norm_type"),
    (_mosaicml_mpt_config(False, ffn_config={"ffn_type": "mptgeglu"}), "ffn_config.ffn_type"),
    # MosaicML's MPTConfig defaults no_bias to False (HF's to True): a remote-code
    # config.json without it means biases.
    ({k: v for k, v in _mosaicml_mpt_config(False).items() if k != "no_bias"}, "no_bias"),
])
def test_unsupported_fields_are_refused(config, field):
  with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: "):
    lm_config_from_hf(config)
