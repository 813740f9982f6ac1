"""From raw files to training in the README's commands: `prepare` on a pairs table, then
train.py with configs/own_data.py given the dataset's path; the checks of the dataset's
tokenizer and image size against the model (one line, exit 2, before compiling); prepare
and the prepared reader through etils epath (a bucket faked in memory)."""
import functools
import json
import math
import os
import subprocess
import sys

from etils import epath
import pytest

from config_files import ROOT, load_config
from data_files import caption, jpeg
from flamingo_jax.config import ConfigError
from flamingo_jax.data import prepare, prepared, sources
from flamingo_jax.data.tokenizer import load_tokenizer
from flamingo_jax.train import config as train_config

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


def write_pairs(d: str) -> str:
  """images/0..7.jpg and a table naming them with both spellings of the fields the README
  lists (image / file, caption / text), and one row whose image is missing."""
  (epath.Path(d) / "images").mkdir(parents=True, exist_ok=True)
  for i in range(8):
    (epath.Path(d) / "images" / f"{i}.jpg").write_bytes(jpeg(i))
  rows = [{"image": f"{i}.jpg", "caption": caption(i)} for i in range(4)]
  rows += [{"file": f"images/{i}.jpg", "text": caption(i)} for i in range(4, 8)]
  rows += [{"image": "missing.jpg", "caption": "x"}]
  (epath.Path(d) / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return f"{d}/pairs.jsonl"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer_dir):
  """`python -m flamingo_jax.data.prepare pairs --input raw/pairs.jsonl --output out
  --tokenizer TOK` (its main, in this process)."""
  d = tmp_path_factory.mktemp("own")
  table = write_pairs(str(d / "raw"))
  assert prepare.main(["pairs", "--input", table, "--output", str(d / "out"),
                       "--tokenizer", tokenizer_dir, "--no-progress"]) == 0
  with open(d / "out" / "summary_pairs.json") as f:
    assert json.load(f) == {"read": 9, "kept": 8, "skipped": {"image_missing": 1}}
  return str(d / "out")


def mismatches(tokenizer_dir) -> dict:
  """A mistake → (its --config.FIELD override, what the error must say: both values and
  the flag that fixes it)."""
  specials = load_tokenizer(tokenizer_dir)[1]
  n, image, eoc = specials.vocab_size, specials.media_token_id, specials.eoc_token_id
  return {
      "vocab": (f"model.lm.vocab_size={n - 1}",
                [f"{n} tokens", f"model.lm.vocab_size is {n - 1}",
                 f"--config.model.lm.vocab_size={n}"]),
      "image id": ("model.media_token_id=5",
                   [f"<image> id is {image}", "model.media_token_id is 5",
                    f"--config.model.media_token_id={image}"]),
      "eoc id": ("model.eoc_token_id=7",
                 [f"<|endofchunk|> id is {eoc}", "model.eoc_token_id is 7",
                  f"--config.model.eoc_token_id={eoc}"]),
      "image size": ("data.own.image_size=16",
                     ["data.own.image_size: 16 px", "takes 32 px",
                      "--config.data.own.image_size=32"]),
  }


class Run:
  """train.py in a background process, its output in files."""

  def __init__(self, root: str, *args):
    self.workdir = os.path.join(root, "workdir")
    os.makedirs(root, exist_ok=True)
    self.out, self.err = (open(os.path.join(root, name), "w+") for name in ("out", "err"))
    self.proc = subprocess.Popen([sys.executable, "train.py", *args, "--workdir", self.workdir],
                                 cwd=ROOT, env=ENV, stdout=self.out, stderr=self.err, text=True)

  def wait(self) -> tuple[int, str, str]:
    """(exit status, stdout, stderr)."""
    self.proc.wait(timeout=600)
    self.out.seek(0), self.err.seek(0)
    return self.proc.returncode, self.out.read(), self.err.read()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset, tokenizer_dir):
  """The README's commands, started by the module's first test (a tiny model's step
  compiles for tens of seconds; the other tests run meanwhile): the tiny model on the
  dataset, a converted model fine-tuned on it (`init=`; here the tiny model at random,
  saved as flamingo_jax.convert.openflamingo saves one), and a mismatch."""
  from flamingo_jax.config import FlamingoConfig
  from flamingo_jax.convert.openflamingo import save_converted
  from flamingo_jax.load_model import random_init
  from flamingo_jax.model import Flamingo
  root = str(tmp_path_factory.mktemp("runs"))
  out = {"train": Run(f"{root}/train", "--config", f"configs/own_data.py:path={dataset},steps=4")}
  override, _ = mismatches(tokenizer_dir)["vocab"]  # the one that trained on NaN
  out["mismatch"] = Run(f"{root}/mismatch", "--config", f"configs/own_data.py:path={dataset}",
                        f"--config.{override}")
  model = Flamingo(FlamingoConfig.from_dict(load_config("own_data", f"path={dataset}").model))
  out["converted"] = f"{root}/converted"
  save_converted(out["converted"], model, random_init(model, 1), load_tokenizer(tokenizer_dir)[0])
  out["fine-tune"] = Run(f"{root}/fine-tune", "--config",
                         f"configs/own_data.py:path={dataset},init={out['converted']},steps=2")
  yield out
  for name in ("train", "mismatch", "fine-tune"):
    if out[name].proc.poll() is None:
      out[name].proc.kill()


