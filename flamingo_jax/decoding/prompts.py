"""Prompts and image files → the model's batch, as OpenFlamingo's evaluation builds it.

Prompts are tokenised with the tokenizer's own special tokens (LLaMA's BOS) and LEFT
padded, so every row's last prompt token sits at the same position and generation
appends to all rows at once (open_flamingo's eval sets `padding_side = 'left'`).
A prompt's `<image>` tags take the image files in order: tag k of the whole batch is
file k.

Every user mistake raises PromptError naming the prompt, the file or the counts.
"""
import numpy as np

from flamingo_jax.data import images as images_lib


class PromptError(ValueError):
  """A prompt or image file the model cannot take; the message says which and why."""


def encode_prompts(tokenizer, prompts: list[str], max_len: int, *, why: str = ""):
  """(input_ids int32 [B, T], attention_mask int32 [B, T]), left-padded to the longest.

  Raises PromptError for an empty prompt or one longer than `max_len` tokens; `why`
  (e.g. "lm.max_seq_len=2048 minus --max-new-tokens=20") is added to that message.
  """
  prompts = list(prompts)
  if not prompts:
    raise PromptError("no prompt given")
  side = tokenizer.padding_side
  tokenizer.padding_side = "left"
  try:
    enc = tokenizer(prompts, padding="longest", return_tensors="np")
  finally:
    tokenizer.padding_side = side
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  for i, length in enumerate(mask.sum(axis=1).tolist()):
    if length == 0:
      raise PromptError(f"prompt {i} is empty: give some text or an <image> tag")
    if length > max_len:
      raise PromptError(f"prompt {i} is {length} tokens, longer than the {max_len} that fit"
                        + (f" ({why})" if why else "") + "; shorten it")
  return ids, mask


def media_counts(input_ids: np.ndarray, media_token_id: int) -> list[int]:
  """The number of `<image>` tokens in each row."""
  return np.sum(np.asarray(input_ids) == media_token_id, axis=1).astype(int).tolist()


def load_images(paths: list[str], preprocessing, num_media_per_prompt: list[int]):
  """(images float32 [B, M, 1, H, W, 3] NHWC, media_mask bool [B, M]) for B prompts,
  prompt b taking the next `num_media_per_prompt[b]` files; M = the most any prompt
  takes, shorter rows padded with empty (masked) slots. (None, None) when no prompt
  has an image. `preprocessing`: image uint8 [H, W, 3] → float32 [H', W', 3]
  (load_model's ImagePreprocessing).
  """
  counts = [int(n) for n in num_media_per_prompt]
  paths = list(paths)
  if sum(counts) != len(paths):
    per_prompt = f" ({', '.join(map(str, counts))} per prompt)" if len(counts) > 1 else ""
    raise PromptError(f"the prompts have {_count(sum(counts), '<image> tag')}{per_prompt} "
                      f"but {_count(len(paths), 'image')} given; give one image per "
                      "<image> tag, in order")
  if not paths:
    return None, None
  pixels = {p: preprocessing(read_image(p)) for p in dict.fromkeys(paths)}
  shape = next(iter(pixels.values())).shape
  out = np.zeros((len(counts), max(counts), 1) + shape, np.float32)
  mask = np.zeros((len(counts), max(counts)), bool)
  files = iter(paths)
  for b, n in enumerate(counts):
    for m in range(n):
      out[b, m, 0] = pixels[next(files)]
      mask[b, m] = True
  return out, mask


def pad_rows(batch: dict, rows: int) -> dict:
  """Every array of `batch` padded to `rows` rows by repeating its last row, so a short
  final batch runs the program already compiled for full ones (drop the extra outputs)."""
  n = next(iter(batch.values())).shape[0]
  return {k: np.concatenate([v, np.repeat(v[-1:], rows - n, axis=0)]) if rows > n else v
          for k, v in batch.items()}


def continuations(tokenizer, new_tokens, stop_id: int) -> list[str]:
  """Each row's text up to (not including) its first stop token, special tokens dropped."""
  out = []
  for row in np.asarray(new_tokens).tolist():
    row = row[:row.index(stop_id)] if stop_id in row else row
    out.append(tokenizer.decode(row, skip_special_tokens=True))
  return out


def _count(n: int, what: str) -> str:
  return f"{n} {what}" + ("" if n == 1 else "s")


def read_image(path: str) -> np.ndarray:
  """An image file → uint8 [H, W, 3] RGB (EXIF orientation applied)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise PromptError(f"image {path}: cannot read it ({e.strerror or e})") from e
  try:
    return images_lib.decode(data)
  except images_lib.ImageDecodeError as e:
    raise PromptError(f"image {path}: not a readable image ({e})") from e
