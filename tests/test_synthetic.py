"""The synthetic few-shot task: determinism, resumption, sharding, pixels, rules, and its
evaluation's ranking (evaluation/tasks/synthetic.py)."""
import numpy as np
import pytest

from flamingo_jax.data import synthetic as S

TASK = S.TaskConfig()


def iterate(n, **kw):
  it = S.batch_iterator(8, **kw)
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# Pixel readers that know nothing of the renderer's parameters.

def foreground(pixels):
  """The coloured pixels: the background is grey, every palette colour saturated."""
  return pixels.max(-1) - pixels.min(-1) > 0.35


def read_colour(pixels) -> int:
  mean = pixels[foreground(pixels)].mean(0)
  return int(np.argmin(((S.PALETTE - mean) ** 2).sum(-1)))


def read_shape(pixels) -> int:
  mask = foreground(pixels)
  rows, cols = np.nonzero(mask)
  box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  fill = box.mean()
  if fill > 0.9:
    return S.SHAPES.index("square")
  if fill > 0.68:
    return S.SHAPES.index("circle")
  flipped = box[::-1]
  iou = (box & flipped).sum() / (box | flipped).sum()  # a cross is symmetric top-bottom
  return S.SHAPES.index("cross" if iou > 0.8 else "triangle")


def test_vocabulary():
  assert S.PAD_ID == 0 and S.VOCAB[S.MEDIA_TOKEN_ID] == "<image>"
  assert S.VOCAB[S.EOC_TOKEN_ID] == "<|endofchunk|>"
  assert len(set(S.VOCAB)) == S.VOCAB_SIZE == 3 + len(S.ANSWER_IDS)


def test_shapes_and_dtypes():
  batch = iterate(1)[0]
  m, t, s = TASK.num_media, TASK.seq_len, TASK.image_size
  expected = dict(images=((8, m, 1, s, s, 3), np.float32), media_mask=((8, m), np.bool_),
                  input_ids=((8, t), np.int32), attention_mask=((8, t), np.int32),
                  targets=((8, t), np.int32), loss_mask=((8, t), np.float32))
  assert set(batch) == set(expected)
  for k, (shape, dtype) in expected.items():
    assert batch[k].shape == shape and batch[k].dtype == dtype, k
  # One <image> per filled slot, images only in filled slots, targets = next token.
  np.testing.assert_array_equal((batch["input_ids"] == S.MEDIA_TOKEN_ID).sum(1),
                                batch["media_mask"].sum(1))
  assert not batch["images"][~batch["media_mask"]].any()
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])
  np.testing.assert_array_equal(batch["attention_mask"], batch["input_ids"] != S.PAD_ID)
  # The loss is on exactly the answer words, one per image.
  is_answer = np.isin(batch["targets"], S.ANSWER_IDS)
  np.testing.assert_array_equal(batch["loss_mask"], is_answer)
  np.testing.assert_array_equal(batch["loss_mask"].sum(1), batch["media_mask"].sum(1))


def test_train_shots_mix_every_count():
  shots = [S.episode(TASK, 0, S.TRAIN, i)["meta"]["shots"] for i in range(200)]
  assert set(shots) == set(range(TASK.max_shots + 1))


def test_deterministic_and_random_access():
  a = S.episode(TASK, 3, S.TRAIN, 17)
  b = S.episode(TASK, 3, S.TRAIN, 17)
  for k in S.BATCH_KEYS:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["images"], S.episode(TASK, 3, S.TRAIN, 18)["images"])
  assert not np.array_equal(a["images"], S.episode(TASK, 4, S.TRAIN, 17)["images"])
  assert not np.array_equal(a["images"], S.episode(TASK, 3, S.EVAL, 17)["images"])
  # Batch n of an iterator is the same whatever came before it.
  assert_batches_equal(iterate(3, seed=3)[2], S.batch_iterator(8, seed=3).batch_at(2))


def test_resume_from_state():
  it = S.batch_iterator(8, seed=1)
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert state == {"next_index": 24}
  expected = [next(it) for _ in range(2)]
  resumed = S.batch_iterator(8, seed=1, state=state)
  for want in expected:
    assert_batches_equal(next(resumed), want)
  with pytest.raises(ValueError, match="global batch boundary"):
    S.batch_iterator(8, state={"next_index": 5})


