"""OpenFlamingo import: logits parity against open_flamingo itself, strict key accounting,
and the convert CLI's round trip.

Tiny OpenFlamingo models (open_clip ViT, MPT / LLaMA / GPT-NeoX LM, a BPE tokenizer) are
built offline by `tests/tiny_openflamingo.py` and saved the way users get the released
ones: an OpenFlamingo `checkpoint.pt`, an HF LM directory, open_clip weights and an HF
tokenizer directory. The batch has two rows with two interleaved images each, text before
the first image, and right padding in the second row.
"""
import functools
import json
import os

import numpy as np
import pytest
import torch

import jax

pytest.importorskip("open_flamingo")
pytest.importorskip("open_clip")

from flamingo_jax.convert import openflamingo as of  # noqa: E402
from flamingo_jax.convert.state_dict import CheckpointMismatchError  # noqa: E402
from flamingo_jax.model import Flamingo  # noqa: E402
from tests import tiny_openflamingo as tiny  # noqa: E402
from tests.parity import assert_parity, relative_error  # noqa: E402


@functools.lru_cache(maxsize=None)
def _forward(config):
  """One jitted forward per config, shared by the tests (compiling dominates their time)."""
  return jax.jit(Flamingo(config).apply)


def _logits(model, params, ids, mask, images):
  # Committed arrays throughout (orbax restores committed ones): one compile per config.
  params = jax.device_put(params, jax.devices()[0])
  return np.asarray(_forward(model.config)({"params": params}, images, ids, mask))


class Built:
  """The saved artefacts of one tiny OpenFlamingo model and its reference logits."""

  def __init__(self, root, family):
    self.root = root
    self.reference, self.clip_cfg, self.tokenizer = tiny.build(root, family)
    self.ids, self.mask, self.images = tiny.batch(self.tokenizer)
    self.want = tiny.reference_logits(self.reference, self.ids, self.mask, self.images)

  def path(self, name):
    return os.path.join(self.root, name)

  def load(self, checkpoint="checkpoint.pt", **kw):
    return of.load_openflamingo(
        self.path(checkpoint), self.path("vision.pt"), self.path("lm"), self.path("tokenizer"),
        cross_attn_every_n_layers=tiny.CROSS_ATTN_EVERY, vision_config=self.clip_cfg, **kw)


_BUILT = {}


def _build(family, tmp_path_factory):
  if family not in _BUILT:
    _BUILT[family] = Built(str(tmp_path_factory.mktemp(family)), family)
  return _BUILT[family]


@pytest.fixture(scope="module", params=["mpt", "llama", "gpt_neox"])
def built(request, tmp_path_factory):
  return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def mpt(tmp_path_factory):
  return _build("mpt", tmp_path_factory)


def test_logits_match_open_flamingo(built):
  model, params, tokenizer = built.load()
  # Same ids as OpenFlamingo's tokenizer, special tokens included.
  assert len(tokenizer) == len(built.tokenizer)
  for token in (of.IMAGE, of.ENDOFCHUNK, of.PAD):
    assert tokenizer.convert_tokens_to_ids(token) == built.tokenizer.convert_tokens_to_ids(token)
  assert model.config.media_token_id == built.reference.media_token_id
  assert model.config.eoc_token_id == built.reference.eoc_token_id

  got = _logits(model, params, built.ids, built.mask, built.images)
  err = relative_error(got, built.want, built.mask)
  print(f"max relative error ({model.config.lm.family}): {err:.2e}")
  assert_parity(got, built.want, where=built.mask)

  # The comparison must exercise the xattn blocks: with the gates shut, logits move far.
  shut = jax.tree.map(lambda x: x, params)
  for gate in ("attn_gate", "ff_gate"):
    shut["lm"]["groups"]["xattn"][gate] = 0 * shut["lm"]["groups"]["xattn"][gate]
  assert relative_error(_logits(model, shut, built.ids, built.mask, built.images),
                        built.want, built.mask) > 1e-2


def test_final_ln_switch_matches_new_open_clip(mpt):
  """open_clip >= 2.23 (final LN applied to the tokens) ↔ `final_ln_on_tokens=True`."""
  mpt.reference.vision_encoder.final_ln_after_pool = False
  try:
    want = tiny.reference_logits(mpt.reference, mpt.ids, mpt.mask, mpt.images)
  finally:
    mpt.reference.vision_encoder.final_ln_after_pool = True
  model, params, _ = mpt.load(final_ln_on_tokens=True)
  got = _logits(model, params, mpt.ids, mpt.mask, mpt.images)
  assert_parity(got, want, where=mpt.mask)
  assert relative_error(got, mpt.want, mpt.mask) > 1e-3  # the switch matters


def _save_checkpoint(built, name, edit):
  sd = torch.load(built.path("checkpoint.pt"))["model_state_dict"]
  edit(sd)
  torch.save(sd, built.path(name))
  return name


