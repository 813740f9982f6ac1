"""TFDS catalog datasets: read in place by name (`tfds.data_source`, no TensorFlow), or
prepared (`prepare tfds`: data_source, or tfds.load for tfrecord when TensorFlow is there).

The test writes a tiny catalog-style dataset (an Image feature and COCO's caption layout,
`captions: Sequence({id, text})`) with a TFDS builder and reads it back by name, as a
config or the prepare command would.
"""
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_files import SMALL, caption, caption_ids, id_of_image_bytes, image_ids, jpeg
from flamingo_jax.config import ConfigError
from flamingo_jax.data import loader, prepare, prepared, sources


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
  """Images 0..5, each with two captions of its own id (COCO's layout); image 6 has only
  blank captions."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(6):
      yield i, {"image": jpeg(i), "captions": {"id": [2 * i, 2 * i + 1],
                                               "text": [caption(i), caption(i) + " again"]}}
    yield 6, {"image": jpeg(6), "captions": {"id": [12, 13], "text": ["", " "]}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  TinyCaptions(data_dir=d, file_format="array_record").download_and_prepare()
  return d


def config(data_dir, tokenizer_dir, **kw):
  return {**dict(source="tfds", name="tiny_captions", data_dir=data_dir, tokenizer=tokenizer_dir,
                 text_key="captions/text", batch_size=4, seq_len=16, **SMALL), **kw}


def test_reads_catalog_dataset_by_name_keeping_each_image_with_its_captions(
    data_dir, tokenizer_dir):
  from flamingo_jax.data.tokenizer import load_tokenizer
  tok, _ = load_tokenizer(tokenizer_dir)
  it = sources.build("coco", config(data_dir, tokenizer_dir), seed=0)
  seen, agains, skipped = set(), 0, 0
  for _ in range(7):  # 28 positions: 4 epochs of the 7 records
    b = next(it)
    assert b["images"].shape == (4, 1, 1, 16, 16, 3) and b["input_ids"].shape == (4, 16)
    ids = image_ids(b["images"][:, 0, 0])
    assert list(ids) == caption_ids(tokenizer_dir, b["input_ids"])
    seen.update(ids.tolist())
    agains += sum("again" in tok.decode(r.tolist()) for r in b["input_ids"])
    assert b["skipped"].shape == (4, len(loader.SKIP_REASONS))
    skipped += b["skipped"][:, loader.SKIP_REASONS.index("empty_text")].sum()
  assert seen == set(range(6))
  assert skipped >= 4  # the blank record, passed over once per epoch at least
  assert 0 < agains < 28  # one of the two captions, drawn per example
  # Deterministic and resumable like every source.
  resumed = sources.build("coco", config(data_dir, tokenizer_dir), seed=0)
  resumed.set_state(it.get_state())
  want, got = next(it), next(resumed)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_mistakes_name_the_field(data_dir, tokenizer_dir):
  with pytest.raises(ConfigError, match=r"no feature 'caption' .*\['captions', 'image'\]"):
    sources.build("coco", config(data_dir, tokenizer_dir, text_key="caption"), seed=0)
  with pytest.raises(ConfigError, match="never downloaded"):
    sources.build("coco", config(data_dir, tokenizer_dir, name="not_here"), seed=0)
  with pytest.raises(ConfigError, match="data.coco.tokenizer: not set"):
    sources.build("coco", config(data_dir, tokenizer_dir, tokenizer=None), seed=0)
  with pytest.raises(ConfigError, match="text_key is not set"):
    sources.build("coco", config(data_dir, tokenizer_dir, text_key=None), seed=0)


def test_prepare_tfds_keeps_every_caption_and_trains_on_one(tmp_path, capsys, data_dir,
                                                             tokenizer_dir):
  out = tmp_path / "out"
  assert prepare.main(["tfds", "--input", "tiny_captions:train", "--data-dir", data_dir,
                       "--text-key", "captions/text", "--output", str(out),
                       "--tokenizer", tokenizer_dir]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary == {"read": 7, "kept": 6, "skipped": {"empty_text": 1}}
  records = prepared.PreparedDataset(str(out), "tfds")
  for r in (records[i] for i in range(len(records))):
    i = id_of_image_bytes(r["image"])
    assert r["captions"] == [caption(i), caption(i) + " again"]
    assert r["id"].startswith("tfds:tiny_captions/train:")
  it = prepared.build_iterator(str(out), 6, seq_len=16, **SMALL)
  for _ in range(3):
    b = next(it)
    assert list(image_ids(b["images"][:, 0, 0])) == caption_ids(tokenizer_dir, b["input_ids"])


def test_prepare_tfds_reads_tfrecord_with_tfds_load(tmp_path, data_dir, tokenizer_dir):
  """Needs TensorFlow (not installed in CI): a tfrecord copy of the dataset, prepared via
  tfds.load, gives the same records as the array_record one via tfds.data_source."""
  pytest.importorskip("tensorflow")
  tf_dir = str(tmp_path / "tfrecord")
  TinyCaptions(data_dir=tf_dir, file_format="tfrecord").download_and_prepare()
  assert tfds.builder("tiny_captions", data_dir=tf_dir).info.file_format.value == "tfrecord"
  got = {}
  for d in (data_dir, tf_dir):
    summary = prepare.prepare("tfds", "tiny_captions", str(tmp_path / "out" / d[-8:]),
                              data_dir=d, text_key="captions/text")
    assert summary["kept"] == 6 and summary["skipped"] == {"empty_text": 1}
    records = prepared.PreparedDataset(summary["path"], "tfds")
    got[d] = sorted((id_of_image_bytes(r["image"]), tuple(r["captions"]))
                    for r in (records[i] for i in range(len(records))))
  assert got[data_dir] == got[tf_dir] == [(i, (caption(i), caption(i) + " again"))
                                          for i in range(6)]
