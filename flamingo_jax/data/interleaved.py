"""Interleaved image–text documents (M3W, MMC4) → model examples. Pure: no file I/O.

A decoded document is
    doc = {'texts': [sentence, ...],            # str (or UTF-8 bytes)
           'images': [payload, ...],            # opaque; image_fn(payload) -> float32 [H, W, 3]
           'image_sentence': [int | None, ...]} # per image: the sentence it goes BEFORE;
                                                # None = unmatched (not placed)

Token stream (both rules; stream order = sentence order, images on the same sentence in
list order):

    [BOS] s_0 <EOC><image> s_1 s_2 <EOC><image> s_3 ... s_n <EOC> [EOS]

`<image>` goes right before its sentence and `<|endofchunk|>` (EOC) before every
`<image>` except one with nothing but BOS before it (there is no chunk to end: the paper's
pair format `<BOS><image>text<EOC><EOS>` and OpenFlamingo's stripped leading EOC agree),
and once at the end of the document. BOS only when the tokenizer itself prepends one
(`SpecialTokens.bos_token_id`), EOS when the tokenizer has one (`add_eos`). Sentences are
joined with a space, except right after `<image>` (OpenFlamingo's
`text.replace(" <|endofchunk|>", "<|endofchunk|>")`); each sentence is tokenised on its
own (stripped of surrounding whitespace), with literal "<image>" text split as plain
text, so a token's sentence is known.

Paper rules (`rules='paper'`, M3W):
  * Window: `seq_len` consecutive stream tokens from a random start, uniform over the
    starts whose window holds at least one `<image>` (a document shorter than `seq_len`
    is taken whole). Images whose `<image>` falls in the window are kept in order, up to
    `max_images`; the `<image>` tokens of the images beyond the cap (and the EOC put
    before each) are removed and the window is filled up with the tokens after it
    instead (so it still has `seq_len` tokens when the document does).
  * Association, drawn once per document: with probability `p_next` 'next', otherwise
    'previous'. Every `<image>` token looks at its own image. 'previous': other tokens
    look at the last image before them (-1 before the first: the paper's φ). 'next':
    other tokens look at the first image after them; tokens after the document's last
    image have no next image and get -1 (no image to look at), the mirror of 'previous'
    before the first image. Association is decided in the whole document: a token whose
    image is not kept in the window (before the window, after it, or beyond the cap)
    gets -1 instead of a wrong image.
  * loss_mask[t] (for predicting targets[t] = input_ids[t + 1]) is 1 unless t + 1 is
    padding or past the window, targets[t] is `<image>`, or media_index[t] == -1.

OpenFlamingo rules (`rules='openflamingo'`, MMC4; defaults max_images=6, p_next=0,
single_image_drop_p=0.5): the window is the first `seq_len` tokens (truncation), the
first `max_images` images in it are kept as above, association is 'previous', and
the labels are theirs: no loss on predicting anything before the first `<image>`, the
`<image>` tokens, the tokens after each EOC up to the next `<image>` (at document end:
the EOS), or padding. A window with exactly one image is dropped with probability
`single_image_drop_p`. Similarity filtering and one-to-one image–sentence matching are
the raw MMC4 reader's job: `assign_images_to_sentences` below. One deliberate
departure: OpenFlamingo never inserts the images beyond its cap, so their sentences
look at the last kept image; here, as under the paper rules, they look at nothing
(media_index -1, no loss), so no text is paired with another sentence's image.

Skips: documents that cannot make an example raise `SkipExample(reason)`; `reason` is
one of SKIP_REASONS, for the caller to count. An image whose `image_fn` raises
`images.ImageDecodeError` is dropped from the document (with its `<image>`) and the
example rebuilt without it.

Output (numpy, no batch axis; M = max_images, T = seq_len):
    images [M, 1, H, W, 3] float32 (empty slots 0), media_mask [M] bool,
    input_ids [T] int32 (right-padded with pad), attention_mask [T] int32,
    media_index [T] int32 (-1 = none), targets [T] int32 (next token; last = pad),
    loss_mask [T] float32.
"""
import collections
import dataclasses
from typing import Any, Callable

import numpy as np

from flamingo_jax.data.images import ImageDecodeError
from flamingo_jax.data.tokenizer import SpecialTokens, encode_text

RULES = ("paper", "openflamingo")
SKIP_REASONS = ("empty_text", "invalid_utf8", "no_images", "no_images_in_window",
                "single_image", "image_decode")
