"""Reading PyTorch-style state dicts, with strict accounting of every key.

OpenFlamingo loads with `strict=False`, which hides real mismatches. Converters here
take each tensor through `StateDict.take(key, shape)`; `StateDict.finish()` then raises
one error that names every missing, unexpected and mis-shaped key.
"""
import json
import os
from typing import Iterable, Mapping

import jax
import numpy as np


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not match the model; the message lists every offending key."""


def load(path: str) -> dict[str, np.ndarray]:
  """Loads a local state dict as float32/int numpy arrays.

  `path`: a `.safetensors`, `.bin` / `.pt` / `.pth` file, or an HF model directory
  (model.safetensors, pytorch_model.bin, or their sharded `*.index.json`).
  """
  if os.path.isdir(path):
    for name in ("model.safetensors", "pytorch_model.bin"):
      if os.path.exists(os.path.join(path, name)):
        return load(os.path.join(path, name))
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
      index = os.path.join(path, name)
      if os.path.exists(index):
        with open(index) as f:
          shards = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for shard in shards:
          out.update(load(os.path.join(path, shard)))
        return out
    raise FileNotFoundError(
        f"{path}: no model.safetensors, pytorch_model.bin or sharded index in this directory")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      return dict(load_file(path))
    except TypeError:  # bfloat16 has no numpy dtype in safetensors.numpy: go through torch
      from safetensors.torch import load_file as load_torch
      return {k: _to_numpy(v) for k, v in load_torch(path).items()}
  import torch  # only needed for pickled checkpoints
  sd = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model_state_dict", "model"):
    if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
      sd = sd[key]
  return {k: _to_numpy(v) for k, v in sd.items()}


def _to_numpy(t) -> np.ndarray:
  import torch
  if t.dtype in (torch.bfloat16, torch.float16):
    t = t.float()
  return t.detach().cpu().numpy()


class StateDict:
  """A state dict being converted. Every key must be taken exactly once."""

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str = "checkpoint"):
    self.tensors = dict(tensors)
    self.source = source
    self.taken: set[str] = set()
    self.missing: list[str] = []
    self.misshaped: list[str] = []

  def __contains__(self, key: str) -> bool:
    return key in self.tensors

  def keys(self) -> Iterable[str]:
    return self.tensors.keys()

  def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor at `key`, checked against `shape`. A missing or mis-shaped key is
    recorded (and zeros returned) so that `finish` can report all problems at once."""
    shape = tuple(shape)
    if key not in self.tensors:
      self.missing.append(f"{key} (expected shape {shape})")
      return np.zeros(shape, np.float32)
    self.taken.add(key)
    value = np.asarray(self.tensors[key])
    if value.shape != shape:
      self.misshaped.append(f"{key}: checkpoint has {value.shape}, model expects {shape}")
      return np.zeros(shape, np.float32)
    return value

  def skip(self, *keys: str) -> None:
    """Marks keys as knowingly unused (e.g. rotary caches, the CLIP text tower)."""
    self.taken.update(k for k in keys if k in self.tensors)

  def skip_prefix(self, prefix: str) -> None:
    self.taken.update(k for k in self.tensors if k.startswith(prefix))

  def finish(self) -> None:
    """Raises `CheckpointMismatchError` naming every missing, unexpected or mis-shaped key."""
    unexpected = sorted(set(self.tensors) - self.taken)
    problems = []
    for title, keys in (("missing", self.missing), ("mis-shaped", self.misshaped),
                        ("unexpected", unexpected)):
      if keys:
        problems.append(f"{len(keys)} {title} key(s):\n  " + "\n  ".join(keys))
    if problems:
      raise CheckpointMismatchError(f"{self.source} does not match the model:\n" + "\n".join(problems))


def check_tree(params, expected, what: str = "params") -> None:
  """Checks a converted param tree against the model's (e.g. from `jax.eval_shape`):
  names every missing, extra and mis-shaped leaf path."""
  got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(got))]
  problems += [f"extra {k} {got[k]}" for k in sorted(set(got) - set(want))]
  problems += [f"mis-shaped {k}: converted {got[k]}, model expects {want[k]}"
               for k in sorted(set(got) & set(want)) if got[k] != want[k]]
  if problems:
    raise CheckpointMismatchError(f"converted {what} do not match the model:\n  " + "\n  ".join(problems))
