"""Packing (train/packing.py): rows of several datasets as segments of one LM call give
each row's own logits, for every LM family."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decode_models
from flamingo_jax.train import packing, step as step_lib


def test_plan_places_rows_first_fit_longest_first():
  # Per shard: 1 row of 8 tokens (2 slots), 3 of 4 tokens (1 slot), 2 of 2 (text only).
  layout = packing.plan({"long": (1, 8, 2), "mid": (3, 4, 1), "short": (2, 2, 0)})
  assert (layout.length, layout.rows, layout.slots) == (8, 3, 2)
  np.testing.assert_array_equal(layout.segments, [[1] * 8, [1] * 4 + [2] * 4, [1] * 4 + [2, 2, 3, 3]])
  np.testing.assert_array_equal(layout.positions[2], [0, 1, 2, 3, 0, 1, 0, 1])
  names = layout.names  # ("long", "mid", "short"): streams of 8, 12 and 4 tokens
  np.testing.assert_array_equal(layout.dataset[2], [names.index("mid")] * 4 + [names.index("short")] * 4)
  np.testing.assert_array_equal(layout.token_source.reshape(3, 8)[2], [16, 17, 18, 19, 20, 21, 22, 23])
  # Media: long's two slots, then mid's rows 0 and 1 in row 1 and row 2 alone.
  np.testing.assert_array_equal(layout.slot_source.reshape(3, 2), [[0, 1], [2, 3], [4, 5]])
  np.testing.assert_array_equal(layout.slot_offset["mid"], [0, 1, 0])
  assert not layout.one_segment_a_row
  assert packing.plan({"a": (3, 8, 1), "b": (2, 8, 0)}).one_segment_a_row


def datasets(config, seed=0):
  """Three datasets of the tiny model: 12 tokens with two images, 4 tokens with one
  (a padded row among them), 6 tokens of text only."""
  rng = np.random.default_rng(seed)
  img = config.media_token_id
  words = lambda *shape: rng.integers(10, 200, shape).astype(np.int32)

  def dataset(rows, t, media):
    ids = words(rows, t)
    ids[:, 0] = img if media else ids[:, 0]
    if media == 2:
      ids[:, t // 2] = img
    batch = dict(input_ids=ids, targets=words(rows, t), loss_mask=np.ones((rows, t), np.float32),
                 attention_mask=np.ones((rows, t), np.int32))
    if media:
      batch["images"] = rng.normal(size=(rows, media, 1, 32, 32, 3)).astype(np.float32)
    return batch

  out = dict(long=dataset(2, 12, 2), mid=dataset(4, 4, 1), text=dataset(2, 6, 0))
  out["mid"]["attention_mask"][1, 3:] = 0
  return out


@pytest.mark.parametrize("family", list(decode_models.LM))
def test_packed_rows_give_each_rows_own_logits(family):
  config = decode_models.make_config(family, "first")
  model, params = decode_models.model_and_params(config)
  batches = datasets(config)
  inputs = {n: step_lib._lm_inputs(config, b) for n, b in batches.items()}
  media = {n: model.apply({"params": params}, b["images"], method=type(model).encode_media)
           for n, b in batches.items() if "images" in b}
  packed, layout = packing.pack(inputs, media, shards=1)
  # 12 (2 media) | 12 | 6+6 (text) | 4+4+4 (3 media) | 4 + padding
  assert (layout.rows, layout.slots) == (5, 3)
  assert layout.fill == pytest.approx((2 * 12 + 4 * 4 + 2 * 6) / (5 * 12))

  def logits(x, segments="given"):
    return model.apply({"params": params}, x["input_ids"], x["attention_mask"], media=x.get("media"),
                       media_index=x["media_index"], media_mask=x.get("media_mask"),
                       positions=x.get("positions"),
                       segments=x.get("segments") if segments == "given" else None,
                       method=type(model).lm_logits)
  alone = jnp.concatenate([logits(dict(inputs[n], media=media.get(n))).reshape(-1, config.lm.vocab_size)
                           for n in layout.names])
  real = layout.token_source < len(alone)
  real &= np.asarray(packed["attention_mask"]).reshape(-1) > 0
  want = np.asarray(alone)[layout.token_source[real]]
  got = np.asarray(logits(packed)).reshape(-1, config.lm.vocab_size)[real]
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  # Without segments, later segments see earlier ones: the test can fail.
  leaky = np.asarray(logits(packed, segments=None)).reshape(-1, config.lm.vocab_size)[real]
  assert np.abs(leaky - want).max() > 1e-2


def test_losses_packed_equal_each_datasets_alone():
  """summed_losses over the three datasets at once = each alone (values, not shapes)."""
  config = decode_models.make_config("llama", "last")
  model, params = decode_models.model_and_params(config)
  batches = datasets(config, seed=1)
  together = step_lib.summed_losses(model, params, batches)
  for n, b in batches.items():
    np.testing.assert_allclose(together[n], step_lib.summed_loss(model, params, b), rtol=1e-5)
  assert len({float(v) for v in together.values()}) == 3
