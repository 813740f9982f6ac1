"""`python -m flamingo_jax.generate` and what it stands on: load_model on a converted
OpenFlamingo model and on train.py workdirs, prompts left-padded as open_flamingo's eval
pads them, images preprocessed as open_clip's eval transform does, one-line errors
(exit 2) for every bad input, and the printed continuation against open_flamingo's own
`generate`.

One tiny OpenFlamingo model (tests/tiny_openflamingo.py, MPT), converted with the CLI,
is shared by all tests; so is one train.py workdir trained from it.
"""
import json
import os
import re
import runpy
import subprocess
import sys

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("open_flamingo")
pytest.importorskip("open_clip")

from config_files import ROOT, load_config  # noqa: E402
from flamingo_jax.config import NFNetConfig  # noqa: E402
from flamingo_jax.convert import openflamingo as of  # noqa: E402
from flamingo_jax.decoding import prompts  # noqa: E402
from flamingo_jax.load_model import ImagePreprocessing, LoadModelError, load_model  # noqa: E402
from flamingo_jax.train import checkpoint, partition  # noqa: E402
from flamingo_jax.train import optimizer as optim, step as step_lib  # noqa: E402
from tests import tiny_openflamingo as tiny  # noqa: E402

sys.path.insert(0, ROOT)
import train as train_lib  # noqa: E402

PROMPT = "<image>Output:a cat.<|endofchunk|><image>Output:"


def flat(tree) -> dict:
  return tu.flatten_dict(jax.device_get(tree), sep="/")


def assert_trees_equal(got, want):
  got, want = flat(got), flat(want)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


# --- shared artefacts ------------------------------------------------------------------------

class Converted:
  """The tiny OpenFlamingo model's artefacts, its converted directory and reference."""

  def __init__(self, root: str):
    self.reference, self.tokenizer, self.dir = tiny.convert(root, "mpt")
    with open(os.path.join(self.dir, "config.json")) as f:
      self.model_config = json.load(f)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  return Converted(str(tmp_path_factory.mktemp("openflamingo")))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Non-square PNG and JPEG photos-to-be, a text file named .jpg, and a missing path."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  # Smooth content plus noise, so resizing and cropping both matter.
  y, x = np.mgrid[0:37, 0:45]
  smooth = np.stack([x * 5, y * 6, (x + y) * 3], -1)
  png = np.clip(smooth + rng.integers(0, 40, smooth.shape), 0, 255).astype(np.uint8)
  Image.fromarray(png).save(root / "a.png")
  jpeg = rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)
  Image.fromarray(jpeg).save(root / "b.jpg", quality=90)
  (root / "notes.jpg").write_text("not an image")
  return dict(png=str(root / "a.png"), jpeg=str(root / "b.jpg"), text=str(root / "notes.jpg"),
              missing=str(root / "missing.png"))


@pytest.fixture(scope="module")
def pairs_data(converted, tmp_path_factory):
  """A prepared pairs dataset tokenised with the converted tokenizer (recorded in it)."""
  from data_files import caption, jpeg
  from flamingo_jax.data import prepare
  path = str(tmp_path_factory.mktemp("pairs"))
  records = [{"id": f"r:{i}", "image": jpeg(i), "caption": caption(i)} for i in range(8)]
  tokenizer = os.path.join(converted.dir, "tokenizer")
  prepare.BUILDERS["pairs"](records=iter(records), data_dir=path, metadata={
      "tokenizer": prepare.tokenizer_metadata(tokenizer)}).download_and_prepare()
  return path


def train_config(converted, pairs_data, init: str):
  config = load_config("tiny")
  config.model = converted.model_config
  config.init = init
  config.total_steps, config.log_every, config.checkpoint_every = 1, 1, 1
  config.optimizer.lr, config.optimizer.warmup_steps = 1e-2, 0
  config.mesh = dict(slice=1, data=1, fsdp=1, tensor=1)
  config.data = {"pairs": dict(source="prepared", path=pairs_data, batch_size=8, seq_len=16,
                               image_size=32, image_mode="clip", augment=False, weight=1.0)}
  return config


