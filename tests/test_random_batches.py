"""The `random` source: batches of any shape from the config alone, and
sources.batch_shapes, which train_compile.py compiles for, equal to the batches made."""
import numpy as np
import pytest

from config_files import load_config
from flamingo_jax.config import ConfigError, FlamingoConfig
from flamingo_jax.data import sources


def paper_model():
  return FlamingoConfig.from_dict(load_config("flamingo_3b").model)


@pytest.mark.parametrize("name", ["m3w", "align", "ltip", "vtp"])
def test_paper_shapes_and_shapes_from_the_config(name):
  config, model = load_config("flamingo_3b"), paper_model()
  d = config.data[name]
  d.batch_size = 2
  d.image_size = 16  # the paper's 320 px, scaled down for the test's memory
  batch = sources.build(name, d, seed=0, model_config=model).batch_at(0)
  shapes = sources.batch_shapes(name, d, model)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == shapes
  m = {"m3w": 5}.get(name, 1)
  f = {"vtp": 8}.get(name, 1)
  t = {"m3w": 256, "align": 32, "ltip": 64, "vtp": 32}[name]
  assert batch["images"].shape == (2, m, f, 16, 16, 3) and batch["input_ids"].shape == (2, t)
  ids, mi = batch["input_ids"], batch["media_index"]
  # Each chunk starts with `<image>` and the media index points at the latest one.
  starts = np.flatnonzero(ids[0] == model.media_token_id)
  assert len(starts) >= m and starts[0] == 0
  for j in range(m):
    assert mi[0, starts[j]] == j
  assert (np.diff(mi[0]) >= 0).all() and mi.max() == m - 1
  assert (batch["loss_mask"][batch["targets"] == model.media_token_id] == 0).all()
  assert ids.max() < model.lm.vocab_size and batch["attention_mask"].all()
  assert np.abs(batch["images"]).max() <= 1


def test_deterministic_and_resumable():
  model = paper_model()
  d = dict(source="random", batch_size=4, seq_len=16, max_images=2, image_size=8)
  a = sources.build("x", d, seed=3, model_config=model)
  b = sources.build("x", d, seed=3, model_config=model)
  b.set_state({"next_index": 4})
  first, second = next(a), next(a)
  np.testing.assert_array_equal(second["input_ids"], next(b)["input_ids"])
  assert not np.array_equal(first["input_ids"], second["input_ids"])
  a.close(), b.close()


def test_synthetic_and_prepared_shapes_from_the_config():
  config = load_config("tiny")
  model = FlamingoConfig.from_dict(config.model)
  batch = sources.build("synthetic", config.data.synthetic, seed=0).batch_at(0)
  assert sources.batch_shapes("synthetic", config.data.synthetic, model) == {
      k: (v.shape, v.dtype) for k, v in batch.items()}
  # Prepared data: the shapes follow from the kind and the processing options.
  paper = load_config("flamingo_3b", "prepared")
  m3w = sources.batch_shapes("m3w", paper.data.m3w, paper_model())
  assert m3w["images"] == ((256, 5, 1, 320, 320, 3), np.float32)
  assert m3w["input_ids"] == ((256, 256), np.int32) and m3w["skipped"][0] == (256, 7)
  assert sources.batch_shapes("vtp", paper.data.vtp, paper_model())["images"][0] == (64, 1, 8, 320, 320, 3)
  with pytest.raises(ConfigError, match="data.align.kind"):
    sources.batch_shapes("align", paper.data.align, paper_model())


@pytest.mark.parametrize("change,field", [
    (dict(max_images=0), "data.x.max_images"),
    (dict(seq_len=4096), "data.x.seq_len"),
    (dict(seq_len=3, max_images=2), "data.x.seq_len"),
    (dict(frames=2), "unknown keys"),
])
def test_bad_shapes_name_the_field(change, field):
  d = {**dict(source="random", batch_size=4, seq_len=16), **change}
  with pytest.raises(ConfigError, match=field):
    sources.build("x", d, seed=0, model_config=paper_model())
  with pytest.raises(ConfigError, match=field):
    sources.batch_shapes("x", d, paper_model())