def test_init_takes_the_converted_model(runs, dataset):
  config = load_config("own_data", f"path={dataset},init={runs['converted']}")
  with open(os.path.join(runs["converted"], "config.json")) as f:
    assert config.model.to_dict() == json.load(f)
  assert config.init == runs["converted"]
  assert (config.data.own.rules, config.data.own.image_mode) == ("openflamingo", "clip")


@pytest.mark.parametrize("case", ["vocab", "image id", "eoc id", "image size"])
def test_mismatches_are_refused_before_the_program_is_built(dataset, tokenizer_dir, monkeypatch,
                                                            case):
  import train as train_lib
  from flamingo_jax.train import program
  monkeypatch.setattr(program, "build", lambda *a, **k: pytest.fail("built the program first"))
  override, words = mismatches(tokenizer_dir)[case]
  config = load_config("own_data", f"path={dataset}")
  field, value = override.split("=")
  *parents, last = field.split(".")
  functools.reduce(getattr, parents, config)[last] = int(value)  # as --config.FIELD=VALUE
  with pytest.raises(ConfigError) as e:
    train_lib.train(config, "/nonexistent/never/made")
  for w in words:
    assert w in str(e.value)


def test_openflamingo_keeps_its_ids_and_is_refused_other_data(dataset, tokenizer_dir):
  from flamingo_jax import presets
  from flamingo_jax.config import FlamingoConfig
  config = load_config("own_data", f"path={dataset},model=openflamingo_3b,batch_size=4")
  assert config.model.media_token_id == presets.OPENFLAMINGO_MEDIA_TOKEN_ID
  d = config.data.own
  assert (d.image_size, d.image_mode, d.rules, d.batch_size) == (224, "clip", "openflamingo", 4)
  model = FlamingoConfig.from_dict(config.model)
  with pytest.raises(ConfigError, match=f"<image> id is {load_tokenizer(tokenizer_dir)[1].media_token_id}, "
                     f"but model.media_token_id is {presets.OPENFLAMINGO_MEDIA_TOKEN_ID}"):
    sources.check_tokens("own", model, load_tokenizer(tokenizer_dir)[1])


def test_config_argument(dataset):
  arg = train_config.parse_arg("a=3, b=x,c,d=0.5", a=1, b="", c=False, d=1.0)
  assert dict(arg) == dict(a=3, b="x", c=True, d=0.5)
  for bad, field in (("e=1", "'e': unknown"), ("a=x", "a='x': not a int"), ("a", "a=''")):
    with pytest.raises(ConfigError, match=field):
      train_config.parse_arg(bad, a=1)
  for bad, field in (("steps=3", "path: not set"), (f"path={dataset},step=3", "'step': unknown"),
                     (f"path={dataset},model=tiniest", "no configs/tiniest.py"),
                     ("path=/nonexistent", "expected one prepared dataset")):
    with pytest.raises(ConfigError, match=field):
      load_config("own_data", bad)


