"""Captioning tasks read from their official files: COCO and Flickr30K on the Karpathy
splits, and COCO from a prepared TFDS `coco_captions`.

Splits, as OpenFlamingo evaluates (open_flamingo/eval/eval_datasets.py CaptionDataset):
demonstrations come from Karpathy 'train' only, scores from Karpathy 'test' (5000 COCO
images, 1000 Flickr30K). 'restval' (30504 COCO val2014 images Karpathy added to training)
is left out although captioning models usually train on it: the train pool must be theirs
for a seeded query set of 2048 to be theirs, and 82783 images are plenty to draw from.

Targets are every reference caption; targets[0] is sentences[0], the one a demonstration
shows (as theirs). COCO's CIDEr references are the official `captions_val2014.json`
captions when the file is there (what open_flamingo's coco_metric scores against), else
the Karpathy sentences (the same captions, lightly normalised); `TaskData.files`
says which. Flickr30K's are its Karpathy sentences (their coco-style references file is a
conversion of those).

Ids: COCO's `cocoid` (the COCO image id); Flickr30K's the file name stem ("1000092795"),
as open_flamingo keys them.

Images are never decoded here: a folder that is missing fails at load, a missing image
file when that example's image is loaded (TaskDataError naming the path).
"""
import dataclasses
import os
import re

import numpy as np

from flamingo_jax.evaluation.tasks.base import (EncodedImage, Example, ImageFile, Preprocess,
                                                 TaskData, TaskDataError, field, first_file,
                                                 read_json, require_dir, require_file)

TRAIN, TEST = "train", "test"  # Karpathy split names (restval, val unused: see above)
COCO_FOLDERS = ("train2014", "val2014")
COCO_REFERENCES = ("annotations/captions_val2014.json", "captions_val2014.json")
FLICKR_FOLDERS = ("flickr30k-images", "flickr30k_images")  # official archive; Kaggle copy

COCO_LAYOUT = ("dataset_coco.json (Karpathy splits), train2014/ and val2014/ (the COCO 2014 "
               "images), optionally annotations/captions_val2014.json (the official COCO "
               "captions: the CIDEr references)")
FLICKR_LAYOUT = "dataset_flickr30k.json (Karpathy splits) and flickr30k-images/ (the images)"
COCO_TFDS_NAME, COCO_TFDS_CONFIG = "coco_captions", "2014"
COCO_TFDS_LAYOUT = ("a TFDS data dir holding coco_captions/2014/<version>/ prepared in the "
                    "array_record format (tfds build coco_captions --file_format=array_record)")


def load_coco(root: str) -> TaskData:
  """COCO captions from `root` (COCO_LAYOUT)."""
  path = require_file(os.path.join(root, "dataset_coco.json"), "the Karpathy split file",
                      COCO_LAYOUT)
  rows = _karpathy_rows(path, COCO_LAYOUT, coco=True)
  folders = {}
  for name in sorted({r["folder"] for r in rows}):
    folders[name] = require_dir(os.path.join(root, name), f"the COCO {name} images",
                                COCO_LAYOUT)
  references_path, references = _official_references(root, rows)
  split = {TRAIN: [], TEST: []}
  for r in rows:
    targets = references[r["id"]] if references and r["split"] == TEST else r["captions"]
    image = ImageFile(os.path.join(folders[r["folder"]], r["filename"]))
    split[r["split"]].append(Example(r["id"], image, targets))
  return TaskData(train=split[TRAIN], test=split[TEST],
                  files={"karpathy": path, **folders,
                         "references": references_path or f"{path} sentences"})


def load_flickr30k(root: str) -> TaskData:
  """Flickr30K captions from `root` (FLICKR_LAYOUT)."""
  path = require_file(os.path.join(root, "dataset_flickr30k.json"), "the Karpathy split file",
                      FLICKR_LAYOUT)
  rows = _karpathy_rows(path, FLICKR_LAYOUT, coco=False)
  images = next((os.path.join(root, f) for f in FLICKR_FOLDERS
                 if os.path.isdir(os.path.join(root, f))), None)
  if images is None:
    raise TaskDataError(f"{os.path.join(root, FLICKR_FOLDERS[0])}: missing (the Flickr30K "
                        f"images; {FLICKR_FOLDERS[1]}/ is read too); expected {FLICKR_LAYOUT}")
  split = {TRAIN: [], TEST: []}
  for r in rows:
    split[r["split"]].append(Example(r["id"], ImageFile(os.path.join(images, r["filename"])),
                                     r["captions"]))
  return TaskData(train=split[TRAIN], test=split[TEST],
                  files={"karpathy": path, "images": images,
                         "references": f"{path} sentences"})


def _karpathy_rows(path: str, layout: str, *, coco: bool) -> list[dict]:
  """The train and test entries of a Karpathy file, checked, in file order."""
  images = field(read_json(path, layout), "images", list, path, layout)
  rows = []
  for i, record in enumerate(images):
    where = f"{path}: images[{i}]"
    split = field(record, "split", str, where, layout)
    if split not in (TRAIN, TEST):
      continue
    filename = field(record, "filename", str, where, layout)
    sentences = field(record, "sentences", list, where, layout)
    captions = tuple(field(s, "raw", str, f"{where}.sentences[{j}]", layout)
                     for j, s in enumerate(sentences))
    if not captions:
      raise TaskDataError(f"{where}: field 'sentences' is empty; expected {layout}")
    row = {"split": split, "filename": filename, "captions": captions}
    if coco:
      row["folder"] = field(record, "filepath", str, where, layout)
      if row["folder"] not in COCO_FOLDERS:
        raise TaskDataError(f"{where}: field 'filepath' is {row['folder']!r}, expected one of "
                            f"{COCO_FOLDERS}; expected {layout}")
      row["id"] = field(record, "cocoid", int, where, layout)
    else:
      row["id"] = os.path.splitext(filename)[0]
    rows.append(row)
  return rows


