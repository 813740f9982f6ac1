"""Random batches of any shape in the training batch format: for smoke runs of a config
whose datasets are not on this machine, benchmarks, and compiling (train_compile.py).

The shapes come from the data config alone (`seq_len`, `max_images`, `num_frames`,
`image_size`) and the model config (vocabulary, special ids, the vision tower's image
size), so the paper's mixture can run without a single file:

    m3w   dict(source="random", batch_size=256, seq_len=256, max_images=5)
    vtp   dict(source="random", batch_size=64, seq_len=32, num_frames=8)

An example is a document of `max_images` equal chunks, `<image> text… <|endofchunk|>`
each, with every token attending (no padding), the media index of an interleaved
document, uniform random pixels in [-1, 1] and uniform random text ids (never a special one). Example i is a
pure function of (seed, i), so batches are deterministic and resume like every source's
(loader.BatchIterator).
"""
import numpy as np

from flamingo_jax.data import loader

DEFAULTS = dict(seq_len=256, max_images=1, num_frames=1, image_size=0)  # 0: the model's


def shapes(model_config, *, seq_len: int, max_images: int, num_frames: int,
           image_size: int) -> dict:
  """Key → (shape, dtype) of one example."""
  size = int(image_size) or model_config.vision.image_size
  return dict(images=((max_images, num_frames, size, size, 3), np.float32),
              media_mask=((max_images,), np.bool_),
              input_ids=((seq_len,), np.int32),
              attention_mask=((seq_len,), np.int32),
              media_index=((seq_len,), np.int32),
              targets=((seq_len,), np.int32),
              loss_mask=((seq_len,), np.float32))


def check(name: str, cfg: dict, model_config) -> dict:
  """The shape options, defaults filled; a bad one raises ValueError naming its field."""
  out = {k: int(cfg.get(k, v)) for k, v in DEFAULTS.items()}
  for k in ("seq_len", "max_images", "num_frames"):
    if out[k] <= 0:
      raise ValueError(f"data.{name}.{k}: must be a positive integer, got {out[k]}")
  if out["seq_len"] < 2 * out["max_images"]:
    raise ValueError(f"data.{name}.seq_len: {out['seq_len']} tokens cannot hold "
                     f"max_images={out['max_images']} chunks of <image> … <|endofchunk|>")
  if out["image_size"] < 0:
    raise ValueError(f"data.{name}.image_size: must be >= 0 (0 = the model's)")
  if out["seq_len"] > model_config.lm.max_seq_len:
    raise ValueError(f"data.{name}.seq_len: {out['seq_len']} exceeds model.lm.max_seq_len="
                     f"{model_config.lm.max_seq_len}")
  return out


def example_fn(model_config, *, seed: int, seq_len: int, max_images: int, num_frames: int,
               image_size: int) -> loader.ExampleFn:
  spec = shapes(model_config, seq_len=seq_len, max_images=max_images, num_frames=num_frames,
                image_size=image_size)
  vocab = model_config.lm.vocab_size
  media_id, eoc_id = model_config.media_token_id, model_config.eoc_token_id
  chunk = seq_len // max_images
  starts = np.arange(max_images) * chunk  # chunk j: [starts[j], starts[j] + chunk)
  media_index = np.minimum(np.arange(seq_len) // chunk, max_images - 1).astype(np.int32)
  text_ids = np.setdiff1d(np.arange(vocab, dtype=np.int32), [media_id, eoc_id])  # no specials

  def example_at(position: int) -> dict:
    rng = np.random.default_rng([seed, int(position)])
    ids = text_ids[rng.integers(0, len(text_ids), size=seq_len)]
    if media_id >= 0:
      ids[starts] = media_id
    if eoc_id >= 0:
      ids[np.append(starts[1:], seq_len) - 1] = eoc_id
    images = rng.random(spec["images"][0], dtype=np.float32) * 2 - 1
    targets = np.append(ids[1:], ids[:1]).astype(np.int32)
    loss_mask = np.ones(seq_len, np.float32)
    loss_mask[-1] = 0.0  # the last token has no next token in the window
    if media_id >= 0:
      loss_mask[targets == media_id] = 0.0  # `<image>` is a format tag, not a target
    return dict(images=images, media_mask=np.ones(max_images, np.bool_), input_ids=ids,
                attention_mask=np.ones(seq_len, np.int32), media_index=media_index.copy(),
                targets=targets, loss_mask=loss_mask)
  return example_at


def batch_iterator(global_batch_size: int, model_config, *, seed: int = 0, seq_len: int,
                   max_images: int, num_frames: int, image_size: int,
                   **loader_options) -> loader.BatchIterator:
  at = example_fn(model_config, seed=seed, seq_len=seq_len, max_images=max_images,
                  num_frames=num_frames, image_size=image_size)
  return loader.BatchIterator(at, global_batch_size, **loader_options)
