"""`load_model(DIR) -> (model, params, tokenizer, image_preprocessing)`, for inference.

DIR is either
  a converted model   what `python -m flamingo_jax.convert.openflamingo ... --output DIR`
                      writes: config.json, params/ (orbax), tokenizer/
  a train.py workdir  checkpoints/ holding at least one step: its latest trainable params,
                      merged with the frozen weights its manifest names (`frozen_source`:
                      a converted directory, or 'random init (seed N)', re-created as
                      train.py's init_params does). The frozen fingerprint must match the
                      manifest's, as train.py requires when it resumes.

Only the trainable params are read from a training checkpoint (no optimizer state).
A workdir's frozen weights come back in its `frozen_dtype`, the precision they trained in
(train.py rounds them so; the fingerprint is checked on that rounding, as there): the
model is evaluated as it was trained, and no full-precision copy is made.

`image_preprocessing` turns a decoded image into the model's input: the training data's
processing for a workdir that trained on prepared / TFDS data, else by vision tower: a
ViT (OpenFlamingo's CLIP) gets open_clip's eval transform (bicubic short-side resize,
centre crop, CLIP mean / std), an NFNet the paper's pad-to-square at its image size.
"""
import dataclasses
import functools
import json
import os
import re

import numpy as np

from flamingo_jax.config import ConfigError, FlamingoConfig, ViTConfig
from flamingo_jax.data import images

CONVERTED_LAYOUT = ("a converted model (config.json, params/, tokenizer/: what `python -m "
                    "flamingo_jax.convert.openflamingo ... --output DIR` writes)")
WORKDIR_LAYOUT = "a train.py workdir (checkpoints/ with at least one saved step)"
_RANDOM_INIT = re.compile(r"random init \(seed (-?\d+)\)")


class LoadModelError(ValueError):
  """A directory that cannot be loaded as a model; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
  """Deterministic (evaluation) `images.preprocess` of one decoded image."""
  mode: str  # images.MODES: 'clip' (crop) or 'paper' (pad)
  size: int

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] (or grey / RGBA) → float32 [size, size, 3], normalised."""
    return images.preprocess(image, mode=self.mode, size=self.size)


def load_model(path, *, tokenizer=None, require_tokenizer: bool = True):
  """`(Flamingo model, params, tokenizer, ImagePreprocessing)` from a converted model or a
  train.py workdir (see the module docstring). `tokenizer`: an HF tokenizer directory
  that overrides the one the directory provides. `require_tokenizer=False`: a workdir
  without one (the synthetic demo's word vocabulary) gives tokenizer None."""
  path = os.path.abspath(os.fspath(path))
  if _is_converted(path):
    model, params = restore_converted(path)
    tok = _tokenizer(tokenizer or _converted_tokenizer(path), model.config, path)
    return model, params, tok, default_preprocessing(model.config)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return _load_workdir(path, tokenizer, require_tokenizer)
  if not os.path.isdir(path):
    raise LoadModelError(f"{path}: no such directory; expected {CONVERTED_LAYOUT} or "
                         f"{WORKDIR_LAYOUT}")
  raise LoadModelError(f"{path}: not a model directory; expected {CONVERTED_LAYOUT} or "
                       f"{WORKDIR_LAYOUT}")


# --- converted directories -------------------------------------------------------------------

def _is_converted(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, "config.json"))
          and os.path.isdir(os.path.join(path, "params")))


def _converted_tokenizer(path: str) -> str:
  tok = os.path.join(path, "tokenizer")
  if not os.path.isdir(tok):
    raise LoadModelError(f"{path}: no tokenizer/ directory (the convert CLI writes one); "
                         "pass --tokenizer DIR (load_model(..., tokenizer=DIR))")
  return tok


def converted_config(path: str) -> FlamingoConfig:
  """The model config (config.json) of a converted directory."""
  return _read_config(os.path.join(path, "config.json"))


def restore_converted(path: str, target=None):
  """(model, params) of a converted directory (`convert.openflamingo.load_converted`
  adds the tokenizer); errors name the file. `target`: the tree to restore into
  (ShapeDtypeStructs of `abstract_params(converted_config(path))`'s shapes with the dtype
  and sharding each leaf should have: orbax casts, and each process reads only its own
  devices' shards); default: the saved dtypes, on the host."""
  import orbax.checkpoint as ocp

  from flamingo_jax.convert.state_dict import check_tree
  from flamingo_jax.model import Flamingo

  model = Flamingo(converted_config(path))
  expected = abstract_params(model.config)
  try:
    params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"),
                                                expected if target is None else target)
  except Exception as e:  # orbax raises many types for missing / mis-shaped arrays
    raise LoadModelError(f"{path}/params: cannot restore the params config.json describes "
                         f"({type(e).__name__}: {e}); re-run the convert CLI") from e
  check_tree(params, expected, what=f"params restored from {path}")
  return model, params