class Training:
  """train.py in a background process (a tiny model's step compiles for tens of seconds;
  the other tests run meanwhile), one step from the converted model."""

  def __init__(self, root: str, config):
    self.path, self.log = os.path.join(root, "workdir"), os.path.join(root, "train.log")
    config_file = os.path.join(root, "config.py")
    with open(config_file, "w") as f:
      f.write("import json\nimport ml_collections\n\n\ndef get_config():\n"
              f"  return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    with open(self.log, "w") as log:
      self.proc = subprocess.Popen(
          [sys.executable, os.path.join(ROOT, "train.py"), "--config", config_file,
           "--workdir", self.path], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

  def wait(self) -> str:
    if self.proc.wait(timeout=600) != 0:
      with open(self.log) as f:
        raise AssertionError(f"train.py failed:\n{f.read()[-3000:]}")
    return self.path

  def stop(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


@pytest.fixture(scope="module")
def training(converted, pairs_data, tmp_path_factory):
  run = Training(str(tmp_path_factory.mktemp("training")),
                 train_config(converted, pairs_data, converted.dir))
  yield run
  run.stop()


@pytest.fixture(scope="module")
def workdir(training):
  """(the train.py workdir, the trainable params its checkpoint holds, read by orbax)."""
  import warnings

  import orbax.checkpoint as ocp
  path = training.wait()
  step = ocp.CheckpointManager(os.path.join(path, "checkpoints")).latest_step()
  with warnings.catch_warnings():  # "sharding info not provided": one device, as saved
    warnings.simplefilter("ignore")
    state = ocp.PyTreeCheckpointer().restore(os.path.join(path, "checkpoints", str(step), "state"))
  return path, jax.device_get(state["params"])


@pytest.fixture(scope="module")
def generate_main():
  """The CLI's main(argv), loaded as `python -m` does, without importing the module
  under the name the package's generate function has."""
  return runpy.run_module("flamingo_jax.generate")["main"]


# --- load_model -------------------------------------------------------------------------------

@pytest.mark.usefixtures("training")  # start train.py now; test_workdir_... waits for it
def test_converted_dir_loads_like_load_converted(converted):
  model, params, tokenizer, preprocessing = load_model(converted.dir)
  want_model, want_params, want_tokenizer = of.load_converted(converted.dir)
  assert model.config == want_model.config
  assert_trees_equal(params, want_params)
  assert tokenizer.get_vocab() == want_tokenizer.get_vocab()
  assert preprocessing == ImagePreprocessing(mode="clip", size=32)  # the ViT's size


def one_device_program(config):
  """train.py's program for `config` on one device, shapes from the config's data."""
  from flamingo_jax.train import program as program_lib
  return program_lib.from_config(config, jax.devices()[:1])


def train_state(config, params):
  """(state, frozen) as train.py builds them, with shifted ("trained") trainable params."""
  trainable, frozen = partition.split(params, tuple(config.trainable))
  trainable = jax.tree.map(lambda x: x.astype(jnp.float32) + 0.25, trainable)
  opt = optim.build(**dict(config.optimizer), total_steps=config.total_steps)
  state = step_lib.init_state(trainable, opt, jax.random.PRNGKey(config.seed + 1))
  return state, partition.cast(frozen, jnp.dtype(config.frozen_dtype))


def save_workdir(path, config, state, frozen, fingerprint=None):
  """A workdir as train.py leaves it (its manifest as train() builds it), without
  running train.py's step."""
  manifest = dict(frozen_source=f"random init (seed {config.seed})",
                  frozen_fingerprint=fingerprint or checkpoint.fingerprint(frozen),
                  config=config.to_json())
  ckpt = checkpoint.Checkpointer(os.path.join(path, "checkpoints"))
  ckpt.save(3, state, {}, manifest, force=True)
  ckpt.wait()
  ckpt.close()


def test_random_init_workdir_recreates_train_py_init(converted, pairs_data, tmp_path):
  config = train_config(converted, pairs_data, init="")
  config.seed = 3
  # Smaller than the converted model (its init compiles twice as fast); same vocabulary.
  config.model.vision.depth, config.model.lm.num_layers = 1, 2
  config.model.resampler.update(dict(depth=1, num_latents=4))
  program = one_device_program(config)
  trainable, frozen, source = train_lib.init_params(program, config)
  assert source == "random init (seed 3)"
  state, frozen = train_state(config, partition.merge(trainable, frozen))
  save_workdir(str(tmp_path / "ok"), config, state, frozen)

  _, params, tokenizer, _ = load_model(str(tmp_path / "ok"))
  got_trainable, got_frozen = partition.split(params, tuple(config.trainable))
  assert_trees_equal(got_trainable, state["params"])
  assert_trees_equal(got_frozen, frozen)  # in frozen_dtype, as it trained
  # The tokenizer the prepared dataset recorded.
  assert tokenizer.convert_tokens_to_ids("<image>") == program.model_config.media_token_id

  save_workdir(str(tmp_path / "other"), config, state, frozen, fingerprint="0" * 32)
  with pytest.raises(LoadModelError, match="fingerprint 0{32}, but those weights now"):
    load_model(str(tmp_path / "other"))

  config.data = {"synthetic": dict(source="synthetic", batch_size=8)}
  save_workdir(str(tmp_path / "untokenized"), config, state, frozen)
  with pytest.raises(LoadModelError, match="no tokenizer.*--tokenizer DIR"):
    load_model(str(tmp_path / "untokenized"))
  _, params, _, _ = load_model(str(tmp_path / "untokenized"),
                               tokenizer=os.path.join(converted.dir, "tokenizer"))
  assert_trees_equal(partition.split(params, tuple(config.trainable))[0], state["params"])


def test_neither_layout_names_both(tmp_path):
  with pytest.raises(LoadModelError, match="converted model.*config.json.*train.py workdir"):
    load_model(str(tmp_path))
  with pytest.raises(LoadModelError, match="no such directory; expected a converted model"):
    load_model(str(tmp_path / "missing"))
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(LoadModelError, match="no checkpoint saved yet"):
    load_model(str(tmp_path))


# --- prompts and images -----------------------------------------------------------------------

@pytest.mark.parametrize("size", [224, 32])
def test_preprocessing_matches_open_clip_eval_transform(files, size):
  """open_flamingo's eval: PIL image through open_clip's `image_transform(is_train=False)`."""
  from open_clip.transform import image_transform
  transform = image_transform(size, is_train=False)
  preprocessing = ImagePreprocessing(mode="clip", size=size)
  for name in ("png", "jpeg"):
    want = transform(Image.open(files[name])).permute(1, 2, 0).numpy()  # CHW → HWC
    got = preprocessing(prompts.read_image(files[name]))
    assert got.shape == want.shape == (size, size, 3)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=name)


def test_nfnet_models_get_the_papers_padding(converted):
  import dataclasses

  from flamingo_jax.config import FlamingoConfig
  from flamingo_jax.load_model import default_preprocessing
  vit = FlamingoConfig.from_dict(converted.model_config)
  nfnet = dataclasses.replace(vit, vision=NFNetConfig())
  assert default_preprocessing(nfnet) == ImagePreprocessing(mode="paper", size=320)


def test_prompts_are_left_padded_like_hf(converted):
  tokenizer = converted.tokenizer
  rows = [PROMPT, "<image>a"]
  ids, mask = prompts.encode_prompts(tokenizer, rows, max_len=64)
  tokenizer.padding_side = "left"
  want = tokenizer(rows, padding="longest", return_tensors="np")
  assert ids.dtype == mask.dtype == np.int32
  np.testing.assert_array_equal(ids, want["input_ids"])
  np.testing.assert_array_equal(mask, want["attention_mask"])
  assert mask[1, 0] == 0 and mask[1, -1] == 1  # padding on the left
  assert prompts.media_counts(ids, converted.reference.media_token_id) == [2, 1]
  with pytest.raises(prompts.PromptError, match=r"prompt 0 is 15 tokens, longer than the 10 "
                     r"that fit \(why\)"):
    prompts.encode_prompts(tokenizer, rows, max_len=10, why="why")


def test_images_fill_media_slots_in_order(files):
  preprocessing = ImagePreprocessing(mode="clip", size=32)
  images, mask = prompts.load_images([files["png"], files["jpeg"], files["png"]],
                                     preprocessing, [2, 1])
  assert images.shape == (2, 2, 1, 32, 32, 3) and images.dtype == np.float32
  np.testing.assert_array_equal(mask, [[True, True], [True, False]])
  png, jpeg = (preprocessing(prompts.read_image(files[k])) for k in ("png", "jpeg"))
  for (b, m), want in {(0, 0): png, (0, 1): jpeg, (1, 0): png}.items():
    np.testing.assert_array_equal(images[b, m, 0], want)
  assert not images[1, 1].any()  # the empty slot
  assert prompts.load_images([], preprocessing, [0]) == (None, None)


# --- the command ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["more_tags", "fewer_tags", "too_long", "not_an_image",
                                  "missing_image", "not_a_model", "sampling_flag",
                                  "bad_flag_value"])
