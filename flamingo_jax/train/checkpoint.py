"""Orbax checkpoints of the train state, the data iterators' state and a manifest.

Frozen weights are not copied into checkpoints: the manifest records where they came
from and a fingerprint, and resuming onto different frozen weights is refused. Restoring
takes an abstract state whose leaves carry shardings, so a checkpoint written on one mesh
restores onto another. The directory may be a bucket (gs://...): orbax takes an epath.
"""
import hashlib

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp


class FrozenWeightsMismatch(RuntimeError):
  pass


def fingerprint(frozen) -> str:
  """A checksum of the frozen weights: shapes, dtypes and an exact strided sample of each
  leaf's values (no arithmetic, so it does not depend on the mesh or device kind)."""
  def sample(x):
    flat = x.reshape(-1)
    return flat[::max(flat.shape[0] // 4096, 1)][:4096]

  samples = jax.device_get(jax.jit(lambda tree: jax.tree.map(sample, tree))(frozen))
  h = hashlib.sha256()
  for (path, leaf), values in zip(jax.tree_util.tree_leaves_with_path(frozen), jax.tree.leaves(samples)):
    h.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype}".encode())
    h.update(np.asarray(values).tobytes())
  return h.hexdigest()[:32]


class Checkpointer:
  """Asynchronous keep-N checkpoints under `directory` (e.g. WORKDIR/checkpoints)."""

  def __init__(self, directory, keep: int = 3):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           create=True)
    directory = epath.Path(directory)
    if not directory.is_absolute():  # a relative local path (gs://... paths are absolute)
      directory = directory.absolute()
    # Handlers named up front, so a fresh manager can read the saved state's metadata.
    self.manager = ocp.CheckpointManager(directory, options=options, item_handlers=dict(
        state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
        manifest=ocp.JsonCheckpointHandler()))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, manifest: dict, force: bool = False):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        manifest=ocp.args.JsonSave(manifest)), force=force)

  def restore(self, step: int, abstract_state, frozen_fingerprint: str):
    """(state, data_state, manifest) at `step`; refuses other frozen weights."""
    manifest = self.manager.restore(step, args=ocp.args.Composite(
        manifest=ocp.args.JsonRestore()))["manifest"]
    if manifest.get("frozen_fingerprint") != frozen_fingerprint:
      raise FrozenWeightsMismatch(
          f"checkpoint step {step} was trained on frozen weights "
          f"{manifest.get('frozen_source')!r} (fingerprint {manifest.get('frozen_fingerprint')}), "
          f"but this run's frozen weights have fingerprint {frozen_fingerprint}. Resume with "
          "the same frozen weights, or start in a new workdir.")
    _check_shapes(self.manager.item_metadata(step)["state"].tree, abstract_state, step)
    # Not strict: the optimizer state's shapes may differ by ZeRO-1's zero padding at the
    # array ends (update_layout.py), which orbax truncates or pads; every other leaf was
    # checked above.
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state, strict=False), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"], manifest

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _check_shapes(saved: dict, target: dict, step: int):
  """Every leaf outside the optimizer state has its saved shape; the optimizer state's
  leaves (mirrors of the weights, which are checked) may differ by ZeRO-1's padding."""
  for key in sorted(set(saved) - {"opt"}):
    for path, (a, b) in _paired(saved[key], target[key]):
      if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"checkpoint step {step}: state.{key}{jax.tree_util.keystr(path)} "
                         f"was saved as {tuple(a.shape)}, this run's is {tuple(b.shape)}: "
                         "resume with the model config it was trained with, or start in a "
                         "new workdir.")


def _paired(saved, target):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  return [(path, (a, b)) for a, (path, b) in zip(treedef.flatten_up_to(saved), leaves)]