def test_processes_take_disjoint_shares_of_the_global_batch():
  full = iterate(2, seed=2)
  shares = [iterate(2, seed=2, process_index=p, process_count=2) for p in range(2)]
  for step in range(2):
    a, b = shares[0][step], shares[1][step]
    assert a["input_ids"].shape[0] == b["input_ids"].shape[0] == 4
    union = {k: np.concatenate([a[k], b[k]]) for k in a}
    assert_batches_equal(union, full[step])
    # Disjoint: no image of one share appears in the other.
    flat = lambda x: {r.tobytes() for r in x["images"][:, 0]}
    assert not flat(a) & flat(b)
  with pytest.raises(ValueError, match="multiple"):
    S.batch_iterator(6, process_count=4)


def test_pixels_encode_colour_and_shape():
  rng = np.random.default_rng(0)
  for _ in range(200):
    shape, colour = rng.integers(4, size=2)
    pixels = S.render(shape, colour, rng, TASK)
    assert pixels.shape == (32, 32, 3) and 0 <= pixels.min() and pixels.max() <= 1
    assert read_colour(pixels) == colour
    assert read_shape(pixels) == shape, S.SHAPES[shape]


@pytest.mark.parametrize("shots", [0, 1, 4])
def test_answers_follow_the_episode_rule(shots):
  rules = set()
  for i in range(40):
    ep = S.episode(TASK, 0, S.EVAL, i, shots=shots)
    rule = S.RULES[ep["meta"]["rule"]]
    rules.add(rule)
    n = shots + 1
    assert ep["media_mask"].sum() == n
    words = S.decode(ep["input_ids"]).split()
    assert words == sum([["<image>", w, "<|endofchunk|>"] for w in words[1::3]], [])
    for slot, word in enumerate(words[1::3]):
      pixels = S.denormalise(ep["images"][slot, 0])
      seen = (S.COLOURS[read_colour(pixels)] if rule == "colour"
              else S.SHAPES[read_shape(pixels)])
      assert word == seen, (i, slot, rule)
    assert S.TOKEN_ID[words[-2]] == ep["meta"]["answer"]
  assert rules == set(S.RULES)


def test_same_query_at_every_shot_count():
  zero = S.episode(TASK, 0, S.EVAL, 5, shots=0, loss_on="query")
  four = S.episode(TASK, 0, S.EVAL, 5, shots=4, loss_on="query")
  np.testing.assert_array_equal(zero["images"][0], four["images"][4])
  assert zero["meta"]["answer"] == four["meta"]["answer"]
  assert four["loss_mask"].sum() == 1 and four["targets"][four["loss_mask"] == 1] == four["meta"]["answer"]


# Scorers that stand in for a model: eval's `scores(batch) -> [B, 8]` over ANSWER_IDS
# (the 4 colours, then the 4 shapes).

def perceiver(knows_rule):
  """Sees the query (the last image) perfectly; names its colour, its shape, or both
  (tied) when it does not know the rule."""
  def scores(b):
    out = np.full((b["input_ids"].shape[0], 8), -10.0)
    for r in range(out.shape[0]):
      pixels = S.denormalise(b["images"][r, -1, 0])
      colour, shape = read_colour(pixels), 4 + read_shape(pixels)
      rule = knows_rule(b["input_ids"][r])
      out[r, [colour, shape] if rule is None else [colour if rule == "colour" else shape]] = 10.0
    return out
  return scores


def rule_from_context(ids):
  if len(ids) < 3:
    return None  # no shots: the rule is unknown
  return "colour" if ids[1] in S.COLOUR_IDS else "shape"


def test_accuracy_ranks_and_shares_ties():
  from flamingo_jax.evaluation.tasks import synthetic as task
  kw = dict(num_episodes=50, batch_size=16)  # 50 = three full batches and a short one
  # Uniform scores: every candidate ties, so each episode earns exactly 1/8.
  uniform = task.accuracy(lambda b: np.zeros((b["input_ids"].shape[0], 8)), TASK, 0, 4, **kw)
  assert uniform["accuracy"] == pytest.approx(1 / 8) and uniform["num_episodes"] == 50
  assert uniform["chance"] == 1 / 8 and uniform["attribute_accuracy"] == pytest.approx(1 / 2)
  # A perfect perceiver: 1/2 without shots (it cannot know the rule), 1 once it reads it.
  blind = task.accuracy(perceiver(rule_from_context), TASK, 0, 0, **kw)
  assert blind["accuracy"] == pytest.approx(0.5)
  informed = task.accuracy(perceiver(rule_from_context), TASK, 0, 4, **kw)
  assert informed["accuracy"] == 1.0 and informed["attribute_accuracy"] == 1.0
  assert informed["accuracy_colour"] == informed["accuracy_shape"] == 1.0
