"""Our ViT vs tiny random open_clip and HF CLIP vision towers, float32."""
import functools

import flax.linen as nn
import jax
import numpy as np
import open_clip
import pytest
import torch
import transformers

from flamingo_jax import vision
from flamingo_jax.convert import vision as convert
from flamingo_jax.convert.state_dict import CheckpointMismatchError, check_tree
from parity import assert_parity, relative_error

IMAGE, PATCH, WIDTH = 32, 8, 32
VISION_CFG = dict(image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=2, head_width=16)


def _randomize(module: torch.nn.Module, seed: int) -> None:
  """Perturb every parameter, so LayerNorm scales / biases are not the identity."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def clip_model():
  torch.manual_seed(0)
  model = open_clip.model.CLIP(
      embed_dim=24, vision_cfg=dict(VISION_CFG), quick_gelu=False,
      text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1))
  _randomize(model, 1)
  model.visual.output_tokens = True
  return model.eval()


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)


@functools.cache
def _model(config):  # one compile per config
  model = vision.build(config)
  return model, jax.jit(model.apply)


def _ours(config, params, images):
  model, apply = _model(config)
  expected = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), images))["params"]
  check_tree(params, expected)
  return np.asarray(apply({"params": params}, images))


def _open_clip_tokens(model, images, keep_cls, final_ln_on_tokens):
  # open_clip 3.3: 'tok' pooling returns tokens without CLS, 'none' all of them; ln_post is
  # applied to the tokens unless final_ln_after_pool (then only to the pooled output).
  visual = model.visual
  visual.pool_type = "none" if keep_cls else "tok"
  visual.final_ln_after_pool = not final_ln_on_tokens
  with torch.no_grad():
    _, tokens = visual(torch.from_numpy(images).permute(0, 3, 1, 2))
  return tokens.numpy()


@pytest.mark.parametrize("keep_cls", [False, True])
@pytest.mark.parametrize("final_ln_on_tokens", [False, True])
def test_vit_matches_open_clip(clip_model, images, keep_cls, final_ln_on_tokens):
  config = convert.vit_config_from_open_clip(
      {"vision_cfg": VISION_CFG, "quick_gelu": False}, keep_cls=keep_cls,
      final_ln_on_tokens=final_ln_on_tokens)
  # The full CLIP state dict: text tower and visual.proj are skipped by name.
  params = convert.vit_params_from_open_clip(clip_model.state_dict(), config)
  ours = _ours(config, params, images)
  ref = _open_clip_tokens(clip_model, images, keep_cls, final_ln_on_tokens)
  assert ours.shape == (2, (IMAGE // PATCH) ** 2 + keep_cls, WIDTH)
  print(f"open_clip keep_cls={keep_cls} final_ln={final_ln_on_tokens}: "
        f"max rel err {relative_error(ours, ref):.2e}")
  assert_parity(ours, ref)


def test_vit_from_stripped_open_clip_tower(clip_model, images):
  config = convert.vit_config_from_open_clip(VISION_CFG, quick_gelu=False)
  params = convert.vit_params_from_open_clip(clip_model.visual.state_dict(), config)
  assert_parity(_ours(config, params, images), _open_clip_tokens(clip_model, images, False, False))


def test_open_clip_mismatch_names_every_key(clip_model):
  config = convert.vit_config_from_open_clip(VISION_CFG, quick_gelu=False)
  sd = dict(clip_model.visual.state_dict())
  del sd["transformer.resblocks.1.ln_2.bias"]
  sd["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3 * WIDTH, WIDTH + 1)
  sd["transformer.resblocks.0.ls_1.gamma"] = torch.ones(WIDTH)
  with pytest.raises(CheckpointMismatchError) as e:
    convert.vit_params_from_open_clip(sd, config)
  msg = str(e.value)
  for key in ("transformer.resblocks.1.ln_2.bias", "transformer.resblocks.0.attn.in_proj_weight",
              "transformer.resblocks.0.ls_1.gamma"):
    assert key in msg
  # A deeper config than the checkpoint: the missing block's keys are named.
  deeper = convert.vit_config_from_open_clip(dict(VISION_CFG, layers=3), quick_gelu=False)
  with pytest.raises(CheckpointMismatchError, match="transformer.resblocks.2.attn.in_proj_weight"):
    convert.vit_params_from_open_clip(clip_model.visual.state_dict(), deeper)


def test_open_clip_unsupported_options_rejected():
  with pytest.raises(ValueError, match="ls_init_value"):
    convert.vit_config_from_open_clip(dict(VISION_CFG, ls_init_value=0.1), quick_gelu=False)


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  cfg = transformers.CLIPVisionConfig(
      hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
      image_size=IMAGE, patch_size=PATCH, hidden_act="quick_gelu")
  model = transformers.CLIPVisionModel(cfg).eval()
  _randomize(model, 2)
  return model


@pytest.mark.parametrize("final_ln_on_tokens", [False, True])
def test_vit_matches_hf_clip(hf_model, images, final_ln_on_tokens):
  config = convert.vit_config_from_hf(hf_model.config, final_ln_on_tokens=final_ln_on_tokens)
  assert config.activation == "quick_gelu" and config.keep_cls
  params = convert.vit_params_from_hf(hf_model.state_dict(), config)
  ours = _ours(config, params, images)
  with torch.no_grad():
    ref = hf_model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)).last_hidden_state
    if final_ln_on_tokens:  # HF applies post_layernorm to the pooled CLS only
      ref = hf_model.vision_model.post_layernorm(ref)
  print(f"HF final_ln={final_ln_on_tokens}: max rel err {relative_error(ours, ref.numpy()):.2e}")
  assert_parity(ours, ref.numpy())


def test_hf_clip_model_skips_text_tower(hf_model):
  config = convert.vit_config_from_hf(hf_model.config)
  sd = {k: v for k, v in hf_model.state_dict().items()}
  sd.update({"text_model.embeddings.token_embedding.weight": torch.zeros(5, 4),
             "visual_projection.weight": torch.zeros(4, WIDTH), "logit_scale": torch.zeros(()),
             "vision_model.encoder.layers.0.extra": torch.zeros(1)})
  with pytest.raises(CheckpointMismatchError) as e:
    convert.vit_params_from_hf(sd, config)
  assert "1 unexpected key(s)" in str(e.value) and "vision_model.encoder.layers.0.extra" in str(e.value)
