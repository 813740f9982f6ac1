"""A synthetic interleaved few-shot task, generated on the fly: name the colour or the shape.

Every image is one coloured shape (circle / square / triangle / cross in red / green /
blue / yellow; random position and size, random dark background, pixel noise), rendered
with numpy. Each episode draws a hidden rule, 'colour' or 'shape', and every answer in
it names that attribute of its image. A k-shot episode is, as in the paper and
OpenFlamingo,

    <image> a_1 <|endofchunk|> ... <image> a_k <|endofchunk|> <image> a_q <|endofchunk|>

so the shots reveal the rule: with none, a model that perceives perfectly can only guess
which attribute is asked (≈ 1/2 right), while after one or more shots it can read the
rule from the answer words and name the query's attribute. Answers are ranked among all
8 answer words, so chance is 1/8.

Determinism: example i of a split is a pure function of (task, seed, split, i) — every
draw comes from `np.random.default_rng([seed, split, i, ...])` — so any example can be
rebuilt alone, and `batch_iterator` (loader.py) resumes from `{"next_index": n}` and gives
processes disjoint contiguous shares of each global batch. Train (split 0) and eval (split 1)
streams never share a generator, whatever the seed.

Batch (numpy, fixed shapes; M = max_shots + 1 media slots, T = 3 * M tokens):
    images          [B, M, 1, H, W, 3] float32   (pixels - 0.5) / 0.5; empty slots 0
    media_mask      [B, M] bool
    input_ids       [B, T] int32                 right-padded with PAD_ID
    attention_mask  [B, T] int32
    targets         [B, T] int32                 targets[t] = input_ids[t + 1]; last = PAD
    loss_mask       [B, T] float32               1 where targets[t] is an answer word

The loss is on the answer words only, and on every answer of the episode, not just the
query's: `<image>` and `<|endofchunk|>` are fixed format tokens that teach nothing about
images or rules, and the answer after j shots is a j-shot prediction, so one k-shot
episode trains 0..k shots at once. (`loss_on='query'` marks only the query's answer.)
"""
import dataclasses

import numpy as np

from flamingo_jax.data import loader

# ---------------------------------------------------------------------------------------
# Vocabulary: one token per word.

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "cross")
RULES = ("colour", "shape")
VOCAB = ("<pad>", "<image>", "<|endofchunk|>") + COLOURS + SHAPES
TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}
PAD_ID = TOKEN_ID["<pad>"]
MEDIA_TOKEN_ID = TOKEN_ID["<image>"]
EOC_TOKEN_ID = TOKEN_ID["<|endofchunk|>"]
COLOUR_IDS = tuple(TOKEN_ID[w] for w in COLOURS)
SHAPE_IDS = tuple(TOKEN_ID[w] for w in SHAPES)
ANSWER_IDS = COLOUR_IDS + SHAPE_IDS  # the candidates evaluation ranks
VOCAB_SIZE = len(VOCAB)

# RGB in [0, 1]; each image jitters its colour by up to ±COLOUR_JITTER per channel.
PALETTE = np.array([[0.90, 0.12, 0.12],   # red
                    [0.12, 0.80, 0.15],   # green
                    [0.15, 0.25, 0.95],   # blue
                    [0.92, 0.88, 0.12]],  # yellow
                   np.float32)
COLOUR_JITTER = 0.08
IMAGE_MEAN, IMAGE_STD = 0.5, 0.5

TRAIN, EVAL = 0, 1  # split keys of the generators


def decode(ids) -> str:
  """Token ids → words (padding dropped), for logs and tests."""
  return " ".join(VOCAB[i] for i in np.asarray(ids).tolist() if i != PAD_ID)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  image_size: int = 32
  max_shots: int = 4  # fixes M = max_shots + 1 and T = 3 * M for every batch
  train_min_shots: int = 0  # training episodes draw their shots from [min, max] uniformly
  min_radius: float = 0.25  # shape radius, as a fraction of image_size
  max_radius: float = 0.42
  max_shift: float = 0.5  # the centre lies within ±max_shift * image_size of the middle (and
                          # always far enough from the edges for the shape to fit)
  noise_std: float = 0.04  # Gaussian pixel noise, in [0, 1] pixel units

  def __post_init__(self):
    if not 0 <= self.train_min_shots <= self.max_shots:
      raise ValueError(f"train_min_shots={self.train_min_shots} must lie in [0, max_shots="
                       f"{self.max_shots}]")
    if not 0 < self.min_radius <= self.max_radius <= 0.5:
      raise ValueError(f"need 0 < min_radius <= max_radius <= 0.5, got {self.min_radius}, "
                       f"{self.max_radius}")
    if not 0 <= self.max_shift <= 0.5:
      raise ValueError(f"max_shift={self.max_shift} must lie in [0, 0.5]")

  @property
  def num_media(self) -> int:
    return self.max_shots + 1

  @property
  def seq_len(self) -> int:
    return 3 * self.num_media


# ---------------------------------------------------------------------------------------
# Rendering.

def shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
  """Pixels inside `shape` of radius r; u, v: offsets from its centre (v points down)."""
  if shape == "circle":
    return u * u + v * v <= r * r
  if shape == "square":
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
  if shape == "triangle":  # equilateral, pointing up, inscribed in the radius-r circle
    return (v <= 0.5 * r) & (np.abs(u) <= (v + r) / np.sqrt(3.0))
  if shape == "cross":  # a plus sign, arms r/3 wide on each side of the centre lines
    return ((np.abs(u) <= r / 3) & (np.abs(v) <= r)) | ((np.abs(v) <= r / 3) & (np.abs(u) <= r))
  raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")


