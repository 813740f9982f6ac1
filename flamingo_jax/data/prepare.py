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

Bad records are skipped (or, with --strict, the first one is an error naming the file
and record). Every skipped record is listed in DIR/flamingo_KIND/skipped.jsonl, one JSON
object a line: {"id", "file", "line" (jsonl / csv) or "member" (a tar shard's key),
"reason", "detail"}; an image dropped from an MMC4 document that is kept is listed there
too, with its "image" index. A progress bar on stderr shows records read per second, kept
and skipped. The last line printed is one JSON object, also written to
DIR/summary_KIND.json:

    {"read": n, "kept": k, "skipped": {"reason": count, ...}[, "dropped_images": {...}]}

where `skipped` counts records, so kept + the sum of skipped = read, and (mmc4)
`dropped_images` counts the images dropped inside kept documents, by reason.

Relative image names (mmc4, pairs) are looked up in --images-dir, or without it beside
the jsonl / csv and then in an `images/` folder next to it.

Paths go through etils epath (as TFDS's and orbax's do), so --output, --input and
--images-dir may be buckets (`gs://...`; with gcsfs installed: `pip install -e ".[gcs]"`),
except video files, which PyAV reads from local disk.

Exit status: 0 ok; 1 a data problem (--strict's first bad record, or a run that keeps
nothing: the summary, then one line saying why); 2 a command-line or input mistake (a
missing input, an existing output without --overwrite, a bad value): one line naming the
flag, before anything is written. --traceback shows the traceback instead.
"""
import argparse
import itertools
import json
import os
import sys

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from flamingo_jax import cli
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

  # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded
  # and prepared to ..." on stdout: nothing is downloaded here, and prepare() says itself
  # what it wrote.
  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for record in self._records:
      yield record["id"], record  # the record id is unique: file:line or tarfile:key


def _builder_class(kind):
  return type(f"Flamingo{kind.capitalize()}", (_RawSourceBuilder,),
              {"KIND": kind, "name": f"flamingo_{kind}"}, skip_registration=True)


BUILDERS = {kind: _builder_class(kind) for kind in FEATURES}
# The files --input names or holds, per kind (tfds: a catalog name, not a file).
INPUT_EXTS = {"mmc4": ("jsonl", "json"), "webdataset": ("tar",),
              "pairs": ("jsonl", "json", "csv"), "video": ("jsonl", "json", "csv")}


class PrepareError(ValueError):
  """A command-line or input mistake, found before anything is written; names the flag."""


class NothingKept(ValueError):
  """Every record read was skipped (or there were none); `summary` as for a kept run."""

  def __init__(self, message: str, summary: dict):
    super().__init__(message)
    self.summary = summary


def tokenizer_metadata(path: str) -> dict:
  """The tokenizer's path and its special-token ids (as `tokenizer.load_tokenizer`, which
  adds <image>, <|endofchunk|> and a pad token when missing, gives them)."""
  import dataclasses
  from flamingo_jax.data import tokenizer as tokenizer_lib
  _, specials = tokenizer_lib.load_tokenizer(path)
  return {"path": os.path.abspath(path), "special_tokens": dataclasses.asdict(specials)}


def check_arguments(kind: str, inputs, output: str, *, tokenizer: str | None = None,
                    overwrite: bool = False, num_workers: int = 0, **reader_options) -> None:
  """Raises PrepareError naming the flag for a mistake prepare() would otherwise meet
  only after creating folders (or deep inside TFDS)."""
  if kind not in BUILDERS:
    raise PrepareError(f"KIND: {kind!r} is not one of {', '.join(sorted(BUILDERS))}")
  if kind in INPUT_EXTS:
    try:
      raw.expand_inputs(inputs, INPUT_EXTS[kind])
    except FileNotFoundError as e:
      message = str(e).removeprefix("input ")
      raise PrepareError(f"--input: {message}; give existing files, folders or globs of "
                         f"{' / '.join(INPUT_EXTS[kind])} files") from None
  for name, flag in (("images_dir", "--images-dir"), ("videos_dir", "--images-dir")):
    d = reader_options.get(name)
    if d and not epath.Path(d).is_dir():
      raise PrepareError(f"{flag}: {d!r} is not a folder; give the folder that relative "
                         "image paths start from, or leave it out")
  if tokenizer and not os.path.exists(tokenizer):
    raise PrepareError(f"--tokenizer: {tokenizer!r} does not exist; give a Hugging Face "
                       "tokenizer folder, or leave it out")
  for name, flag, low in (("max_image_size", "--max-image-size", 0), ("num_frames", "--num-frames", 1)):
    v = reader_options.get(name)
    if v is not None and (not isinstance(v, int) or v < low):
      raise PrepareError(f"{flag}: {v!r} must be an integer >= {low}")
  if not isinstance(num_workers, int) or num_workers < 0:
    raise PrepareError(f"--num-workers: {num_workers!r} must be an integer >= 0 (0: this process)")
  if reader_options.get("fps") is not None and not reader_options["fps"] > 0:
    raise PrepareError(f"--fps: {reader_options['fps']!r} must be > 0")
  out = epath.Path(output)
  if out.exists() and not out.is_dir():
    raise PrepareError(f"--output: {output!r} is a file; give a folder")
  data_dir = out / f"flamingo_{kind}" / VERSION
  if data_dir.exists() and not overwrite:
    raise PrepareError(f"--output: {data_dir} exists; pass --overwrite to replace it, or "
                       "choose another --output")


def prepare(kind: str, inputs, output: str, *, tokenizer: str | None = None,
            strict: bool = False, overwrite: bool = False, num_workers: int = 0,
            progress: bool = False, **reader_options) -> dict:
  """Writes the dataset; returns the summary (module docstring) plus "path" (the dataset
  folder) and "skipped_list" (skipped.jsonl). `num_workers` processes make the records
  (the same dataset, summary and strict error as one process); `progress` shows a bar on
  stderr. Raises PrepareError before writing anything for a bad argument or a missing
  input, raw.RawDataError (strict) for the first bad record and NothingKept when every
  record was skipped; a failed run leaves no dataset, temporary or download folder."""
  check_arguments(kind, inputs, output, tokenizer=tokenizer, overwrite=overwrite,
                  num_workers=num_workers, **reader_options)
  metadata = {"source": str(inputs), "reader_options": reader_options}
  if tokenizer:
    try:
      metadata["tokenizer"] = tokenizer_metadata(tokenizer)
    except (OSError, ValueError) as e:
      raise PrepareError(f"--tokenizer: {tokenizer!r} could not be loaded: "
                         f"{' '.join(str(e).split())}") from None
  root = epath.Path(output) / f"flamingo_{kind}"
  data_dir = root / VERSION
  created = [d for d in (epath.Path(output), root) if not d.exists()]  # removed if the run fails
  root.mkdir(parents=True, exist_ok=True)
  if data_dir.exists():  # --overwrite (checked above)
    data_dir.rmtree()
  skipped_path = root / "skipped.jsonl"
  log = skipped_path.open("w")
  skips = raw.Skips(strict=strict, log=log)
  kept = 0

  from tqdm import tqdm
  bar = tqdm(desc=f"prepare {kind}", unit=" records", file=sys.stderr, disable=not progress,
             bar_format="{desc}: {n_fmt} records read [{elapsed}, {rate_noinv_fmt}{postfix}]")

  def show():
    bar.update(kept + skips.records - bar.n)
    bar.set_postfix(kept=kept, skipped=skips.records, refresh=False)

  def counted(stream):
    nonlocal kept
    for r in stream:
      kept += 1
      show()
      yield r

  def summary():
    out = {"read": kept + skips.records, "kept": kept, "skipped": skips.as_dict()}
    if kind == "mmc4":
      out["dropped_images"] = skips.images_as_dict()
    return out

  ok = False
  try:
    read = raw.READERS.get(kind) or readers()[kind]  # (tfds_source imports take seconds)
    stream = counted(read(inputs, skip=skips, num_workers=num_workers, **reader_options))
    first = next(stream, None)  # before TFDS: it cannot write an empty split
    if first is None:
      show()
      result = summary()
      log.flush()
      _write_summary(output, kind, result)
      if result["read"] == 0:
        reason = f"nothing kept: no records in {inputs} (empty files?)"
      else:
        top = ", ".join(f"{n} {r}" for r, n in sorted(result["skipped"].items(), key=lambda x: -x[1]))
        reason = (f"nothing kept: all {result['read']} records read were skipped ({top}); "
                  f"each is listed in {skipped_path}")
      ok = True  # the summary and the list are the result: keep them
      raise NothingKept(reason, result)
    builder = BUILDERS[kind](records=itertools.chain([first], stream), metadata=metadata,
                             data_dir=output)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD))
    show()
    ok = True
  finally:
    bar.close()
    log.close()
    _remove_temporaries(output, root)
    if not ok:  # a failed (e.g. strict) run leaves nothing behind
      data_dir.rmtree(missing_ok=True)
      skipped_path.unlink(missing_ok=True)
      for d in reversed(created):
        if d.is_dir() and not list(d.iterdir()):
          d.rmdir()
  result = summary()
  _write_summary(output, kind, result)
  return dict(result, path=os.fspath(data_dir), skipped_list=os.fspath(skipped_path))


def _write_summary(output: str, kind: str, summary: dict) -> None:
  (epath.Path(output) / f"summary_{kind}.json").write_text(json.dumps(summary))


def _remove_temporaries(output: str, root: epath.Path) -> None:
  """TFDS's `incomplete.*` folders (a run that failed midway) and its downloads folder."""
  if root.is_dir():
    for d in root.iterdir():
      if d.name.startswith("incomplete."):
        d.rmtree(missing_ok=True)
  (epath.Path(output) / "downloads").rmtree(missing_ok=True)


