"""Convert raw training sources into TFDS array_record datasets.

    python -m flamingo_jax.data.prepare KIND --input PATH --output DIR [--tokenizer DIR] [--strict]
        [--num-workers N]

KIND: mmc4, webdataset, pairs, video (see `raw.py` for each input layout), and tfds (a
TFDS catalog split already in `--data-dir`, `--input NAME[:SPLIT]`: tfds_source.py). The dataset
is written to DIR/flamingo_KIND/1.0.0 (array_record shards + TFDS metadata) and read back
by `prepared.py` with `tfds.builder_from_directory(...).as_data_source(...)`: neither
step needs TensorFlow (the features used — Text, Tensor, Sequence — encode and decode
with numpy).

Stored per record: encoded image bytes (decoded once here to validate, converted to RGB
and re-encoded as JPEG or PNG; never pixels), the text, and the structure (for mmc4: the
sentences, each image's sentence index and similarity, and the image × sentence
similarity matrix when the source has one). Tokenisation is left to training, and
`--tokenizer` only records the tokenizer's path and special-token ids in the dataset's
metadata: sequence length, prompt format and truncation then stay training options, the
stored text stays readable, and training checks that it loads the tokenizer the dataset
was prepared for.

Bad records are skipped and counted by reason (or, with --strict, the first one raises an
error naming the file and record). The last line printed is one JSON object:
`{"kept": n, "skipped": {"reason": count, ...}}`; it is also written to DIR/summary_KIND.json.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import tensorflow_datasets as tfds

from flamingo_jax.data import raw

VERSION = "1.0.0"
_BYTES = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)  # noqa: E731

FEATURES = {
    "mmc4": lambda: tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "sentences": tfds.features.Sequence(tfds.features.Text()),
        "images": tfds.features.Sequence(_BYTES()),
        "image_sentence": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "image_sim": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        "similarity": tfds.features.Tensor(shape=(None,), dtype=np.float32),
    }),
    "webdataset": lambda: tfds.features.FeaturesDict({
        "id": tfds.features.Text(), "image": _BYTES(), "caption": tfds.features.Text()}),
    "pairs": lambda: tfds.features.FeaturesDict({
        "id": tfds.features.Text(), "image": _BYTES(), "caption": tfds.features.Text()}),
    "video": lambda: tfds.features.FeaturesDict({
        "id": tfds.features.Text(), "frames": tfds.features.Sequence(_BYTES()),
        "caption": tfds.features.Text()}),
    # A TFDS catalog split (tfds_source.read_tfds): every caption of an image is kept,
    # and training draws one per example.
    "tfds": lambda: tfds.features.FeaturesDict({
        "id": tfds.features.Text(), "image": _BYTES(),
        "captions": tfds.features.Sequence(tfds.features.Text())}),
}


def readers() -> dict:
  from flamingo_jax.data import tfds_source
  return dict(raw.READERS, tfds=tfds_source.read_tfds)


class _RawSourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder over an iterator of raw records (one 'train' split).

  `tfds.core.DatasetInfo(builder=self, ...)` rather than `dataset_info_from_configs`,
  which looks for metadata files beside the class's module."""
  VERSION = tfds.core.Version(VERSION)
  KIND = ""

  def __init__(self, *, records=None, metadata=None, **kwargs):
    self._records, self._metadata = records, dict(metadata or {})
    super().__init__(file_format="array_record", **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=f"flamingo_jax prepared {self.KIND} dataset",
        features=FEATURES[self.KIND](),
        metadata=tfds.core.MetadataDict(kind=self.KIND, **self._metadata))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for record in self._records:
      yield record["id"], record  # the record id is unique: file:line or tarfile:key


def _builder_class(kind):
  return type(f"Flamingo{kind.capitalize()}", (_RawSourceBuilder,),
              {"KIND": kind, "name": f"flamingo_{kind}"}, skip_registration=True)


BUILDERS = {kind: _builder_class(kind) for kind in FEATURES}


def tokenizer_metadata(path: str) -> dict:
  """The tokenizer's path and its special-token ids (as `tokenizer.load_tokenizer`, which
  adds <image>, <|endofchunk|> and a pad token when missing, gives them)."""
  import dataclasses
  from flamingo_jax.data import tokenizer as tokenizer_lib
  _, specials = tokenizer_lib.load_tokenizer(path)
  return {"path": os.path.abspath(path), "special_tokens": dataclasses.asdict(specials)}


