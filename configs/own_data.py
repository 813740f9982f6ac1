"""Train on your own data: a dataset written by `python -m flamingo_jax.data.prepare`,
named in the config argument (big_vision's `--config FILE.py:key=value,...`).

  python train.py --config configs/own_data.py:path=/data/mine --workdir /tmp/mine
  python train.py --config configs/own_data.py:path=/data/mine,init=converted/,batch_size=64,steps=5000 \
      --workdir /tmp/mine [--config.FIELD=VALUE ...]

Arguments:
  path        prepare's --output folder (or the dataset folder under it); required
  model       a configs/NAME.py whose model to train: tiny (default), openflamingo_3b, ...
  init        a folder written by `python -m flamingo_jax.convert.openflamingo`: its model
              and weights (then `model` is not used)
  tokenizer   read the text with this tokenizer folder, not the one prepare recorded
  batch_size  8; steps: 1000

The dataset is `config.data.own` (`--config.data.own.seq_len=64` etc.; its kind's
default sequence length, the vision tower's image size). The tokenizer's ids come from
the dataset's metadata: `tiny` (random weights: a check that the data flows, in seconds on
a CPU) is sized to them (vocabulary, `<image>` and `<|endofchunk|>` ids); any other model
keeps its own ids, and train.py stops before compiling when the dataset's differ
(data/sources.py `check_tokens`). What trains is the paper's default (config.trainable).
"""
import dataclasses
import json
import os

from flamingo_jax.config import ConfigError
from flamingo_jax.data import prepared
from flamingo_jax.train import config as train_config

_SEQ_LEN = {"mmc4": 256}  # else 32: prepared.py's defaults per kind


def get_config(arg=None):
  arg = train_config.parse_arg(arg, path="", model="tiny", init="", tokenizer="",
                               batch_size=8, steps=1000)
  if not arg.path:
    raise ConfigError("config argument path: not set; give prepare's --output folder, e.g. "
                      "--config configs/own_data.py:path=/data/mine")
  try:
    metadata = prepared.read_metadata(arg.path)
  except prepared.PreparedDataError as e:
    raise ConfigError(f"config argument path: {e}") from None
  kind = metadata.get("kind")
  config = _model_config(arg.model) if not arg.init else train_config.defaults()
  if arg.init:
    with open(os.path.join(arg.init, "config.json")) as f:
      config.model = json.load(f)
    config.init = arg.init
  model = config.model
  seq_len = _SEQ_LEN.get(kind, 32)
  if arg.model == "tiny" and not arg.init:
    specials = _special_tokens(arg, metadata)
    model.lm.vocab_size = -(-specials["vocab_size"] // 64) * 64  # a round size
    model.lm.max_seq_len = max(model.lm.max_seq_len, seq_len)
    model.media_token_id, model.eoc_token_id = specials["media_token_id"], specials["eoc_token_id"]
    model.trainable_token_ids = (model.eoc_token_id, model.media_token_id)
  openflamingo = bool(arg.init) or arg.model.startswith("openflamingo")
  # Every processing option with a value is a field, so --config.data.own.X=... can set it.
  processing = {k: v for k, v in prepared.PROCESSING_DEFAULTS.items() if v is not None}
  config.data = dict(own=dict(
      processing, source="prepared", path=arg.path, kind=kind, tokenizer=arg.tokenizer,
      batch_size=arg.batch_size, weight=1.0, seq_len=seq_len,
      image_size=model.vision.image_size,
      # OpenFlamingo's labelling rules and CLIP preprocessing for its models; else the paper's.
      rules="openflamingo" if openflamingo else "paper",
      image_mode="clip" if openflamingo else "paper"))
  config.total_steps = arg.steps
  config.log_every = min(100, max(1, arg.steps // 10))
  config.checkpoint_every = min(1000, arg.steps)
  config.optimizer.warmup_steps = min(5000, arg.steps // 10)
  return config


def _model_config(name: str):
  """configs/NAME.py's config: its model (and trainable set); the rest is ours."""
  file = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  if not os.path.isfile(file):
    raise ConfigError(f"config argument model={name!r}: no configs/{name}.py")
  theirs, config = train_config.from_file(file), train_config.defaults()
  config.model, config.trainable = theirs.model, theirs.trainable
  return config


def _special_tokens(arg, metadata) -> dict:
  """The tokenizer's ids: the `tokenizer` argument's, else those prepare recorded."""
  if arg.tokenizer:
    from flamingo_jax.data import tokenizer as tokenizer_lib
    return dataclasses.asdict(tokenizer_lib.load_tokenizer(arg.tokenizer)[1])
  recorded = (metadata.get("tokenizer") or {}).get("special_tokens")
  if not recorded:
    raise ConfigError(f"config argument path: {arg.path} was prepared without --tokenizer; "
                      "add tokenizer=DIR (a Hugging Face tokenizer folder) to the argument")
  return recorded
