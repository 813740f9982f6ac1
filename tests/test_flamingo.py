"""Flamingo end to end on the tiny config: gates, image-causal masking, text-only, bad input."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from config_files import load_config
from flamingo_jax.config import FlamingoConfig
from flamingo_jax.inputs import FlamingoInputError
from flamingo_jax.lm import token_rows
from flamingo_jax.lm.decoder import DecoderLM
from flamingo_jax.model import Flamingo
from parity import relative_error


def make_config(**overrides) -> FlamingoConfig:
  model = load_config("tiny").model.to_dict()
  model.update(overrides)
  return FlamingoConfig.from_dict(model)


CONFIG = make_config()
IMG, EOC = CONFIG.media_token_id, CONFIG.eoc_token_id
# Two rows: text, <image>, text, <image>, text; the second row is right-padded.
INPUT_IDS = jnp.array([[5, 6, IMG, 7, 8, 9, EOC, IMG, 10, 11, 12, EOC],
                       [13, IMG, 14, 15, EOC, IMG, 16, 17, EOC, 0, 0, 0]])
ATTENTION_MASK = (jnp.arange(12)[None] < jnp.array([[12], [9]])).astype(jnp.int32)


def images(seed=0, batch=2, media=2, frames=1):
  return jax.random.normal(jax.random.key(seed), (batch, media, frames, 32, 32, 3))


def init(config=CONFIG, gates=0.7):
  model = Flamingo(config)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), images(), INPUT_IDS, ATTENTION_MASK))["params"]
  # Non-zero gates, so the xattn blocks act.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, gates) if p[-1].key.endswith("_gate") else x, params)
  return model, params


def without_xattn(lm_params):
  """The bare LM's params: the same tree less the xattn blocks."""
  return {k: {n: v for n, v in sub.items() if n != "xattn"} if k in ("groups", "tail") else sub
          for k, sub in lm_params.items()}


@pytest.fixture(scope="module")
def model_params():
  return init()


def test_zero_gates_equal_the_bare_lm_exactly():
  model, params = init(gates=0.0)
  logits = jax.jit(model.apply)({"params": params}, images(), INPUT_IDS, ATTENTION_MASK)
  bare = jax.jit(DecoderLM(CONFIG, with_xattn=False).apply)(
      {"params": without_xattn(params["lm"])}, INPUT_IDS, ATTENTION_MASK)
  np.testing.assert_array_equal(logits, bare)


def test_new_token_rows_replace_the_frozen_rows(model_params):
  """<image> / <|endofchunk|> rows train as their own params; filled from the frozen table
  they reproduce it, and the frozen table's rows for them are then unused."""
  model, params = model_params
  lm = params["lm"]
  plain = Flamingo(make_config(trainable_token_ids=()))
  plain_params = {**params, "lm": {k: v for k, v in lm.items() if k != "new_tokens"}}
  expected = jax.jit(plain.apply)({"params": plain_params}, images(), INPUT_IDS, ATTENTION_MASK)
  rows = token_rows.rows_from_lm(lm, CONFIG.trainable_token_ids, CONFIG.lm.tie_embeddings)
  filled = {**params, "lm": {**lm, "new_tokens": rows}}
  apply = jax.jit(model.apply)
  same = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # matmul order
  same(apply({"params": filled}, images(), INPUT_IDS, ATTENTION_MASK), expected)
  # Changing the frozen table's rows for those ids changes nothing; changing the new rows does.
  frozen_rows_changed = {**filled, "lm": {**filled["lm"], "embed": {"embedding": lm["embed"]["embedding"].at[jnp.array(CONFIG.trainable_token_ids)].set(3.0)}}}
  same(apply({"params": frozen_rows_changed}, images(), INPUT_IDS, ATTENTION_MASK), expected)
  new_rows_changed = {**filled, "lm": {**filled["lm"], "new_tokens": jax.tree.map(lambda x: x + 1.0, rows)}}
  out = apply({"params": new_rows_changed}, images(), INPUT_IDS, ATTENTION_MASK)
  ids = np.asarray(CONFIG.trainable_token_ids)
  others = np.setdiff1d(np.arange(CONFIG.lm.vocab_size), ids)
  assert not np.allclose(out[:, :, others], expected[:, :, others])  # via the embedding
  assert not np.allclose(out[:, :, ids], expected[:, :, ids])  # via the head