def test_bad_inputs_exit_2_with_one_line(case, converted, files, generate_main, tmp_path,
                                         capsys):
  args = {"model": converted.dir, "image": [files["png"]], "prompt": "<image>Output:",
          "extra": []}
  expect = {
      "more_tags": (dict(prompt=PROMPT), r"the prompts have 2 <image> tags but 1 image given"),
      "fewer_tags": (dict(image=[files["png"]] * 2), r"have 1 <image> tag but 2 images given"),
      "too_long": (dict(prompt="<image>" + "a photo of a cat " * 20),
                   r"prompt 0 is \d+ tokens, longer than the 56 that fit \(lm.max_seq_len=64 "
                   r"minus --max-new-tokens=8\)"),
      "not_an_image": (dict(image=[files["text"]]), f"image {files['text']}: not a readable image"),
      "missing_image": (dict(image=[files["missing"]]), f"image {files['missing']}: cannot read"),
      "not_a_model": (dict(model=str(tmp_path)), r"not a model directory; expected a converted "
                      r"model \(config.json.*or a train.py workdir"),
      "sampling_flag": (dict(extra=["--top-k", "5"]), r"--top-k only take effect with --do-sample"),
      "bad_flag_value": (dict(extra=["--num-beams", "0"]), r"--num-beams must be >= 1, got 0"),
  }
  overrides, message = expect[case]
  args.update(overrides)
  argv = ["--model", args["model"], "--prompt", args["prompt"], "--max-new-tokens", "8",
          *[a for image in args["image"] for a in ("--image", image)], *args["extra"]]
  assert generate_main(argv) == 2
  out, err = capsys.readouterr()
  assert out == ""
  assert err.startswith("generate: error: ") and err.count("\n") == 1, err
  assert re.search(message, err), err


