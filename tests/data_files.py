"""Tiny data the data tests write: ids encoded in both pixels and text, and a tokenizer.

An id is encoded both in an image's pixels (a solid colour: red and green are ID_STEP
times its base-20 digits) and in its text ("caption number {id}"), so any image paired
with another record's text is caught.
"""
import io

import numpy as np
from PIL import Image

ID_STEP = 12


def colour(i: int) -> tuple:
  assert 0 <= i < 400
  return (ID_STEP * (i % 20), ID_STEP * (i // 20), 128)


def id_of_pixels(rgb) -> int:
  """rgb: uint8-range [..., 3] pixels of one solid image."""
  r, g = (int(round(np.asarray(rgb, np.float64)[..., c].mean() / ID_STEP)) for c in (0, 1))
  return r + 20 * g


def jpeg(i: int, size=(24, 20)) -> bytes:
  out = io.BytesIO()
  Image.new("RGB", size, colour(i)).save(out, format="JPEG", quality=95)
  return out.getvalue()


def id_of_image_bytes(data: bytes) -> int:
  return id_of_pixels(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def caption(i: int) -> str:
  return f"caption number {i}"


_CORPUS = [f"caption number {i}" for i in range(100)] + ["a photo of a cat", "x y z"]


def make_tokenizer(path: str) -> str:
  """A tiny byte-level BPE (eos, no pad) saved as a Hugging Face tokenizer directory."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                          unk_token="<|endoftext|>").save_pretrained(path)
  return path


SMALL = dict(image_size=16, augment=False, prepend_space_p=0.0)


def image_ids(images):
  """[..., H, W, 3] normalised ('paper' mode) → the id of each image, from its centre."""
  from flamingo_jax.data.images import IMAGENET_MEAN, IMAGENET_STD
  h, w = images.shape[-3:-1]
  centre = images[..., h // 2 - 1:h // 2 + 1, w // 2 - 1:w // 2 + 1, :]
  rgb = (centre * IMAGENET_STD + IMAGENET_MEAN) * 255
  return np.vectorize(lambda r, g: int(round(r / ID_STEP)) + 20 * int(round(g / ID_STEP)))(
      rgb[..., 0].mean((-1, -2)), rgb[..., 1].mean((-1, -2)))


def caption_ids(tokenizer_dir, input_ids):
  """The first `caption number N` of each row's text."""
  from flamingo_jax.data.tokenizer import load_tokenizer
  tok, _ = load_tokenizer(tokenizer_dir)
  out = []
  for row in np.asarray(input_ids):
    text = tok.decode(row.tolist())
    out.append(int(text.split("caption number ")[1].split("<")[0].split()[0]))
  return out