def test_tokens_before_the_first_image_ignore_images(model_params):
  model, params = model_params
  a = model.apply({"params": params}, images(0), INPUT_IDS, ATTENTION_MASK)
  b = model.apply({"params": params}, images(1), INPUT_IDS, ATTENTION_MASK)
  # Row 0: positions 0-1 precede the first <image>; row 1: position 0.
  np.testing.assert_array_equal(a[0, :2], b[0, :2])
  np.testing.assert_array_equal(a[1, :1], b[1, :1])
  assert not np.allclose(a[0, 2:], b[0, 2:])


def test_changing_the_second_image_leaves_tokens_before_it(model_params):
  model, params = model_params
  base = images(0)
  changed = base.at[:, 1].set(images(5)[:, 1])
  a = model.apply({"params": params}, base, INPUT_IDS, ATTENTION_MASK)
  b = model.apply({"params": params}, changed, INPUT_IDS, ATTENTION_MASK)
  np.testing.assert_array_equal(a[0, :7], b[0, :7])  # second <image> of row 0 is at 7
  assert not np.allclose(a[0, 7:], b[0, 7:])


def test_explicit_media_index_next_image_association(model_params):
  """The paper's p_next mode: text may look at the *next* image; given explicitly."""
  model, params = model_params
  media_index = jnp.array([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]] * 2)
  a = model.apply({"params": params}, images(0), INPUT_IDS, ATTENTION_MASK, media_index=media_index)
  b = model.apply({"params": params}, images(0).at[:, 0].set(images(3)[:, 0]), INPUT_IDS,
                  ATTENTION_MASK, media_index=media_index)
  assert not np.allclose(a[0, :2], b[0, :2])  # text before the first <image> now sees image 0


def test_text_only_batch(model_params):
  model, params = model_params
  text = jnp.array([[5, 6, 7, 8], [9, 10, 11, 12]])
  logits = model.apply({"params": params}, None, text)
  assert logits.shape == (2, 4, CONFIG.lm.vocab_size)
  bare = DecoderLM(CONFIG, with_xattn=False).apply({"params": without_xattn(params["lm"])}, text)
  np.testing.assert_array_equal(logits, bare)  # no media: the paper's block adds nothing


def test_video_frames(model_params):
  model, params = model_params
  video = images(0, frames=3)  # 3 frames per media item, temporal embeddings added
  logits = model.apply({"params": params}, video, INPUT_IDS, ATTENTION_MASK)
  assert logits.shape == (2, 12, CONFIG.lm.vocab_size) and np.isfinite(logits).all()
  # Each frame counts: changing the last frame of image 0 changes the text after it.
  changed = video.at[:, 0, 2].set(images(7)[:, 0, 0])
  other = model.apply({"params": params}, changed, INPUT_IDS, ATTENTION_MASK)
  np.testing.assert_array_equal(logits[0, :2], other[0, :2])
  assert not np.allclose(logits[0, 2:], other[0, 2:])


# A tiny NFNet (total stride 32): a convolutional tower takes any resolution.
NFNET = dict(kind="nfnet", variant="F0", image_size=32, depths=(1, 1, 1, 1),
             widths=(16, 32, 32, 32), stem_width=16, group_width=8, final_width=32)


def test_resolution_changes_visual_tokens_not_the_output_shape():
  """The resampler reads any number of visual tokens: 32 px gives the NFNet a 1x1 grid,
  64x96 px a 2x3 grid, and both give the LM the same number of visual tokens. The whole
  image is used: changing only its bottom-right corner changes the text after it."""
  config = make_config(vision=NFNET)
  model, params = init(config)
  vision_tokens = jax.jit(lambda x: model.apply({"params": params}, x, method=lambda m, x: m.vision(x)))
  encode = jax.jit(lambda x: model.apply({"params": params}, x, method=Flamingo.encode_media))
  logits = jax.jit(model.apply)
  small = images(0)
  large = jax.random.normal(jax.random.key(4), (2, 2, 1, 64, 96, 3))
  assert vision_tokens(small[:, 0, 0]).shape[1] == 1
  assert vision_tokens(large[:, 0, 0]).shape[1] == 6
  assert encode(small).shape == encode(large).shape == (2, 2, CONFIG.resampler.num_latents, 32)
  a = logits({"params": params}, small, INPUT_IDS, ATTENTION_MASK)
  b = logits({"params": params}, large, INPUT_IDS, ATTENTION_MASK)
  assert a.shape == b.shape == (2, 12, CONFIG.lm.vocab_size) and np.isfinite(b).all()
  assert not np.allclose(a[0, 2:], b[0, 2:])
  corner = large.at[:, 0, 0, 32:, 64:].set(jax.random.normal(jax.random.key(5), (2, 32, 32, 3)))
  tokens, tokens_corner = encode(large), encode(corner)
  np.testing.assert_array_equal(tokens[:, 1], tokens_corner[:, 1])
  assert np.abs(tokens[:, 0] - tokens_corner[:, 0]).max() > 1e-5  # (near-uniform attention at init)
  c = logits({"params": params}, corner, INPUT_IDS, ATTENTION_MASK)
  np.testing.assert_array_equal(b[0, :2], c[0, :2])  # before the first <image>
  assert not np.array_equal(b[0, 2:], c[0, 2:])