def render(shape: int, colour: int, rng: np.random.Generator, task: TaskConfig) -> np.ndarray:
  """One image, [H, W, 3] float32 pixels in [0, 1]: SHAPES[shape] in COLOURS[colour]."""
  s = task.image_size
  r = rng.uniform(task.min_radius, task.max_radius) * s
  lo, hi = max(r, s * (0.5 - task.max_shift)), min(s - r, s * (0.5 + task.max_shift))
  cx, cy = rng.uniform(lo, hi, size=2)
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
  mask = shape_mask(SHAPES[shape], xx - cx, yy - cy, r)
  background = rng.uniform(0.0, 0.3)
  rgb = np.clip(PALETTE[colour] + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 1)
  image = np.where(mask[..., None], rgb, background).astype(np.float32)
  image += rng.normal(0.0, task.noise_std, image.shape).astype(np.float32)
  return np.clip(image, 0.0, 1.0)


def normalise(pixels: np.ndarray) -> np.ndarray:
  return ((pixels - IMAGE_MEAN) / IMAGE_STD).astype(np.float32)


def denormalise(images: np.ndarray) -> np.ndarray:
  return images * IMAGE_STD + IMAGE_MEAN


# ---------------------------------------------------------------------------------------
# Episodes.

def answer_id(rule: int, shape: int, colour: int) -> int:
  return COLOUR_IDS[colour] if RULES[rule] == "colour" else SHAPE_IDS[shape]


def episode(task: TaskConfig, seed: int, split: int, index: int, shots: int | None = None,
            loss_on: str = "answers") -> dict:
  """Example `index` of `split`: arrays without the batch axis, plus metadata.

  `shots=None` draws the number of shots from [train_min_shots, max_shots]. The query
  image and the context images do not depend on `shots`: a k-shot episode uses context
  items 1..k, so the same index at 0 and 4 shots asks the same query under the same rule.
  `loss_on`: 'answers' marks every answer word, 'query' only the query's.
  """
  if seed < 0 or index < 0:
    raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
  rng = np.random.default_rng([seed, split, index])
  drawn_shots = int(rng.integers(task.train_min_shots, task.max_shots + 1))
  shots = drawn_shots if shots is None else int(shots)
  if not 0 <= shots <= task.max_shots:
    raise ValueError(f"shots={shots} must lie in [0, max_shots={task.max_shots}]")
  rule = int(rng.integers(len(RULES)))

  # Item 0 is the query, items 1..max_shots the context; each has its own generator.
  def item(j):
    item_rng = np.random.default_rng([seed, split, index, 1 + j])
    shape, colour = (int(a) for a in item_rng.integers(4, size=2))
    return shape, colour, item_rng
  order = list(range(1, shots + 1)) + [0]  # context 1..k, then the query

  m, t, s = task.num_media, task.seq_len, task.image_size
  images = np.zeros((m, 1, s, s, 3), np.float32)
  media_mask = np.zeros((m,), bool)
  tokens, answer_pos, shapes, colours = [], [], [], []
  for slot, j in enumerate(order):
    shape, colour, item_rng = item(j)
    images[slot, 0] = normalise(render(shape, colour, item_rng, task))
    media_mask[slot] = True
    tokens.append(MEDIA_TOKEN_ID)
    answer_pos.append(len(tokens))
    tokens += [answer_id(rule, shape, colour), EOC_TOKEN_ID]
    shapes.append(shape)
    colours.append(colour)

  input_ids = np.full((t,), PAD_ID, np.int32)
  input_ids[:len(tokens)] = tokens
  attention_mask = (np.arange(t) < len(tokens)).astype(np.int32)
  targets = np.full((t,), PAD_ID, np.int32)
  targets[:-1] = input_ids[1:]
  loss_mask = np.zeros((t,), np.float32)
  if loss_on == "answers":
    scored = answer_pos
  elif loss_on == "query":
    scored = answer_pos[-1:]
  else:
    raise ValueError(f"loss_on={loss_on!r}; 'answers' or 'query'")
  loss_mask[[p - 1 for p in scored]] = 1.0  # the position *predicting* the answer
  return dict(images=images, media_mask=media_mask, input_ids=input_ids,
              attention_mask=attention_mask, targets=targets, loss_mask=loss_mask,
              meta=dict(rule=rule, shots=shots, shapes=shapes, colours=colours,
                        answer=int(input_ids[answer_pos[-1]]), answer_pos=answer_pos[-1]))


BATCH_KEYS = ("images", "media_mask", "input_ids", "attention_mask", "targets", "loss_mask")


def collate(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in BATCH_KEYS}


# ---------------------------------------------------------------------------------------
# Training stream.

def train_examples(task: TaskConfig, seed: int):
  """`example_at(position)` of the train split, for loader.BatchIterator."""
  def example_at(index: int) -> dict:
    e = episode(task, seed, TRAIN, index)
    return {k: e[k] for k in BATCH_KEYS}
  return example_at


def batch_iterator(global_batch_size: int, *, seed: int = 0, task: TaskConfig = TaskConfig(),
                   **loader_options) -> loader.BatchIterator:
  """Training batches: example i of the stream is train episode i (see loader.py for the
  sharding over processes and the `{"next_index": n}` state)."""
  return loader.BatchIterator(train_examples(task, seed), global_batch_size, **loader_options)


# ---------------------------------------------------------------------------------------
# Evaluation (evaluation/tasks/synthetic.py scores episodes with the model).

def tie_credit(scores: np.ndarray) -> np.ndarray:
  """[B, C] scores → [B, C] credit: 1 / (number tied) on each row's top-scoring
  candidates, 0 elsewhere (the expected accuracy of breaking ties at random)."""
  top = scores >= scores.max(axis=1, keepdims=True)
  return top / top.sum(axis=1, keepdims=True)