def _official_references(root: str, rows: list[dict]):
  """(path, {cocoid: captions}) from captions_val2014.json, checked to cover every test
  image; (None, None) when the file is not there."""
  try:
    path = first_file(root, COCO_REFERENCES, "the official captions", COCO_LAYOUT)
  except TaskDataError:
    return None, None
  annotations = field(read_json(path, COCO_LAYOUT), "annotations", list, path, COCO_LAYOUT)
  captions = {}
  for i, a in enumerate(annotations):
    where = f"{path}: annotations[{i}]"
    image_id = field(a, "image_id", int, where, COCO_LAYOUT)
    captions.setdefault(image_id, []).append(field(a, "caption", str, where, COCO_LAYOUT))
  for r in rows:
    if r["split"] == TEST and r["id"] not in captions:
      raise TaskDataError(f"{path}: no caption with image_id {r['id']} (Karpathy test image "
                          f"{r['filename']}); expected {COCO_LAYOUT}")
  return path, {k: tuple(v) for k, v in captions.items()}


# ---------------------------------------------------------------------------------------
# COCO from TFDS. tfds.data_source on the name would build the catalog's CocoCaptions
# class, whose features need TensorFlow; the prepared folder itself (dataset_info.json,
# features.json, array_record shards) is read without it, by tfds.builder_from_directory.

@dataclasses.dataclass(frozen=True)
class TfdsImage:
  """Record `index` of an open TFDS data source; its encoded image is read when loaded
  (holding every image's bytes in memory would cost ~13 GB for COCO train)."""
  source: object = dataclasses.field(repr=False, compare=False)
  index: int
  where: str = ""

  def load(self, preprocess: Preprocess) -> np.ndarray:
    data = self.source[self.index]["image"]
    if not isinstance(data, bytes):
      raise TaskDataError(f"{self.where}: feature 'image' is {type(data).__name__}, expected "
                          f"encoded bytes; expected {COCO_TFDS_LAYOUT}")
    return EncodedImage(data, self.where).load(preprocess)


def load_coco_tfds(data_dir: str, name: str = COCO_TFDS_NAME,
                   config: str = COCO_TFDS_CONFIG) -> TaskData:
  """COCO captions from a TFDS data dir (COCO_TFDS_LAYOUT): Karpathy train / test, ids the
  COCO image id ('image/id'), targets its Karpathy captions ('captions/text')."""
  folder = _tfds_version_folder(data_dir, name, config)
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder_from_directory(folder)
  except Exception as e:  # a broken dataset_info.json / features.json
    raise TaskDataError(f"{folder}: not a readable TFDS dataset ({type(e).__name__}: {e}); "
                        f"expected {COCO_TFDS_LAYOUT}") from e
  file_format = builder.info.file_format
  if file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise TaskDataError(
        f"{folder}: stored as {getattr(file_format, 'value', file_format)}; random access "
        "(tfds.data_source) needs array_record: rebuild it with `tfds build coco_captions "
        f"--file_format=array_record --data_dir {data_dir}`, or use the 'coco' task on the "
        f"official files; expected {COCO_TFDS_LAYOUT}")
  splits = {}
  for split in (TRAIN, TEST):
    if split not in builder.info.splits:
      raise TaskDataError(f"{folder}: no split {split!r} (has {sorted(builder.info.splits)}); "
                          f"expected {COCO_TFDS_LAYOUT}")
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    splits[split] = _tfds_examples(source, f"{folder} {split}")
  return TaskData(train=splits[TRAIN], test=splits[TEST],
                  files={"tfds": folder, "references": f"{folder} captions/text"})


def _tfds_version_folder(data_dir: str, name: str, config: str) -> str:
  """data_dir/name/config/<the newest version prepared>."""
  root = require_dir(os.path.join(data_dir, name, config), f"TFDS {name}/{config}",
                     COCO_TFDS_LAYOUT)
  versions = [v for v in os.listdir(root) if re.fullmatch(r"\d+\.\d+\.\d+", v)
              and os.path.isfile(os.path.join(root, v, "dataset_info.json"))]
  if not versions:
    raise TaskDataError(f"{root}: no prepared version (<version>/dataset_info.json); "
                        f"expected {COCO_TFDS_LAYOUT}")
  return os.path.join(root, max(versions, key=lambda v: tuple(map(int, v.split(".")))))


def _tfds_examples(source, where: str) -> list[Example]:
  examples = []
  chunk = 256  # batched reads: each record is read whole (image bytes included)
  for start in range(0, len(source), chunk):
    indices = list(range(start, min(start + chunk, len(source))))
    for i, record in zip(indices, source.__getitems__(indices)):
      at = f"{where}[{i}]"
      image_id = field(record, "image/id", (int, np.integer), at, COCO_TFDS_LAYOUT)
      texts = field(field(record, "captions", dict, at, COCO_TFDS_LAYOUT), "text",
                    (list, tuple, np.ndarray), f"{at}: captions", COCO_TFDS_LAYOUT)
      captions = tuple(t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts)
      if not captions:
        raise TaskDataError(f"{at}: feature 'captions/text' is empty; expected "
                            f"{COCO_TFDS_LAYOUT}")
      examples.append(Example(int(image_id), TfdsImage(source, i, at), captions))
  return examples