def test_remat_matches(model_params):
  ref_model, params = model_params
  model = Flamingo(make_config(remat_policy="full"))
  loss = lambda m: lambda p: m.apply({"params": p}, images(), INPUT_IDS, ATTENTION_MASK).mean()
  g1 = jax.jit(jax.grad(loss(model)))(params)
  g2 = jax.jit(jax.grad(loss(ref_model)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)
  # Vision features are stop-gradient: the frozen tower gets exactly zero gradient.
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g1["vision"]))


def test_the_gradient_program_holds_one_layer_of_each_scan():
  """The LM's groups, the LM layers inside a group (OpenFlamingo's placement: the runs
  before and from the xattn block) and the resampler's layers are scans: the compiled
  training gradient holds as many matmuls at twice every depth (unrolled, each layer would
  be its own: checked by mutation)."""
  placement = "last"
  def dots(num_layers, every, depth):
    model = load_config("tiny").model.to_dict()
    model["lm"]["num_layers"], model["resampler"]["depth"] = num_layers, depth
    model["xattn"].update(every=every, placement=placement)
    flamingo = Flamingo(FlamingoConfig.from_dict(model))
    params = jax.eval_shape(flamingo.init, jax.random.key(1), images(), INPUT_IDS, ATTENTION_MASK)
    loss = lambda p: flamingo.apply(p, images(), INPUT_IDS, ATTENTION_MASK).mean()
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()  # calls inlined
    return len(re.findall(r" dot\(", hlo))
  assert dots(num_layers=4, every=2, depth=2) == dots(num_layers=8, every=4, depth=4)


def test_bfloat16_matches_float32(model_params):
  """bf16 activations (fp32 weights) give the fp32 logits up to bf16 rounding: relative
  error well under 5% of the largest logit, but not zero (the compute really is bf16)."""
  fp32_model, params = model_params
  bf16 = Flamingo(make_config(dtype="bfloat16"))
  out = jax.jit(bf16.apply)({"params": params}, images(), INPUT_IDS, ATTENTION_MASK)
  ref = jax.jit(fp32_model.apply)({"params": params}, images(), INPUT_IDS, ATTENTION_MASK)
  assert out.dtype == jnp.float32 and np.isfinite(out).all()
  err = relative_error(out, ref, where=ATTENTION_MASK)
  print("bf16 vs fp32: max relative error", err)
  assert 0 < err < 0.05, err


@pytest.mark.parametrize("kwargs,field", [
    (dict(images=images()[:, :, 0]), "images"),  # rank 5: no frames axis
    (dict(images=images().astype(jnp.int32)), "images"),
    (dict(images=jnp.zeros((2, 2, 1, 16, 16, 3))), "images"),  # wrong resolution for the ViT
    (dict(images=jnp.zeros((2, 2, 1, 32, 32, 1))), "images"),  # channels
    (dict(images=jnp.zeros((3, 2, 1, 32, 32, 3))), "images"),  # batch
    (dict(images=images(media=1)), "input_ids"),  # 2 <image> tokens, 1 slot
    (dict(media_index=jnp.full((2, 12), 2)), "media_index"),  # out of range
    (dict(media_index=jnp.full((2, 12), -2)), "media_index"),
    (dict(media_index=jnp.zeros((2, 11), jnp.int32)), "media_index"),
    (dict(media_mask=jnp.array([[True, False], [True, True]])), "media_index"),  # empty slot used
    (dict(attention_mask=jnp.ones((2, 11))), "attention_mask"),
    (dict(input_ids=INPUT_IDS.astype(jnp.float32)), "input_ids"),
])
def test_bad_input_names_the_field(model_params, kwargs, field):
  model, params = model_params
  args = dict(images=images(), input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK)
  args.update(kwargs)
  with pytest.raises(FlamingoInputError, match=f"^{field}:"):
    model.apply({"params": params}, args.pop("images"), args.pop("input_ids"), **args)