def test_mismatched_checkpoint_names_every_key(mpt):
  missing = "lang_encoder.transformer.blocks.1.gated_cross_attn_layer.attn.to_q.weight"
  misshaped = "perceiver.layers.2.1.1.weight"
  unexpected = "perceiver.media_time_embs"

  def edit(sd):
    del sd[missing]
    sd[misshaped] = sd[misshaped][:, :-1]
    sd[unexpected] = torch.zeros(4, 1, 32)

  with pytest.raises(CheckpointMismatchError) as e:
    mpt.load(_save_checkpoint(mpt, "broken.pt", edit))
  message = str(e.value)
  for key in (missing, misshaped, unexpected):
    assert key in message, message

  # Problems in several files are reported together.
  vision = torch.load(mpt.path("vision.pt"))
  vision["visual.extra"] = torch.zeros(3)
  torch.save(vision, mpt.path("vision_extra.pt"))
  with pytest.raises(CheckpointMismatchError) as e:
    of.load_openflamingo(mpt.path("broken.pt"), mpt.path("vision_extra.pt"), mpt.path("lm"),
                         mpt.path("tokenizer"), cross_attn_every_n_layers=tiny.CROSS_ATTN_EVERY,
                         vision_config=mpt.clip_cfg)
  for key in (missing, misshaped, unexpected, "visual.extra"):
    assert key in str(e.value)


def test_wrong_tokenizer_is_named(mpt, tmp_path):
  """A tokenizer other than the training one: the embedding's rows give it away."""
  tokenizer = tiny.make_tokenizer(str(tmp_path / "tok"))
  tokenizer.add_tokens(["<extra>"])
  tokenizer.save_pretrained(str(tmp_path / "tok"))
  with pytest.raises(CheckpointMismatchError, match="is --tokenizer the one"):
    of.load_openflamingo(mpt.path("checkpoint.pt"), mpt.path("vision.pt"), mpt.path("lm"),
                         str(tmp_path / "tok"), cross_attn_every_n_layers=tiny.CROSS_ATTN_EVERY,
                         vision_config=mpt.clip_cfg)


def test_ddp_prefix_and_layers_path_hint(mpt):
  name = _save_checkpoint(mpt, "ddp.pt", lambda sd: sd.update(
      {f"module.{k}": sd.pop(k) for k in list(sd)}))
  _, params, _ = mpt.load(name)
  _, want, _ = mpt.load()
  jax.tree.map(np.testing.assert_array_equal, params, want)

  # The xattn keys under another LM's layers path: the error says where they are.
  with pytest.raises(CheckpointMismatchError, match=r"under \['transformer.blocks'\]"):
    mpt.load(decoder_layers_attr_name="model.layers")


def test_tied_head_must_equal_embedding(mpt):
  def edit(sd):
    sd["lang_encoder.lm_head.weight"] = sd["lang_encoder.lm_head.weight"] + 1
  with pytest.raises(CheckpointMismatchError, match="lm_head.weight differs"):
    mpt.load(_save_checkpoint(mpt, "untied.pt", edit))


def test_cli_round_trip(mpt, tmp_path):
  # The vision config as a json file, the way the CLI is given one.
  clip_json = tmp_path / "clip.json"
  clip_json.write_text(json.dumps(mpt.clip_cfg))
  out = tmp_path / "converted"
  of.main(["--checkpoint", mpt.path("checkpoint.pt"), "--vision", mpt.path("vision.pt"),
           "--vision_config", str(clip_json), "--lm", mpt.path("lm"),
           "--tokenizer", mpt.path("tokenizer"),
           "--cross_attn_every_n_layers", str(tiny.CROSS_ATTN_EVERY), "--output", str(out)])
  model, params, tokenizer = of.load_converted(str(out))
  direct_model, direct_params, _ = mpt.load()
  assert model.config == direct_model.config
  text = "a photo<image>of a cat<|endofchunk|><PAD>"
  assert tokenizer(text)["input_ids"] == mpt.tokenizer(text)["input_ids"]
  np.testing.assert_array_equal(_logits(model, params, mpt.ids, mpt.mask, mpt.images),
                                _logits(direct_model, direct_params, mpt.ids, mpt.mask, mpt.images))


def test_open_clip_config_sources(tmp_path):
  vision_cfg = dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8)
  assert of.open_clip_config(None, "ViT-L-14")["quick_gelu"]  # OpenAI weights: QuickGELU
  assert of.open_clip_config(None, vision_cfg) == {"vision_cfg": vision_cfg}
  # A hub `open_clip_config.json` beside the weights is found without being named.
  (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"vision_cfg": vision_cfg}}))
  assert of.open_clip_config(str(tmp_path / "weights.bin")) == {"vision_cfg": vision_cfg}
  assert of.open_clip_config(str(tmp_path)) == {"vision_cfg": vision_cfg}
  # Nothing given or found: every released OpenFlamingo model's tower.
  assert of.open_clip_config(str(tmp_path / "sub" / "w.bin"))["vision_cfg"]["width"] == 1024
  with pytest.raises(ValueError, match="ViT-X"):
    of.open_clip_config(None, "ViT-X")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, as OpenAI shipped it
def test_openai_torchscript_vision_weights(mpt, tmp_path):
  """open_clip's 'openai' weights are OpenAI's TorchScript archive, not a state dict."""
  sd = torch.load(mpt.path("vision.pt"))
  root = torch.nn.Module()
  for key, value in sd.items():
    *path, leaf = key.split(".")
    module = root
    for part in path:
      if not hasattr(module, part):
        module.add_module(part, torch.nn.Module())
      module = getattr(module, part)
    module.register_buffer(leaf, value.half() if value.is_floating_point() else value)
  root.register_buffer("input_resolution", torch.tensor(32))  # as OpenAI's archives have
  torch.jit.save(torch.jit.script(root), str(tmp_path / "openai.pt"))
  got = of.load_vision_weights(str(tmp_path / "openai.pt"))
  assert sorted(got) == sorted(sd)
  for key, value in sd.items():
    np.testing.assert_array_equal(got[key], value.half().float().numpy())