@functools.lru_cache(maxsize=4)
def abstract_params(config: FlamingoConfig) -> dict:
  """The model's parameter shapes (eval_shape of its init), once per config."""
  from flamingo_jax.convert.openflamingo import abstract_params
  from flamingo_jax.model import Flamingo
  return abstract_params(Flamingo(config))


def _read_config(file: str) -> FlamingoConfig:
  try:
    with open(file) as f:
      return FlamingoConfig.from_dict(json.load(f))
  except (OSError, json.JSONDecodeError, ConfigError) as e:
    raise LoadModelError(f"{file}: not a valid model config ({e})") from e


# --- train.py workdirs -----------------------------------------------------------------------

def train_config(path):
  """The train.py config a workdir was trained with (ConfigDict), None for a converted
  model."""
  path = os.path.abspath(os.fspath(path))
  if _is_converted(path) or not os.path.isdir(os.path.join(path, "checkpoints")):
    return None
  return _read_manifest(os.path.join(path, "checkpoints"))[2]


def _load_workdir(path: str, tokenizer, require_tokenizer: bool = True):
  import jax
  import jax.numpy as jnp

  from flamingo_jax.model import Flamingo
  from flamingo_jax.train import checkpoint, partition

  where, manifest, config = _read_manifest(os.path.join(path, "checkpoints"))
  try:
    model = Flamingo(FlamingoConfig.from_dict(config.model))
  except ConfigError as e:
    raise LoadModelError(f"{where}: the manifest's model config is invalid ({e})") from e
  source = manifest.get("frozen_source", "")
  # User errors first: the tokenizer is cheap to find, the frozen weights are not.
  try:
    tok = _tokenizer(tokenizer or _workdir_tokenizer(path, source, config), model.config, where)
  except LoadModelError:
    if require_tokenizer or tokenizer:
      raise
    tok = None

  patterns = tuple(config.trainable)
  _, frozen = partition.split(_initial_params(model, source, where), patterns)
  cast = jax.jit(partition.cast, static_argnums=1)  # one program, not one op per leaf
  frozen = cast(frozen, jnp.dtype(config.frozen_dtype))
  got = checkpoint.fingerprint(frozen)
  if got != manifest.get("frozen_fingerprint"):
    raise LoadModelError(
        f"{where}: trained on frozen weights {source!r} with fingerprint "
        f"{manifest.get('frozen_fingerprint')}, but those weights now have fingerprint {got}; "
        "restore the frozen weights it was trained on")
  trainable = _restore_trainable(os.path.join(where, "state"), model, patterns)
  params = partition.merge(trainable, frozen)
  return model, params, tok, _workdir_preprocessing(model.config, config)


def _read_manifest(directory: str):
  """(the latest step's directory, its manifest, the train config the manifest holds)."""
  import ml_collections
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = manager.latest_step()
    if step is None:
      raise LoadModelError(f"{directory}: no checkpoint saved yet; expected {WORKDIR_LAYOUT} "
                           "(train.py saves every config.checkpoint_every steps and at the end)")
    where = f"{directory}/{step}"
    try:
      manifest = manager.restore(step, args=ocp.args.Composite(
          manifest=ocp.args.JsonRestore()))["manifest"]
    except Exception:  # orbax raises many types for a step without the item
      manifest = None
  finally:
    manager.close()
  if not isinstance(manifest, dict) or "config" not in manifest:
    raise LoadModelError(f"{where}: no train.py manifest (frozen_source, frozen_fingerprint, "
                         f"config); expected {WORKDIR_LAYOUT}")
  return where, manifest, ml_collections.ConfigDict(json.loads(manifest["config"]))


def _initial_params(model, source: str, where: str) -> dict:
  """The params train.py's init_params started from (frozen ones are what it kept)."""
  seed = _RANDOM_INIT.fullmatch(source)
  if seed:
    return random_init(model, int(seed.group(1)))
  if not _is_converted(source):
    raise LoadModelError(f"{where}: the manifest's frozen weights come from {source!r}, "
                         f"which is not {CONVERTED_LAYOUT}; put it back at that path")
  from flamingo_jax.lm import token_rows
  _, params = restore_converted(source)
  return token_rows.with_rows(params, model.config)  # as train.py's init_params


def random_init(model, seed: int) -> dict:
  """train.py's random init from `seed` (parameter values depend neither on the example
  batch's shapes nor on the mesh)."""
  import jax
  return _init_fn(model.config)(jax.random.PRNGKey(seed))