def prepare(kind: str, inputs, output: str, *, tokenizer: str | None = None,
            strict: bool = False, overwrite: bool = False, num_workers: int = 0,
            **reader_options) -> dict:
  """Writes the dataset; returns {"kept", "skipped", "path"}. `num_workers` processes
  make the records (the same dataset, summary and strict error as one process)."""
  if kind not in BUILDERS:
    raise ValueError(f"unknown kind {kind!r}; one of {sorted(BUILDERS)}")
  skips = raw.Skips(strict=strict)
  kept = [0]

  def records():
    for r in readers()[kind](inputs, skip=skips, num_workers=num_workers, **reader_options):
      kept[0] += 1
      yield r

  metadata = {"source": str(inputs), "reader_options": reader_options}
  if tokenizer:
    metadata["tokenizer"] = tokenizer_metadata(tokenizer)
  builder = BUILDERS[kind](records=records(), metadata=metadata, data_dir=output)
  if os.path.exists(builder.data_dir):
    if not overwrite:
      raise FileExistsError(f"{builder.data_dir} exists; pass --overwrite to replace it")
    shutil.rmtree(builder.data_dir)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD))
  finally:  # a failed (e.g. strict) run leaves no half-written dataset behind
    parent = os.path.dirname(builder.data_dir)
    if os.path.isdir(parent):
      for d in os.listdir(parent):
        if d.startswith("incomplete."):
          shutil.rmtree(os.path.join(parent, d), ignore_errors=True)
    shutil.rmtree(os.path.join(output, "downloads"), ignore_errors=True)
  if kept[0] == 0:
    raise ValueError(f"no usable record in {inputs}; skipped: {skips.as_dict()}")
  summary = {"kept": kept[0], "skipped": skips.as_dict()}
  with open(os.path.join(output, f"summary_{kind}.json"), "w") as f:
    json.dump(summary, f)
  return dict(summary, path=str(builder.data_dir))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m flamingo_jax.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("kind", choices=sorted(BUILDERS))
  p.add_argument("--input", required=True, nargs="+",
                 help="file(s), folder(s) or glob(s): jsonl shards (mmc4), tar shards "
                      "(webdataset), jsonl/csv tables (pairs, video); NAME[:SPLIT] (tfds)")
  p.add_argument("--output", required=True, help="data dir; the dataset goes in OUTPUT/flamingo_KIND/")
  p.add_argument("--tokenizer", help="tokenizer dir to record in the dataset metadata")
  p.add_argument("--strict", action="store_true", help="stop at the first bad record")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--num-workers", type=int, default=0,
                 help="processes decoding and re-encoding images (0: this one)")
  p.add_argument("--images-dir", help="(mmc4, pairs, video) base of relative image/video "
                                      "paths; default: the folder of each input file")
  p.add_argument("--max-image-size", type=int, default=0,
                 help="shrink images so the longer side is at most this (0: keep)")
  p.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg")
  p.add_argument("--sim-threshold", type=float, default=0.24,
                 help="(mmc4) place an image only when its similarity is at least this")
  p.add_argument("--no-one-to-one", action="store_true",
                 help="(mmc4) each image to its best sentence, not a one-to-one matching")
  p.add_argument("--num-frames", type=int, default=8, help="(video) frames per clip")
  p.add_argument("--data-dir", help="(tfds) the TFDS data_dir holding the dataset")
  p.add_argument("--image-key", help="(tfds) image feature, e.g. image")
  p.add_argument("--text-key", help="(tfds) caption feature, e.g. captions/text")
  p.add_argument("--fps", type=float, default=1.0, help="(video) sampling rate")
  a = p.parse_args(argv)
  opts = {"max_image_size": a.max_image_size, "image_format": a.image_format}
  if a.kind in ("mmc4", "pairs") and a.images_dir:
    opts["images_dir"] = a.images_dir
  if a.kind == "mmc4":
    opts.update(sim_threshold=a.sim_threshold, one_to_one=not a.no_one_to_one)
  if a.kind == "tfds":
    opts.update(data_dir=a.data_dir, image_key=a.image_key, text_key=a.text_key)
  if a.kind == "video":
    opts.update(num_frames=a.num_frames, fps=a.fps)
    if a.images_dir:
      opts["videos_dir"] = a.images_dir
  tfds.disable_progress_bar()
  try:
    summary = prepare(a.kind, a.input if len(a.input) > 1 else a.input[0], a.output,
                      tokenizer=a.tokenizer, strict=a.strict, overwrite=a.overwrite,
                      num_workers=a.num_workers, **opts)
  except raw.RawDataError as e:
    print(f"error (strict): {e}", file=sys.stderr)
    return 1
  print(f"prepared {summary['path']}", file=sys.stderr)
  print(json.dumps({"kept": summary["kept"], "skipped": summary["skipped"]}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