def test_a_config_argument_mistake_is_one_line(dataset):
  """As train.py's flag parsing reports it (cli.run_absl → cli.flag_error): the error of
  get_config, not the traceback ml_collections wraps around it."""
  from absl import flags
  from ml_collections import config_flags
  from flamingo_jax import cli
  for arg, words in ((f"path={dataset},step=3", "config argument 'step': unknown"),
                     ("steps=3", "config argument path: not set")):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values)
    argv = ["train.py", "--config", f"{ROOT}/configs/own_data.py:{arg}"]
    with pytest.raises(flags.Error) as e:
      values(argv)
    line = cli.flag_error(e.value, argv)
    assert "\n" not in line and "Traceback" not in line and words in line, line


@pytest.fixture
def bucket(monkeypatch):
  """gs:// served from memory by fsspec (as gcsfs would from a bucket), through epath."""
  import fsspec
  from etils.epath import backend, gpath
  from fsspec.implementations.memory import MemoryFileSystem

  class Bucket(MemoryFileSystem):
    protocol, root_marker, store, pseudo_dirs = ("gs", "gcs"), "", {}, [""]

    @classmethod
    def _strip_protocol(cls, path):
      return str(path).split("://", 1)[-1].rstrip("/")

    def __init__(self, *args, finalize_on_close=False, **kwargs):
      super().__init__(*args, **kwargs)

  def forget():  # epath caches the file system it got from fsspec
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()
  for protocol in Bucket.protocol:
    fsspec.register_implementation(protocol, Bucket, clobber=True)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # epath's fsspec backend
  forget()
  yield Bucket()
  for protocol in Bucket.protocol:  # the next fsspec.filesystem('gs') is gcsfs again
    sys.modules["fsspec.registry"]._registry.pop(protocol, None)
  forget()


def test_prepare_and_the_reader_go_through_epath(bucket, dataset, tmp_path):
  table = write_pairs("gs://b/raw")
  # Inputs in the bucket: the table, and its images beside it and in images/.
  result = prepare.prepare("pairs", "gs://b/raw/*.jsonl", str(tmp_path / "out"))
  assert (result["read"], result["kept"]) == (9, 8)
  with open(result["skipped_list"]) as f:
    skipped = json.loads(f.read())
  assert skipped["file"] == table and "gs://b/raw/images/" in skipped["detail"]
  # A dataset in the bucket is found under its output folder, and its metadata read.
  local = prepared.find_dataset_dir(dataset)
  for name in ("dataset_info.json", "metadata.json", "features.json"):
    epath.Path(f"gs://b/out/flamingo_pairs/1.0.0/{name}").write_text(
        epath.Path(local, name).read_text())
  assert prepared.find_dataset_dir("gs://b/out") == "gs://b/out/flamingo_pairs/1.0.0"
  assert prepared.read_metadata("gs://b/out")["kind"] == "pairs"
  assert load_config("own_data", "path=gs://b/out").data.own.path == "gs://b/out"
  with pytest.raises(prepare.PrepareError, match="--output: gs://b/out/flamingo_pairs/1.0.0 exists"):
    prepare.check_arguments("pairs", table, "gs://b/out")


# The runs the `runs` fixture started.

def test_raw_files_to_training(runs, dataset, tokenizer_dir):
  status, _, err = runs["train"].wait()
  assert status == 0, err[-3000:]
  workdir = runs["train"].workdir
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(math.isfinite(r["loss"]) for r in rows)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
  # The tiny model was sized to the dataset's tokenizer.
  config = load_config("own_data", f"path={dataset}")
  specials = load_tokenizer(tokenizer_dir)[1]
  assert config.model.lm.vocab_size >= specials.vocab_size
  assert (config.model.media_token_id, config.model.eoc_token_id) == (
      specials.media_token_id, specials.eoc_token_id)


def test_fine_tuning_a_converted_model(runs):
  status, _, err = runs["fine-tune"].wait()
  assert status == 0, err[-3000:]
  with open(os.path.join(runs["fine-tune"].workdir, "checkpoints", "2", "manifest", "metadata")) as f:
    assert runs["converted"] in f.read()  # the frozen weights are the converted folder's


def test_a_mismatch_is_one_line_and_exit_status_2(runs, tokenizer_dir):
  status, _, err = runs["mismatch"].wait()
  lines = err.strip().splitlines()
  assert status == 2 and len(lines) == 1, err[-3000:]
  assert all(w in lines[0] for w in mismatches(tokenizer_dir)["vocab"][1]), lines[0]
  assert not os.path.exists(os.path.join(runs["mismatch"].workdir, "metrics.jsonl"))