@functools.lru_cache(maxsize=4)
def _init_fn(config: FlamingoConfig):
  """train.py's init (train/program.init_fn), jitted and unboxed."""
  import flax.linen as nn
  import jax

  from flamingo_jax.model import Flamingo
  from flamingo_jax.train.program import init_fn
  init = init_fn(Flamingo(config))
  return jax.jit(lambda rng: nn.unbox(init(rng)))


def _restore_trainable(state_dir: str, model, patterns) -> dict:
  """state['params'] only (the optimizer state stays on disk), as float32 on one device."""
  import jax
  import orbax.checkpoint as ocp

  from flamingo_jax.convert.state_dict import CheckpointMismatchError, check_tree
  from flamingo_jax.train import partition

  want, _ = partition.split(abstract_params(model.config), patterns)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {"params": jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, np.float32, sharding=device), want)}
  checkpointer = ocp.PyTreeCheckpointer()
  saved = checkpointer.metadata(state_dir).item_metadata["params"]
  try:
    check_tree(saved, want, what=f"trainable params in {state_dir}")
  except CheckpointMismatchError as e:
    raise LoadModelError(f"{e}\n(the manifest's config.trainable and model do not match "
                         "the checkpoint)") from e
  restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  return restored["params"]


def _workdir_tokenizer(path: str, source: str, config) -> str:
  """The converted init's tokenizer/, else a dataset's `tokenizer`, else the one a
  prepared dataset recorded."""
  if not _RANDOM_INIT.fullmatch(source) and os.path.isdir(os.path.join(source, "tokenizer")):
    return os.path.join(source, "tokenizer")
  for name in sorted(config.data):
    d = config.data[name]
    if d.get("tokenizer"):
      return str(d["tokenizer"])
    if d.get("source") == "prepared" and d.get("path"):
      recorded = _recorded_tokenizer(str(d["path"]))
      if recorded:
        return recorded
  raise LoadModelError(
      f"{path}: no tokenizer: its frozen weights ({source!r}) have no tokenizer/ and no "
      "dataset in its config names one; pass --tokenizer DIR (load_model(..., tokenizer=DIR))")


def _recorded_tokenizer(dataset_path: str) -> str | None:
  from flamingo_jax.data import prepared
  try:
    with open(os.path.join(prepared.find_dataset_dir(dataset_path), "metadata.json")) as f:
      return json.load(f).get("tokenizer", {}).get("path")
  except (OSError, ValueError):
    return None


# --- tokenizer and image preprocessing -------------------------------------------------------

def _tokenizer(path: str, config: FlamingoConfig, where: str):
  """The HF tokenizer at `path`, checked to give the model's special-token ids."""
  from flamingo_jax.data import tokenizer as tokenizer_lib
  try:
    tok, specials = tokenizer_lib.load_tokenizer(path)
  except tokenizer_lib.TokenizerNotFoundError as e:
    raise LoadModelError(f"{where}: {e}") from e
  for name, got in (("media_token_id", specials.media_token_id),
                    ("eoc_token_id", specials.eoc_token_id)):
    want = getattr(config, name)
    if got != want:
      raise LoadModelError(f"tokenizer {path}: gives {name} {got}, but the model ({where}) "
                           f"was built with {want}; use the tokenizer it was trained with")
  if specials.vocab_size > config.lm.vocab_size:
    raise LoadModelError(f"tokenizer {path}: {specials.vocab_size} tokens, more than the "
                         f"model's lm.vocab_size={config.lm.vocab_size} ({where})")
  return tok


def default_preprocessing(config: FlamingoConfig) -> ImagePreprocessing:
  """By vision tower: ViT → open_clip's eval transform; NFNet → the paper's padding."""
  mode = "clip" if isinstance(config.vision, ViTConfig) else "paper"
  return ImagePreprocessing(mode=mode, size=int(config.vision.image_size))


def _workdir_preprocessing(model_config: FlamingoConfig, config) -> ImagePreprocessing:
  """The training data's (image_mode, image_size) when its prepared / TFDS datasets
  agree on one the model can take; else the vision tower's default."""
  from flamingo_jax.data.prepared import PROCESSING_DEFAULTS
  used = {(str(o["image_mode"]), int(o["image_size"]))
          for o in (dict(PROCESSING_DEFAULTS, **dict(d)) for d in config.data.values()
                    if d.get("source") in ("prepared", "tfds"))}
  default = default_preprocessing(model_config)
  if len(used) != 1:
    return default
  mode, size = used.pop()
  if isinstance(model_config.vision, ViTConfig) and size != model_config.vision.image_size:
    return default
  return ImagePreprocessing(mode=mode, size=size)
