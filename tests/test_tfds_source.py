"""TFDS catalog datasets as a training source: `tfds.data_source` by name, no TensorFlow.

The test writes a tiny catalog-style dataset (an Image feature and COCO's caption layout,
`captions: Sequence({id, text})`) with a TFDS builder, in the array_record format, and
reads it back by name through sources.build, as a config would.
"""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_files import SMALL, caption, caption_ids, image_ids, jpeg
from flamingo_jax.config import ConfigError
from flamingo_jax.data import loader, sources


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
  """Images 0..5, each with two captions of its own id (COCO's layout)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(6)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": jpeg(i), "captions": {"id": [2 * i, 2 * i + 1],
                                               "text": [caption(i), caption(i) + " again"]}}


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
  seen, agains = set(), 0
  for _ in range(6):  # 24 positions: 4 epochs of the 6 images
    b = next(it)
    assert b["images"].shape == (4, 1, 1, 16, 16, 3) and b["input_ids"].shape == (4, 16)
    ids = image_ids(b["images"][:, 0, 0])
    assert list(ids) == caption_ids(tokenizer_dir, b["input_ids"])
    seen.update(ids.tolist())
    agains += sum("again" in tok.decode(r.tolist()) for r in b["input_ids"])
    assert not b["skipped"].any() and b["skipped"].shape == (4, len(loader.SKIP_REASONS))
  assert seen == set(range(6))
  assert 0 < agains < 24  # one of the two captions, drawn per example
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