def main(argv=None) -> int:
  p = cli.Parser(prog="python -m flamingo_jax.data.prepare", description=__doc__,
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
                                      "paths; default: the folder of each input file, then "
                                      "(mmc4, pairs) its images/ subfolder")
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
  p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
  p.add_argument("--traceback", action="store_true", help="show the traceback of an error")
  try:
    a = p.parse_args(argv)
  except cli.UsageError as e:
    print(f"prepare: error: {e}", file=sys.stderr)
    return 2
  except SystemExit as e:  # --help
    return int(e.code or 0)
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
                      num_workers=a.num_workers, progress=not a.no_progress, **opts)
  except raw.RawDataError as e:
    if a.traceback:
      raise
    print(f"prepare: error (strict): {e}", file=sys.stderr)
    return 1
  except NothingKept as e:
    if a.traceback:
      raise
    print(json.dumps(e.summary), flush=True)
    print(f"prepare: error: {e}", file=sys.stderr)
    return 1
  except (ValueError, OSError) as e:  # PrepareError names the flag; the readers' name the file
    if a.traceback:
      raise
    print(f"prepare: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(f"prepared {summary['path']}; skipped records listed in {summary['skipped_list']}",
        file=sys.stderr)
  print(json.dumps({k: v for k, v in summary.items() if k not in ("path", "skipped_list")}),
        flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
