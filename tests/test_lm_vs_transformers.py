"""Bare-LM parity against HF transformers (LLaMA, MPT, GPT-NeoX) through `load_hf_lm`.

Tiny random HF models are saved with `save_pretrained` (safetensors or .bin), loaded by
our converter and run through `DecoderLM(with_xattn=False)` on a batch of 2 whose second
row is right-padded; logits must match on the non-pad positions.
"""
import os

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import jax
import jax.numpy as jnp

from flamingo_jax.config import ConfigError
from flamingo_jax.convert.hf_lm import (convert_lm, lm_config_from_hf, lm_only_config,
                                        load_hf_lm)
from flamingo_jax.convert.state_dict import CheckpointMismatchError, StateDict, load
from flamingo_jax.lm.decoder import DecoderLM
from tests.parity import assert_parity

VOCAB, T, PAD = 160, 12, 4


def _llama(**kw):
  base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rope_theta=5000.0, rms_norm_eps=1e-5, initializer_range=0.1,
              attn_implementation="eager")
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**base, **kw}))


def _mpt(**kw):
  base = dict(vocab_size=VOCAB, d_model=48, n_heads=6, n_layers=2, expansion_ratio=4,
              max_seq_len=32, initializer_range=0.1)
  return transformers.MptForCausalLM(transformers.MptConfig(**{**base, **kw}))


def _neox(**kw):
  base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, rotary_pct=0.25, rotary_emb_base=10000,
              max_position_embeddings=64, initializer_range=0.1, attn_implementation="eager")
  return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**base, **kw}))


CASES = {
    "llama_gqa": (lambda: _llama(), True),
    "llama_llama3_tied_bias": (lambda: _llama(
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16)), False),
    "llama_linear_mha_head_dim": (lambda: _llama(
        num_key_value_heads=4, head_dim=24, rope_scaling=dict(type="linear", factor=2.0)), True),
    "mpt": (lambda: _mpt(), True),
    "mpt_bin": (lambda: _mpt(n_heads=4, d_model=64), False),
    "neox_parallel": (lambda: _neox(), True),
    "neox_sequential_bin": (lambda: _neox(use_parallel_residual=False), False),
}


def _save(make, tmp_path, safe: bool, seed: int = 0) -> tuple[str, torch.nn.Module]:
  torch.manual_seed(seed)
  model = make().eval()
  with torch.no_grad():  # norms at 1 and biases at 0 would hide swapped or dropped tensors
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  path = str(tmp_path / "hf")
  model.save_pretrained(path, safe_serialization=safe)
  return path, model


def _batch(seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, (2, T))
  mask = np.ones((2, T), np.int64)
  mask[1, T - PAD:] = 0
  return ids, mask


def _hf_logits(model, ids, mask) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _our_logits(path, ids, mask, every=1, placement="last") -> np.ndarray:
  lm, params = load_hf_lm(path, every=every, placement=placement)
  model = DecoderLM(lm_only_config(lm, every, placement), with_xattn=False)
  apply = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))  # faster than eager here
  return np.asarray(apply(params, jnp.asarray(ids), jnp.asarray(mask)))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, tmp_path):
  make, safe = CASES[name]
  path, model = _save(make, tmp_path, safe)
  assert any(f.endswith(".safetensors" if safe else ".bin") for f in os.listdir(path))
  ids, mask = _batch()
  assert_parity(_our_logits(path, ids, mask), _hf_logits(model, ids, mask), where=mask)


def test_config_fields(tmp_path):
  lm = lm_config_from_hf(_neox().config)
  assert (lm["family"], lm["rotary_pct"], lm["use_bias"], lm["tie_embeddings"]) == (
      "gpt_neox", 0.25, True, False)
  lm = lm_config_from_hf(_llama(rope_scaling=dict(type="linear", factor=2.0)).config.to_dict())
  assert lm["num_kv_heads"] == 2 and lm["rope_scaling"] == dict(kind="linear", factor=2.0)
  lm = lm_config_from_hf(_mpt().config.to_dict())
  assert (lm["mlp_dim"], lm["alibi_bias_max"], lm["tie_embeddings"]) == (192, 8.0, True)


@pytest.mark.parametrize("config,match", [
    ({"model_type": "gpt2"}, r"model_type: 'gpt2'.*'llama', 'mpt', 'gpt_neox'"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
     "rope_scaling: type 'yarn'"),
    ({"model_type": "mpt", "attn_config": {"clip_qkv": 6.0}}, "attn_config.clip_qkv"),
    ({"model_type": "mpt", "attn_config": {"softmax_scale": 0.5}}, "attn_config.softmax_scale"),
])
def test_unsupported_configs_are_refused(config, match):
  with pytest.raises(ConfigError, match=match):
    lm_config_from_hf(config)


LAYOUTS = {"llama": [(2, "first"), (2, "last"), (3, "first"), (3, "last"), (5, "first")],
           "gpt_neox": [(2, "last"), (3, "first")]}


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_xattn_layout_does_not_change_bare_lm(family, tmp_path):
  """5 layers: every=2 and 3 leave a 1- and 2-layer unscanned tail; every=5 is one group."""
  make = (lambda: _llama(num_hidden_layers=5)) if family == "llama" else (
      lambda: _neox(num_hidden_layers=5))
  path, model = _save(make, tmp_path, safe=True, seed=1)
  ids, mask = _batch(1)
  reference = _our_logits(path, ids, mask)
  assert_parity(reference, _hf_logits(model, ids, mask), where=mask)
  for every, placement in LAYOUTS[family]:
    logits = _our_logits(path, ids, mask, every, placement)
    np.testing.assert_array_equal(logits, reference, err_msg=f"every={every}, placement={placement}")


def test_prefixed_and_openflamingo_wrapped_keys(tmp_path):
  path, _ = _save(lambda: _llama(), tmp_path, safe=True)
  lm = lm_only_config(lm_config_from_hf(transformers.AutoConfig.from_pretrained(path))).lm
  tensors = load(path)
  plain = StateDict(tensors)
  layers, top = convert_lm(plain, lm)
  plain.finish()
  wrapped = {"lang_encoder." + k.replace("model.layers.0.", "model.layers.0.decoder_layer.")
                                 .replace("model.layers.1.", "model.layers.1.decoder_layer."): v
             for k, v in tensors.items()}
  sd = StateDict(wrapped)
  layers2, top2 = convert_lm(sd, lm, prefix="lang_encoder.")
  sd.finish()
  for a, b in [(layers, layers2), (top, top2)]:
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


def test_mismatched_checkpoint_names_every_bad_key(tmp_path):
  path, _ = _save(lambda: _llama(), tmp_path, safe=True)
  file = f"{path}/model.safetensors"
  tensors = safetensors.torch.load_file(file)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
  tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
  safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(CheckpointMismatchError) as err:
    load_hf_lm(path)
  message = str(err.value)
  for key in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.extra.weight",
              "model.layers.0.self_attn.k_proj.weight"):
    assert key in message, message