OUTPUT_KEYS = ("images", "media_mask", "input_ids", "attention_mask", "media_index",
               "targets", "loss_mask")


class SkipExample(Exception):
  """This record makes no example; `reason` (one of SKIP_REASONS) is for counting."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class InterleavedConfig:
  seq_len: int = 256
  max_images: int | None = None  # None: 5 (paper) / 6 (OpenFlamingo)
  p_next: float | None = None  # None: 0.5 (paper) / 0 (OpenFlamingo)
  rules: str = "paper"
  single_image_drop_p: float | None = None  # None: 0 (paper) / 0.5 (OpenFlamingo)
  add_eos: bool = True  # EOS after the final EOC, when the tokenizer has one

  def __post_init__(self):
    if self.rules not in RULES:
      raise ValueError(f"rules={self.rules!r}; one of {RULES}")
    paper = self.rules == "paper"
    for name, paper_default, of_default in (("max_images", 5, 6), ("p_next", 0.5, 0.0),
                                            ("single_image_drop_p", 0.0, 0.5)):
      if getattr(self, name) is None:
        object.__setattr__(self, name, paper_default if paper else of_default)
    if self.seq_len < 2:
      raise ValueError(f"seq_len={self.seq_len} must be >= 2")
    if self.max_images < 1:
      raise ValueError(f"max_images={self.max_images} must be >= 1")
    if not 0.0 <= self.p_next <= 1.0:
      raise ValueError(f"p_next={self.p_next} must lie in [0, 1]")
    if not paper and self.p_next != 0.0:
      raise ValueError("rules='openflamingo' has only previous-image association; "
                       f"p_next={self.p_next} must be 0")
    if not 0.0 <= self.single_image_drop_p <= 1.0:
      raise ValueError(f"single_image_drop_p={self.single_image_drop_p} must lie in [0, 1]")


# ---------------------------------------------------------------------------------------
# Shared with pairs.py.

def as_text(text: Any) -> str:
  """str or UTF-8 bytes → str; SkipExample('invalid_utf8') for undecodable text."""
  if isinstance(text, (bytes, bytearray, memoryview)):
    try:
      return bytes(text).decode("utf-8")
    except UnicodeDecodeError as e:
      raise SkipExample("invalid_utf8", str(e)) from e
  if not isinstance(text, str):
    raise TypeError(f"text: expected str or bytes, got {type(text).__name__}")
  try:
    text.encode("utf-8")  # lone surrogates from a lax decoder
  except UnicodeEncodeError as e:
    raise SkipExample("invalid_utf8", str(e)) from e
  return text


def finish(tokens: np.ndarray, media_index: np.ndarray, trainable_target: np.ndarray,
           pixels: list[np.ndarray], seq_len: int, max_media: int,
           specials: SpecialTokens) -> dict:
  """Pads one example to (seq_len, max_media) and builds targets and loss_mask.

  tokens, media_index: [n <= seq_len]; trainable_target[t]: whether predicting tokens[t+1]
  may be trained ([n]; its last entry is ignored: the last token has no target here).
  pixels: [F, H, W, 3] per media item, at most max_media, all the same shape.
  """
  n = len(tokens)
  assert n <= seq_len and len(media_index) == n and len(pixels) <= max_media
  input_ids = np.full((seq_len,), specials.pad_token_id, np.int32)
  input_ids[:n] = tokens
  attention_mask = (np.arange(seq_len) < n).astype(np.int32)
  mi = np.full((seq_len,), -1, np.int32)
  mi[:n] = media_index
  targets = np.full((seq_len,), specials.pad_token_id, np.int32)
  targets[:-1] = input_ids[1:]
  loss_mask = np.zeros((seq_len,), np.float32)
  if n > 1:
    ok = np.asarray(trainable_target[:n - 1], bool)
    ok &= targets[:n - 1] != specials.media_token_id
    ok &= mi[:n - 1] >= 0
    loss_mask[:n - 1] = ok
  shape = pixels[0].shape
  for p in pixels:
    if p.shape != shape:
      raise ValueError(f"all media of an example must have one shape; got {shape} and "
                       f"{p.shape} (image_fn must resize to a fixed size)")
  images = np.zeros((max_media,) + shape, np.float32)
  for i, p in enumerate(pixels):
    images[i] = p
  media_mask = np.arange(max_media) < len(pixels)
  return dict(images=images, media_mask=media_mask, input_ids=input_ids,
              attention_mask=attention_mask, media_index=mi, targets=targets,
              loss_mask=loss_mask)


# ---------------------------------------------------------------------------------------
# Image–sentence matching (for the raw MMC4 reader).

def assign_images_to_sentences(similarity: np.ndarray, threshold: float,
                               one_to_one: bool = True) -> list[int | None]:
  """The sentence each image goes before, or None: similarity [n_images, n_sentences].

  one_to_one: MMC4's bipartite matching (scipy's Hungarian, maximising total similarity
  over all pairs; at most one image per sentence), then, as OpenFlamingo does, matches
  below `threshold` are dropped (OpenFlamingo: CLIP similarity >= 0.24 kept). Otherwise
  each image goes to its most similar sentence if that reaches `threshold`.
  """
  sim = np.asarray(similarity, np.float64)
  if sim.ndim != 2:
    raise ValueError(f"similarity: expected [n_images, n_sentences], got shape {sim.shape}")
  n_images, n_sentences = sim.shape
  out: list[int | None] = [None] * n_images
  if n_images == 0 or n_sentences == 0:
    return out
  if np.isnan(sim).any():
    raise ValueError("similarity contains NaN")
  if one_to_one:
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(sim, maximize=True)
    for r, c in zip(rows, cols):
      if sim[r, c] >= threshold:
        out[int(r)] = int(c)
  else:
    best = np.argmax(sim, axis=1)
    for r, c in enumerate(best):
      if sim[r, c] >= threshold:
        out[r] = int(c)
  return out


# ---------------------------------------------------------------------------------------
# Documents.

def _check_doc(doc) -> tuple[list[str], list, list[int | None]]:
  for key in ("texts", "images", "image_sentence"):
    if key not in doc:
      raise KeyError(f"doc: missing {key!r} (has {sorted(doc)})")
  texts = [as_text(t).strip() for t in doc["texts"]]
  images, where = list(doc["images"]), list(doc["image_sentence"])
  if len(images) != len(where):
    raise ValueError(f"doc: {len(images)} images but {len(where)} image_sentence entries")
  for j, s in enumerate(where):
    if s is not None and not (isinstance(s, (int, np.integer)) and 0 <= s < len(texts)):
      raise ValueError(f"doc: image_sentence[{j}]={s!r} is not a sentence index in "
                       f"[0, {len(texts)}) or None")
  return texts, images, [None if s is None else int(s) for s in where]


def _stream(sentence_ids, sentence_images, specials, add_eos):
  """Token ids [L] and, per token, the image (doc index) of an `<image>` token, else -1."""
  ids, tag = [], []
  if specials.bos_token_id is not None:
    ids.append(specials.bos_token_id)
    tag.append(-1)
  started = False  # any content (not BOS) yet
  for i, toks in enumerate(sentence_ids):
    for j in sentence_images.get(i, ()):
      if started:
        ids.append(specials.eoc_token_id)
        tag.append(-1)
      ids.append(specials.media_token_id)
      tag.append(j)
      started = True
    ids.extend(toks)
    tag.extend([-1] * len(toks))
    started = started or bool(toks)
  ids.append(specials.eoc_token_id)
  tag.append(-1)
  if add_eos and specials.eos_token_id is not None:
    ids.append(specials.eos_token_id)
    tag.append(-1)
  return np.asarray(ids, np.int64), np.asarray(tag, np.int64)


def _associate(tag: np.ndarray, next_mode: bool) -> np.ndarray:
  """Per stream token, the doc image it looks at (-1 = none), in the whole document."""
  is_tag = tag >= 0
  order = tag[is_tag]  # doc image index of the k-th `<image>` in the stream
  count = np.cumsum(is_tag)  # tags at or before each token
  if next_mode:
    k = np.where(is_tag, count - 1, count)  # own image; else the first one after
  else:
    k = count - 1  # the last one at or before
  if not len(order):
    return np.full(tag.shape, -1, np.int64)
  valid = (k >= 0) & (k < len(order))
  return np.where(valid, order[np.clip(k, 0, len(order) - 1)], -1)


def _window_start(tag: np.ndarray, seq_len: int, rng: np.random.Generator) -> int:
  length = len(tag)
  if length <= seq_len:
    return 0
  last = length - seq_len  # starts 0..last
  cover = np.zeros(last + 2, np.int64)
  for p in np.flatnonzero(tag >= 0):
    lo, hi = max(0, p - seq_len + 1), min(int(p), last)
    if lo <= hi:
      cover[lo] += 1
      cover[hi + 1] -= 1
  starts = np.flatnonzero(np.cumsum(cover)[:last + 1] > 0)
  if starts.size == 0:
    raise SkipExample("no_images_in_window")
  return int(starts[rng.integers(starts.size)])


def interleaved_example(doc, tokenizer_and_specials, config: InterleavedConfig,
                        rng: np.random.Generator,
                        image_fn: Callable[[Any], np.ndarray]) -> dict:
  """One training example from a decoded document; see the module docstring.

  Raises SkipExample(reason) when the document makes no example. Deterministic given
  the state of `rng` (and a deterministic image_fn).
  """
  tokenizer, specials = tokenizer_and_specials
  texts, images, where = _check_doc(doc)
  if not any(texts):
    raise SkipExample("empty_text", f"{len(texts)} sentences, all empty")
  placed = [j for j, s in enumerate(where) if s is not None]
  if not placed:
    raise SkipExample("no_images", f"{len(images)} images, none placed")

  # Sentence tokens: a leading space unless first or right after an `<image>`.
  after_image = {where[j] for j in placed}
  # (Sentences are stripped; an empty one contributes no tokens.)
  pieces = [t if (i == 0 or i in after_image or not t) else " " + t
            for i, t in enumerate(texts)]
  sentence_ids = encode_text(tokenizer, specials, pieces)

  paper = config.rules == "paper"
  next_mode = paper and config.p_next > 0 and bool(rng.random() < config.p_next)
  broken: set[int] = set()
  while True:
    usable = sorted((j for j in placed if j not in broken), key=lambda j: (where[j], j))
    if not usable:
      raise SkipExample("image_decode" if broken else "no_images",
                        f"{len(broken)} of {len(placed)} placed images undecodable")
    sentence_images = collections.defaultdict(list)
    for j in usable:
      sentence_images[where[j]].append(j)
    ids, tag = _stream(sentence_ids, sentence_images, specials, config.add_eos)
    owner = _associate(tag, next_mode)

    start = _window_start(tag, config.seq_len, rng) if paper else 0
    selected, kept = [], []  # stream positions; doc images in slot order
    for pos in range(start, len(ids)):
      if len(selected) == config.seq_len:
        break
      if tag[pos] >= 0:
        if len(kept) == config.max_images:
          # Beyond the cap: its `<image>` goes, and the EOC put before it.
          if selected and selected[-1] == pos - 1 and ids[pos - 1] == specials.eoc_token_id:
            selected.pop()
          continue
        kept.append(int(tag[pos]))
      selected.append(pos)
    if not kept:
      raise SkipExample("no_images_in_window", f"first {config.seq_len} tokens hold no <image>")
    if len(kept) == 1 and config.single_image_drop_p > 0 and \
        rng.random() < config.single_image_drop_p:
      raise SkipExample("single_image")

    pixels = []
    try:
      for j in kept:
        p = np.asarray(image_fn(images[j]), np.float32)
        if p.ndim != 3 or p.shape[-1] != 3:
          raise ValueError(f"image_fn must return [H, W, 3] pixels, got shape {p.shape}")
        pixels.append(p[None])  # one frame
    except ImageDecodeError:
      broken.add(j)
      continue
    break

  selected = np.asarray(selected, np.int64)
  tokens = ids[selected]
  slot_of = np.full(len(images) + 1, -1, np.int32)  # doc image -> slot; [-1] -> -1
  slot_of[kept] = np.arange(len(kept), dtype=np.int32)
  media_index = slot_of[owner[selected]]
  trainable = np.ones(len(tokens), bool)
  if not paper:
    # OpenFlamingo's labels: none on tokens before the first <image>, on <image>, or on
    # tokens after an EOC up to the next <image> (vectorised form of their loop).
    pos = np.arange(len(tokens))
    is_media = tokens == specials.media_token_id
    last_media = np.maximum.accumulate(np.where(is_media, pos, -1))  # at or before
    eoc_at = np.where(tokens == specials.eoc_token_id, pos, -1)
    last_eoc_before = np.concatenate([[-1], np.maximum.accumulate(eoc_at)[:-1]])
    no_label = (last_media < 0) | is_media | (last_eoc_before > last_media)
    trainable[:-1] = ~no_label[1:]
  return finish(tokens, media_index, trainable, pixels, config.seq_len, config.max_images,
                specials)
