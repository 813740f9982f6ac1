"""RICES (retrieval-based in-context example selection): image features for similarity.

OpenFlamingo ranks the query set by the cosine similarity of CLIP ViT-B/32 image
embeddings. No weights can be downloaded here, so the features come from the evaluated
model's own frozen vision tower: its output tokens, averaged over tokens (and frames),
L2-normalised. For OpenFlamingo models that tower IS a CLIP image encoder (ViT-L/14,
before its projection), so the neighbours are CLIP neighbours, though not the exact
ViT-B/32 ones their numbers used.

The query set's features are computed once and cached on disk
(`{cache_dir}/{task}-{key}.npy`), the key hashing the vision weights, the preprocessing
and the query-set ids: a changed model or query set never reads a stale cache.
"""
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=4)
def _features_fn(model):
  def features(params, pixels):  # pixels [N, F, H, W, 3] → [N, D], unit norm
    n, f = pixels.shape[:2]
    tokens = model.apply({"params": params}, pixels.reshape((n * f,) + pixels.shape[2:]),
                         method=lambda m, x: m.vision(x))
    x = tokens.astype(jnp.float32).mean(axis=1).reshape(n, f, -1).mean(axis=1)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return jax.jit(features)


def features(model, params, examples, preprocess, batch_size: int) -> np.ndarray:
  """[len(examples), D] float32 unit vectors."""
  from flamingo_jax.decoding.prompts import pad_rows
  fn, out = _features_fn(model), []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    pixels = pad_rows({"x": np.stack([e.media.load(preprocess) for e in chunk])}, batch_size)["x"]
    out.append(np.asarray(fn(params, pixels))[:len(chunk)])
  return np.concatenate(out)


def cached_features(model, params, examples, preprocess, batch_size: int, *, cache_dir: str,
                    task: str, vision_fingerprint: str) -> np.ndarray:
  """`features` of `examples`, read from / written to the cache."""
  key = hashlib.sha256(json.dumps(
      [vision_fingerprint, repr(preprocess), [str(e.id) for e in examples]]).encode()).hexdigest()[:16]
  path = os.path.join(cache_dir, f"{task}-{key}.npy")
  if os.path.isfile(path):
    return np.load(path)
  x = features(model, params, examples, preprocess, batch_size)
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.save(f, x)
  os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache
  return x
