"""Data processing: tokenizer extension, image preprocessing, interleaved documents, pairs.

Tiny byte-level BPE tokenizers are trained here in milliseconds; nothing is downloaded.
"""
import io

import numpy as np
import pytest
from PIL import Image

from flamingo_jax.data import images as imgs
from flamingo_jax.data.interleaved import (InterleavedConfig, SkipExample, OUTPUT_KEYS,
                                           assign_images_to_sentences, interleaved_example)
from flamingo_jax.data.pairs import PairConfig, pair_example
from flamingo_jax.data.tokenizer import (SpecialTokens, TokenizerNotFoundError,
                                         load_tokenizer)

WORDS = ["hello", "world", "the", "cat", "sat", "a", "dog", "ran", "on", "mat"]


def word(k: int) -> str:
  """Sentence k's word, letters only (byte-level BPE pre-tokenises digits apart)."""
  return "q" + chr(97 + k // 26) + chr(97 + k % 26)


NUMBERED = [word(k) for k in range(40)]


def _train_tokenizer(directory, *, bos: bool = False, pad: bool = False):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<|endoftext|>"] + (["<s>"] if bos else []) + (["<pad>"] if pad else [])
  trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = [" ".join(WORDS)] * 20 + [" ".join(w for w in NUMBERED for _ in range(3))] * 20
  corpus += [w + " " + w for w in WORDS + NUMBERED] * 5
  tok.train_from_iterator(corpus, trainer)
  kwargs = dict(eos_token="<|endoftext|>")
  if bos:
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    kwargs["bos_token"] = "<s>"
  if pad:
    kwargs["pad_token"] = "<pad>"
  PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(directory)
  return directory


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return _train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
  return load_tokenizer(tok_dir)


def _strings(tokenizer, ids):
  return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def _check_shapes(ex, m, t, frames=1):
  assert set(ex) == set(OUTPUT_KEYS)
  assert ex["images"].shape[:2] == (m, frames) and ex["images"].dtype == np.float32
  assert ex["media_mask"].shape == (m,) and ex["media_mask"].dtype == bool
  for k, dt in (("input_ids", np.int32), ("attention_mask", np.int32),
                ("media_index", np.int32), ("targets", np.int32), ("loss_mask", np.float32)):
    assert ex[k].shape == (t,) and ex[k].dtype == dt, k
  np.testing.assert_array_equal(ex["targets"][:-1], ex["input_ids"][1:])


# ---------------------------------------------------------------------------------------
# Tokenizer.

def test_tokenizer_extension_is_idempotent(tok_dir, tmp_path):
  tokenizer, sp = load_tokenizer(tok_dir)
  base = len(__import__("transformers").AutoTokenizer.from_pretrained(tok_dir))
  assert sp.vocab_size == len(tokenizer) == base + 3  # <|endofchunk|>, <image>, <PAD>
  assert tokenizer.convert_ids_to_tokens([sp.media_token_id, sp.eoc_token_id, sp.pad_token_id]) \
      == ["<image>", "<|endofchunk|>", "<PAD>"]
  assert sp.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
  assert sp.bos_token_id is None  # GPT-2 style: the tokenizer prepends nothing
  tokenizer.save_pretrained(tmp_path)
  again, sp2 = load_tokenizer(tmp_path)
  assert sp2 == sp and len(again) == len(tokenizer)
  _, sp3 = load_tokenizer(tmp_path)
  assert sp3 == sp
  # The literal text "<image>" is not a media token.
  ex = pair_example(np.zeros((4, 4, 3), np.float32), "a <image> cat", (tokenizer, sp),
                    PairConfig(seq_len=32), None)
  assert (ex["input_ids"] == sp.media_token_id).sum() == 1


def test_tokenizer_with_pad_and_bos(tmp_path):
  tokenizer, sp = load_tokenizer(_train_tokenizer(tmp_path / "t", bos=True, pad=True))
  assert tokenizer.pad_token == "<pad>" and "<PAD>" not in tokenizer.get_vocab()
  assert sp.bos_token_id == tokenizer.convert_tokens_to_ids("<s>")
  ex = pair_example(np.zeros((4, 4, 3), np.float32), "the cat", (tokenizer, sp),
                    PairConfig(seq_len=8), None)
  n = int(ex["attention_mask"].sum())
  assert _strings(tokenizer, ex["input_ids"][:n]) == ["<s>", "<image>", "the", "Ġcat",
                                                      "<|endofchunk|>", "<|endoftext|>"]
  np.testing.assert_array_equal(ex["media_index"][:n], [-1, 0, 0, 0, 0, 0])


def test_tokenizer_missing_names_the_path(tmp_path):
  with pytest.raises(TokenizerNotFoundError, match="nowhere"):
    load_tokenizer(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(TokenizerNotFoundError, match="empty"):
    load_tokenizer(tmp_path / "empty")


# ---------------------------------------------------------------------------------------
# Images.

def test_preprocess_paper_pads_with_mean():
  image = np.full((20, 40, 3), 200, np.uint8)  # wide: long side 40 -> 32, short 20 -> 16
  out = imgs.preprocess(image, mode="paper", size=32, train=False, rng=None)
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  expected = (200 / 255 - imgs.IMAGENET_MEAN) / imgs.IMAGENET_STD
  np.testing.assert_allclose(out[8:24], np.broadcast_to(expected, (16, 32, 3)), atol=1e-5)
  assert (out[:8] == 0).all() and (out[24:] == 0).all()  # padding = mean colour = 0
  tall = imgs.preprocess(np.full((40, 20, 3), 9, np.uint8), mode="paper", size=32)
  assert (tall[:, :8] == 0).all() and (tall[:, 24:] == 0).all() and (tall[:, 8:24] != 0).all()


def test_preprocess_clip_and_conversions():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
  out = imgs.preprocess(image, mode="clip", size=24)
  assert out.shape == (24, 24, 3) and out.dtype == np.float32
  flat = imgs.preprocess(np.full((30, 50, 3), 128, np.uint8), mode="clip", size=24)
  np.testing.assert_allclose(flat, np.broadcast_to((128 / 255 - imgs.CLIP_MEAN) / imgs.CLIP_STD,
                                                   (24, 24, 3)), atol=1e-5)
  grey = imgs.preprocess(np.full((10, 10), 128, np.uint8), mode="clip", size=24)
  np.testing.assert_allclose(grey, flat, atol=1e-5)
  rgba = np.zeros((10, 10, 4), np.uint8)  # fully transparent -> white
  out = imgs.preprocess(rgba, mode="paper", size=10)
  np.testing.assert_allclose(out, np.broadcast_to((1 - imgs.IMAGENET_MEAN) / imgs.IMAGENET_STD,
                                                  (10, 10, 3)), atol=1e-5)
  for bad in (np.zeros((4, 4, 2), np.uint8), np.zeros((2, 4, 4, 3), np.uint8),
              np.zeros((4, 4, 3), np.float32)):
    with pytest.raises(ValueError, match="image"):
      imgs.preprocess(bad, mode="paper", size=8)
  with pytest.raises(ValueError, match="mode"):
    imgs.preprocess(image, mode="nope", size=8)
  with pytest.raises(ValueError, match="rng"):
    imgs.preprocess(image, mode="paper", size=8, train=True, rng=None)


def test_preprocess_train_flips_and_augments_eval_deterministic():
  image = np.zeros((16, 16, 3), np.uint8)
  image[:, :8] = 220  # bright left half
  evals = [imgs.preprocess(image, mode="paper", size=16, train=False,
                           rng=np.random.default_rng(s)) for s in range(3)]
  for e in evals[1:]:
    np.testing.assert_array_equal(e, evals[0])
  left_bright = []
  for s in range(20):
    out = imgs.preprocess(image, mode="paper", size=16, train=True, rng=np.random.default_rng(s))
    assert out.shape == (16, 16, 3)
    left_bright.append(out[:, :8].mean() > out[:, 8:].mean())
    again = imgs.preprocess(image, mode="paper", size=16, train=True, rng=np.random.default_rng(s))
    np.testing.assert_array_equal(out, again)
  assert any(left_bright) and not all(left_bright)  # flipped sometimes
  # Colour augmentation changes the pixels but stays mild; padding stays exactly 0.
  wide = np.full((8, 16, 3), 120, np.uint8)
  outs = [imgs.preprocess(wide, mode="paper", size=16, train=True, rng=np.random.default_rng(s))
          for s in range(5)]
  assert len({float(o[8, 8, 0]) for o in outs}) > 1
  for o in outs:
    assert (o[:4] == 0).all() and (o[12:] == 0).all()


def test_decode():
  pixels = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  np.testing.assert_array_equal(imgs.decode(buf.getvalue()), pixels)
  buf = io.BytesIO()
  Image.fromarray(pixels[:, :, 0], mode="L").save(buf, format="PNG")
  assert imgs.decode(buf.getvalue()).shape == (6, 9, 3)
  for bad in (b"", b"not an image", buf.getvalue()[:20]):
    with pytest.raises(imgs.ImageDecodeError):
      imgs.decode(bad)


# ---------------------------------------------------------------------------------------
# Interleaved documents.

def _pixel_fn(size=4):
  """Payload k -> a [size, size, 3] image whose every pixel is k."""
  def fn(payload):
    return np.full((size, size, 3), float(payload), np.float32)
  return fn


HAND_DOC = dict(texts=["hello world", "the cat sat", "a dog ran"], images=[1, 2],
                image_sentence=[1, 2])
HAND_TOKENS = ["hello", "Ġworld", "<|endofchunk|>", "<image>", "the", "Ġcat", "Ġsat",
               "<|endofchunk|>", "<image>", "a", "Ġdog", "Ġran", "<|endofchunk|>",
               "<|endoftext|>"]


@pytest.mark.parametrize("mode,media_index,loss_mask", [
    # Previous image: text before the first image sees nothing (and has no loss).
    ("previous", [-1, -1, -1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
     [0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0]),
    # Next image: text sees the image after it; after the last image there is none.
    ("next", [0, 0, 0, 0, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1],
     [1, 1, 0, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0]),
])
def test_hand_checked_document(tok, mode, media_index, loss_mask):
  tokenizer, sp = tok
  cfg = InterleavedConfig(seq_len=16, max_images=3, p_next=1.0 if mode == "next" else 0.0)
  ex = interleaved_example(HAND_DOC, tok, cfg, np.random.default_rng(0), _pixel_fn())
  _check_shapes(ex, 3, 16)
  n = len(HAND_TOKENS)
  assert _strings(tokenizer, ex["input_ids"][:n]) == HAND_TOKENS
  assert (ex["input_ids"][n:] == sp.pad_token_id).all()
  np.testing.assert_array_equal(ex["attention_mask"], [1] * n + [0] * (16 - n))
  np.testing.assert_array_equal(ex["media_index"], media_index + [-1] * (16 - n))
  np.testing.assert_array_equal(ex["loss_mask"], loss_mask + [0] * (16 - n))
  assert ex["targets"][-1] == sp.pad_token_id
  np.testing.assert_array_equal(ex["media_mask"], [True, True, False])
  np.testing.assert_array_equal(ex["images"][:, 0, 0, 0, 0], [1, 2, 0])
  assert (ex["images"][2] == 0).all()


def test_hand_checked_document_openflamingo_labels(tok):
  tokenizer, sp = tok
  cfg = InterleavedConfig(seq_len=16, rules="openflamingo", single_image_drop_p=0.0)
  assert cfg.max_images == 6 and cfg.p_next == 0.0
  ex = interleaved_example(HAND_DOC, tok, cfg, np.random.default_rng(0), _pixel_fn())
  _check_shapes(ex, 6, 16)
  n = len(HAND_TOKENS)
  assert _strings(tokenizer, ex["input_ids"][:n]) == HAND_TOKENS
  # No loss before the first <image>, on <image>, or on the EOS after the final EOC.
  np.testing.assert_array_equal(ex["loss_mask"][:n], [0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(ex["media_index"][:n],
                                [-1, -1, -1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])


def test_literal_markup_and_blank_sentences(tok):
  tokenizer, sp = tok
  doc = dict(texts=[" the  ", "   ", "a <image> cat <|endofchunk|>", ""], images=[3],
             image_sentence=[2])
  ex = interleaved_example(doc, tok, InterleavedConfig(seq_len=40, p_next=0.0),
                           np.random.default_rng(0), _pixel_fn())
  n = int(ex["attention_mask"].sum())
  words = _strings(tokenizer, ex["input_ids"][:n])
  assert words.count("<image>") == 1 and words.count("<|endofchunk|>") == 2
  assert words[:4] == ["the", "<|endofchunk|>", "<image>", "a"]
  assert words[-2:] == ["<|endofchunk|>", "<|endoftext|>"]
  assert tokenizer.decode(ex["input_ids"][3:n - 2]) == "a <image> cat <|endofchunk|>"


def _openflamingo_labels_reference(ids, sp):
  """Their label loop, token by token: True = has a label."""
  labels = [True] * len(ids)
  i = 0
  while i < len(ids) and ids[i] != sp.media_token_id:
    labels[i] = False
    i += 1
  for e in [k for k, t in enumerate(ids) if t == sp.eoc_token_id]:
    k = e + 1
    while k < len(ids) and ids[k] != sp.media_token_id:
      labels[k] = False
      k += 1
  return [lab and t != sp.media_token_id for lab, t in zip(labels, ids)]


def test_openflamingo_labels_match_their_loop(tok):
  tokenizer, sp = tok
  rng = np.random.default_rng(7)
  for trial in range(30):
    n_sent = int(rng.integers(1, 8))
    where = [int(rng.integers(n_sent)) for _ in range(int(rng.integers(1, 5)))]
    doc = dict(texts=[word(s) for s in range(n_sent)], images=list(range(1, len(where) + 1)),
               image_sentence=where)
    cfg = InterleavedConfig(seq_len=int(rng.integers(4, 30)), rules="openflamingo",
                            single_image_drop_p=0.0)
    try:
      ex = interleaved_example(doc, tok, cfg, np.random.default_rng(trial), _pixel_fn())
    except SkipExample as e:
      assert e.reason == "no_images_in_window"
      continue
    n = int(ex["attention_mask"].sum())
    ids = ex["input_ids"][:n].tolist()
    has_label = _openflamingo_labels_reference(ids, sp)
    np.testing.assert_array_equal(ex["loss_mask"][:n - 1], has_label[1:])
    assert (ex["loss_mask"][n - 1:] == 0).all()


def test_image_cap_drops_tokens_and_text_of_dropped_images(tok):
  tokenizer, sp = tok
  doc = dict(texts=[f"{word(k)} {word(k)}" for k in range(8)], images=list(range(1, 9)),
             image_sentence=list(range(8)))
  cfg = InterleavedConfig(seq_len=64, max_images=5, p_next=0.0)
  ex = interleaved_example(doc, tok, cfg, np.random.default_rng(0), _pixel_fn())
  _check_shapes(ex, 5, 64)
  ids = ex["input_ids"]
  assert (ids == sp.media_token_id).sum() == 5 and ex["media_mask"].all()
  np.testing.assert_array_equal(ex["images"][:, 0, 0, 0, 0], [1, 2, 3, 4, 5])
  # 8 × (<image> w w) + 7 EOC before images + EOC + EOS, minus 3 dropped <image> and
  # the EOC before each.
  n = int(ex["attention_mask"].sum())
  assert n == 8 * 3 + 7 + 2 - 3 - 3
  words = _strings(tokenizer, ids[:n])
  for t, w in enumerate(words):
    k = _sentence_of(w)
    if k is not None:
      assert ex["media_index"][t] == (k if k < 5 else -1), (t, w)
      if k >= 5:
        assert ex["loss_mask"][t] == 0


def test_window_is_random_deterministic_and_full(tok):
  tokenizer, sp = tok
  doc = dict(texts=[" ".join([word(k)] * 3) for k in range(30)], images=list(range(1, 31)),
             image_sentence=list(range(30)))
  cfg = InterleavedConfig(seq_len=20, max_images=2)
  starts = set()
  for seed in range(10):
    a = interleaved_example(doc, tok, cfg, np.random.default_rng(seed), _pixel_fn())
    b = interleaved_example(doc, tok, cfg, np.random.default_rng(seed), _pixel_fn())
    for k in OUTPUT_KEYS:
      np.testing.assert_array_equal(a[k], b[k])
    _check_shapes(a, 2, 20)
    assert a["attention_mask"].all()  # long document: the window is full
    assert 1 <= (a["input_ids"] == sp.media_token_id).sum() == a["media_mask"].sum() <= 2
    starts.add(tuple(a["input_ids"][:3]))
  assert len(starts) > 3  # different windows for different seeds


def _sentence_of(word: str) -> int | None:
  w = word.lstrip("Ġ")
  if len(w) == 3 and w[0] == "q":
    return (ord(w[1]) - 97) * 26 + ord(w[2]) - 97
  return None


@pytest.mark.parametrize("rules", ["paper", "openflamingo"])
def test_images_stay_aligned_with_their_text(tok, rules):
  """Images carry their index in their pixels; sentence s repeats word(s). Every token must
  look at exactly the image the document associates with its sentence, or at nothing."""
  tokenizer, sp = tok
  for w in NUMBERED:
    assert len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1
  doc_rng = np.random.default_rng(123)
  checked, assocs = 0, set()
  for trial in range(60):
    n_sent = int(doc_rng.integers(1, 25))
    n_img = int(doc_rng.integers(1, 10))
    where = [None if doc_rng.random() < 0.15 else int(doc_rng.integers(n_sent))
             for _ in range(n_img)]
    doc = dict(texts=[" ".join([word(s)] * int(doc_rng.integers(1, 4))) for s in range(n_sent)],
               images=list(range(1, n_img + 1)), image_sentence=where)
    if rules == "paper":
      cfg = InterleavedConfig(seq_len=int(doc_rng.integers(8, 40)),
                              max_images=int(doc_rng.integers(1, 5)))
    else:
      cfg = InterleavedConfig(seq_len=int(doc_rng.integers(8, 40)), rules="openflamingo",
                              max_images=int(doc_rng.integers(1, 5)), single_image_drop_p=0.0)
    rng = np.random.default_rng(trial)
    try:
      ex = interleaved_example(doc, tok, cfg, rng, _pixel_fn())
    except SkipExample as e:
      assert e.reason in ("no_images", "no_images_in_window")
      assert all(s is None for s in where) or rules == "openflamingo"
      continue
    _check_shapes(ex, cfg.max_images, cfg.seq_len)
    slot_image = [int(v) - 1 if m else None
                  for v, m in zip(ex["images"][:, 0, 0, 0, 0], ex["media_mask"])]
    kept = [j for j in slot_image if j is not None]
    assert len(set(kept)) == len(kept)
    n = int(ex["attention_mask"].sum())
    words = _strings(tokenizer, ex["input_ids"][:n])
    mi = ex["media_index"]
    # Stream order of the placed images: (sentence, list index).
    order = sorted((j for j in range(n_img) if where[j] is not None), key=lambda j: (where[j], j))
    # Which association did this document draw? Infer from the first text token that
    # has an image in either rule, then check every token against it.
    assoc = None
    for t, w in enumerate(words):
      s = _sentence_of(w)
      if s is None:
        continue
      prev = [j for j in order if where[j] <= s]
      nxt = [j for j in order if where[j] > s]
      expect = {"previous": prev[-1] if prev else None, "next": nxt[0] if nxt else None}
      got = slot_image[mi[t]] if mi[t] >= 0 else None
      if assoc is None and got is not None:
        assoc = "previous" if got == expect["previous"] else "next"
        assert rules == "paper" or assoc == "previous"
        assocs.add(assoc)
      if assoc is not None:
        want = expect[assoc]
        assert got == (want if want in kept else None), (trial, t, w, got, expect)
      if got is None:
        assert ex["loss_mask"][t] == 0
      checked += 1
    # The k-th <image> token looks at slot k, whose image belongs to the sentence after it.
    tags = [t for t, w in enumerate(words) if w == "<image>"]
    assert len(tags) == len(kept)
    for k, t in enumerate(tags):
      assert mi[t] == k
      if t + 1 < n and _sentence_of(words[t + 1]) is not None:
        assert where[slot_image[k]] == _sentence_of(words[t + 1])
  assert checked > 200
  assert rules == "openflamingo" or assocs == {"previous", "next"}


def test_skips(tok):
  cfg = InterleavedConfig(seq_len=16)
  rng = np.random.default_rng(0)
  cases = [
      (dict(texts=["", "  "], images=[1], image_sentence=[0]), "empty_text"),
      (dict(texts=[], images=[1], image_sentence=[None]), "empty_text"),
      (dict(texts=["the cat"], images=[], image_sentence=[]), "no_images"),
      (dict(texts=["the cat"], images=[1, 2], image_sentence=[None, None]), "no_images"),
      (dict(texts=[b"the \xff cat"], images=[1], image_sentence=[0]), "invalid_utf8"),
  ]
  for doc, reason in cases:
    with pytest.raises(SkipExample) as e:
      interleaved_example(doc, tok, cfg, rng, _pixel_fn())
    assert e.value.reason == reason
  with pytest.raises(ValueError, match="image_sentence"):
    interleaved_example(dict(texts=["a"], images=[1], image_sentence=[3]), tok, cfg, rng,
                        _pixel_fn())

  # Undecodable images are dropped with their <image>; all undecodable: skipped.
  def fn(payload):
    if payload < 0:
      raise imgs.ImageDecodeError("bad")
    return np.full((4, 4, 3), float(payload), np.float32)
  doc = dict(texts=["hello world", "the cat sat", "a dog ran"], images=[-1, 2],
             image_sentence=[1, 2])
  ex = interleaved_example(doc, tok, InterleavedConfig(seq_len=16, p_next=0.0), rng, fn)
  tokenizer, sp = tok
  assert (ex["input_ids"] == sp.media_token_id).sum() == 1
  np.testing.assert_array_equal(ex["images"][:, 0, 0, 0, 0], [2, 0, 0, 0, 0])
  words = _strings(tokenizer, ex["input_ids"][:int(ex["attention_mask"].sum())])
  assert words[words.index("<image>") + 1] == "a"
  with pytest.raises(SkipExample) as e:
    interleaved_example(dict(doc, images=[-1, -2]), tok, cfg, rng, fn)
  assert e.value.reason == "image_decode"

  # OpenFlamingo: single-image windows dropped with probability single_image_drop_p.
  one = dict(texts=["the cat"], images=[5], image_sentence=[0])
  with pytest.raises(SkipExample) as e:
    interleaved_example(one, tok, InterleavedConfig(rules="openflamingo",
                                                    single_image_drop_p=1.0), rng, _pixel_fn())
  assert e.value.reason == "single_image"
  kept = 0
  for s in range(40):
    try:
      interleaved_example(one, tok, InterleavedConfig(rules="openflamingo"),
                          np.random.default_rng(s), _pixel_fn())
      kept += 1
    except SkipExample:
      pass
  assert 5 < kept < 35


def test_config_validation():
  assert InterleavedConfig().max_images == 5 and InterleavedConfig().p_next == 0.5
  with pytest.raises(ValueError, match="rules"):
    InterleavedConfig(rules="nope")
  with pytest.raises(ValueError, match="p_next"):
    InterleavedConfig(rules="openflamingo", p_next=0.5)
  with pytest.raises(ValueError, match="p_next"):
    InterleavedConfig(p_next=2.0)


def test_assign_images_to_sentences():
  sim = np.array([[0.30, 0.29, 0.00],
                  [0.31, 0.10, 0.00],
                  [0.25, 0.24, 0.10]])
  # Hungarian maximises the total: image 1 takes sentence 0, image 0 sentence 1, and
  # image 2 is left with sentence 2 (0.10 < threshold: unassigned).
  assert assign_images_to_sentences(sim, 0.24) == [1, 0, None]
  assert assign_images_to_sentences(sim, 0.24, one_to_one=False) == [0, 0, 0]
  assert assign_images_to_sentences(sim, 0.5, one_to_one=False) == [None, None, None]
  assert assign_images_to_sentences(np.zeros((2, 0)), 0.1) == [None, None]
  # More images than sentences: at most one image per sentence.
  out = assign_images_to_sentences(np.ones((3, 2)), 0.5)
  assert sorted(x for x in out if x is not None) == [0, 1] and out.count(None) == 1


# ---------------------------------------------------------------------------------------
# Pairs.

def test_pair_format_and_labels(tok):
  tokenizer, sp = tok
  pixels = np.full((4, 4, 3), 7.0, np.float32)
  ex = pair_example(pixels, "  the cat sat ", tok, PairConfig(seq_len=8), None)
  _check_shapes(ex, 1, 8)
  assert _strings(tokenizer, ex["input_ids"][:6]) == ["<image>", "the", "Ġcat", "Ġsat",
                                                      "<|endofchunk|>", "<|endoftext|>"]
  np.testing.assert_array_equal(ex["input_ids"][6:], [sp.pad_token_id] * 2)
  np.testing.assert_array_equal(ex["attention_mask"], [1] * 6 + [0] * 2)
  np.testing.assert_array_equal(ex["media_index"], [0] * 6 + [-1] * 2)
  # Loss on predicting the, cat, sat, EOC, EOS (from <image> .. EOC); not on padding.
  np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 1, 1, 1, 0, 0, 0])
  assert ex["media_mask"].tolist() == [True] and (ex["images"] == 7).all()
  of = pair_example(pixels, "the cat sat", tok, PairConfig(seq_len=8, rules="openflamingo"), None)
  np.testing.assert_array_equal(of["loss_mask"], [1, 1, 1, 1, 0, 0, 0, 0])  # no EOS label
  short = pair_example(pixels, "the cat sat on the mat", tok, PairConfig(seq_len=4), None)
  assert _strings(tokenizer, short["input_ids"]) == ["<image>", "the", "Ġcat", "Ġsat"]
  assert short["attention_mask"].all() and short["targets"][-1] == sp.pad_token_id
  np.testing.assert_array_equal(short["loss_mask"], [1, 1, 1, 0])


def test_pair_space_prepending(tok):
  tokenizer, _ = tok
  pixels = np.zeros((4, 4, 3), np.float32)
  firsts = []
  for s in range(40):
    ex = pair_example(pixels, "the cat", tok, PairConfig(seq_len=8), np.random.default_rng(s))
    again = pair_example(pixels, "the cat", tok, PairConfig(seq_len=8), np.random.default_rng(s))
    np.testing.assert_array_equal(ex["input_ids"], again["input_ids"])
    firsts.append(_strings(tokenizer, ex["input_ids"][1:2])[0])
  assert set(firsts) == {"the", "Ġthe"} and 8 < firsts.count("Ġthe") < 32
  always = pair_example(pixels, "the cat", tok, PairConfig(seq_len=8, prepend_space_p=1.0),
                        np.random.default_rng(0))
  assert _strings(tokenizer, always["input_ids"][1:2]) == ["Ġthe"]


def test_pair_video_and_skips(tok):
  frames = np.arange(8, dtype=np.float32)[:, None, None, None] * np.ones((8, 4, 4, 3), np.float32)
  ex = pair_example(frames, "a dog ran", tok, PairConfig(seq_len=16), None)
  _check_shapes(ex, 1, 16, frames=8)
  assert ex["images"].shape == (1, 8, 4, 4, 3)
  np.testing.assert_array_equal(ex["images"][0, :, 0, 0, 0], np.arange(8))
  for text, reason in (("", "empty_text"), ("   ", "empty_text"), (b"\xff\xfe", "invalid_utf8"),
                       ("\ud800", "invalid_utf8")):
    with pytest.raises(SkipExample) as e:
      pair_example(frames, text, tok, PairConfig(), None)
    assert e.value.reason == reason
  assert pair_example(frames, "the cat".encode(), tok, PairConfig(), None)["input_ids"][1] > 0
  with pytest.raises(ValueError, match="pixels"):
    pair_example(np.zeros((4, 4)), "the cat", tok, PairConfig(), None)