def _run_cli(*argv):
  return subprocess.run([sys.executable, "-m", "flamingo_jax.generate", *argv], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_command_exit_status(tmp_path):
  proc = _run_cli("--model", str(tmp_path), "--prompt", "a")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def _reference_continuation(converted, files, max_new_tokens):
  """open_flamingo end to end: PIL → open_clip's eval transform → Flamingo.generate."""
  import torch
  from open_clip.transform import image_transform
  transform = image_transform(32, is_train=False)
  vision_x = torch.stack([transform(Image.open(files[k])) for k in ("png", "jpeg")])
  vision_x = vision_x[None, :, None]  # [B, M, F, C, H, W]
  tokenizer = converted.tokenizer
  tokenizer.padding_side = "left"
  enc = tokenizer([PROMPT], return_tensors="pt")
  with torch.no_grad():
    out = converted.reference.generate(vision_x=vision_x, lang_x=enc["input_ids"],
                                       attention_mask=enc["attention_mask"],
                                       max_new_tokens=max_new_tokens, num_beams=1)
  new = out[0, enc["input_ids"].shape[1]:].tolist()
  eoc = converted.reference.eoc_token_id
  return tokenizer.decode(new[:new.index(eoc)] if eoc in new else new, skip_special_tokens=True)


def test_prints_open_flamingos_greedy_continuation(converted, files):
  want = _reference_continuation(converted, files, max_new_tokens=8)
  proc = _run_cli("--model", converted.dir, "--image", files["png"], "--image", files["jpeg"],
                  "--prompt", PROMPT, "--max-new-tokens", "8")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == want + "\n"


# --- the train.py workdir (last: it waits for the background run) ----------------------------

def test_workdir_merges_its_checkpoint_with_the_frozen_init(converted, workdir):
  path, trained = workdir
  model, params, tokenizer, preprocessing = load_model(path)
  _, init, _ = of.load_converted(converted.dir)
  patterns = tuple(load_config("tiny").trainable)
  trainable, frozen = partition.split(params, patterns)
  init_trainable, init_frozen = partition.split(init, patterns)
  assert_trees_equal(trainable, trained)  # the checkpoint's
  # In the workdir's frozen_dtype (bf16), as it trained: no fp32 copy.
  assert_trees_equal(frozen, partition.cast(init_frozen, jnp.bfloat16))
  assert not np.allclose(flat(trained)["resampler/latents"],
                         flat(init_trainable)["resampler/latents"])  # it did train
  assert tokenizer.get_vocab() == converted.tokenizer.get_vocab()  # the init's
  assert preprocessing == ImagePreprocessing(mode="clip", size=32)  # the data config's


def test_init_from_another_model_is_refused(converted, pairs_data):
  """config.init's converted model must be the one config.model describes."""
  from flamingo_jax.config import ConfigError
  config = train_config(converted, pairs_data, init=converted.dir)
  config.model.xattn.activation = "relu" if config.model.xattn.activation != "relu" else "gelu"
  config.model.dtype = "bfloat16"  # a run-time choice: allowed
  program = one_device_program(config)
  with pytest.raises(ConfigError, match=r"init: .* holds another model \(xattn.activation: "
                                        r"'\w+' there, 'relu|gelu' here\)"):
    train_lib.init_params(program, config)
