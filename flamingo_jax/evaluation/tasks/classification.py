"""Closed-ended tasks read from their official files: HatefulMemes and ImageNet.

Each example's target is its class name; `TaskData.class_names` are the candidates the
runner ranks, in class-index order.

HatefulMemes: demonstrations from train.jsonl, scores on dev_seen.jsonl (dev.jsonl, its
phase-1 name, when that is what the folder has). That is the split OpenFlamingo reports
(their eval script passes hateful_memes/dev.json); test_seen.jsonl is not read, so a
folder that has it scores the same split as one that does not. Classes ("no", "yes"):
label 1 is "yes"; `text` is the meme's OCR text; ids are the meme ids.

ImageNet: demonstrations from train/, scores on val/, both as class folders
(`<wnid>/*.JPEG`, the layout torchvision's ImageFolder reads; the official val archive
is flat and must be sorted into folders first). Class k is the k-th wnid in sorted order;
its name comes from `classnames.txt` (one name per line, in sorted-wnid order) or, when
that is absent, from the official LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca":
the first name, "tench"). open_flamingo ranks CLIP's curated names (IMAGENET_CLASSNAMES in
open_flamingo/eval/classification_utils.py): writing those, one per line, to
classnames.txt reproduces their prompts. The synset mapping's first names repeat for two
pairs of classes ("crane", "maillot"), which a ranking by name cannot tell apart. Ids:
the file name stem ("ILSVRC2012_val_00000293").

Images are never decoded here: a missing folder fails at load, a missing image file when
that example's image is loaded (TaskDataError naming the path).
"""
import json
import os

from flamingo_jax.evaluation.tasks.base import (Example, ImageFile, TaskData, TaskDataError,
                                                 field, first_file, require_dir, require_file)

HATEFUL_MEMES_CLASSES = ("no", "yes")  # label 0, 1
HATEFUL_MEMES_TEST = ("dev_seen.jsonl", "dev.jsonl")
HATEFUL_MEMES_LAYOUT = ("train.jsonl and dev_seen.jsonl (lines {id, img, text, label}) and "
                        "the images img/")

IMAGENET_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif",
                       ".tiff")  # what ImageFolder takes, compared lower-cased
IMAGENET_NAMES = ("classnames.txt", "LOC_synset_mapping.txt")
IMAGENET_LAYOUT = ("train/<wnid>/*.JPEG, val/<wnid>/*.JPEG and the class names: "
                   "classnames.txt (one per line, in sorted-wnid order) or the official "
                   "LOC_synset_mapping.txt")


def load_hateful_memes(root: str) -> TaskData:
  """HatefulMemes from `root` (HATEFUL_MEMES_LAYOUT)."""
  train = require_file(os.path.join(root, "train.jsonl"), "the train memes",
                       HATEFUL_MEMES_LAYOUT)
  test = first_file(root, HATEFUL_MEMES_TEST, "the memes scored", HATEFUL_MEMES_LAYOUT)
  images = require_dir(os.path.join(root, "img"), "the meme images", HATEFUL_MEMES_LAYOUT)
  return TaskData(train=_memes(train, images), test=_memes(test, images),
                  class_names=HATEFUL_MEMES_CLASSES,
                  files={"train": train, "test": test, "images": images})


def _memes(path: str, images: str) -> list[Example]:
  out = []
  for where, record in _jsonl(path, HATEFUL_MEMES_LAYOUT):
    label = field(record, "label", int, where, HATEFUL_MEMES_LAYOUT)
    if label not in (0, 1):
      raise TaskDataError(f"{where}: field 'label' is {label}, expected 0 or 1; expected "
                          f"{HATEFUL_MEMES_LAYOUT}")
    img = field(record, "img", str, where, HATEFUL_MEMES_LAYOUT)  # "img/01235.png"
    out.append(Example(field(record, "id", (int, str), where, HATEFUL_MEMES_LAYOUT),
                       ImageFile(os.path.join(images, os.path.basename(img))),
                       (HATEFUL_MEMES_CLASSES[label],),
                       text=field(record, "text", str, where, HATEFUL_MEMES_LAYOUT)))
  return out


def _jsonl(path: str, layout: str):
  """(where, record) for each non-blank line."""
  with open(path) as f:
    lines = f.read().splitlines()
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise TaskDataError(f"{path}: line {n}: not valid JSON ({e}); expected {layout}") from e
    yield f"{path}: line {n}", record


def load_imagenet(root: str) -> TaskData:
  """ImageNet from `root` (IMAGENET_LAYOUT)."""
  train_dir = require_dir(os.path.join(root, "train"), "the train class folders",
                          IMAGENET_LAYOUT)
  val_dir = require_dir(os.path.join(root, "val"), "the val class folders", IMAGENET_LAYOUT)
  wnids = _class_folders(train_dir)
  unknown = sorted(set(_class_folders(val_dir)) - set(wnids))
  if unknown:
    raise TaskDataError(f"{os.path.join(val_dir, unknown[0])}: class folder not in "
                        f"{train_dir} ({len(unknown)} such); expected {IMAGENET_LAYOUT}")
  names_path = first_file(root, IMAGENET_NAMES, "the class names", IMAGENET_LAYOUT)
  if os.path.basename(names_path) == IMAGENET_NAMES[0]:
    names = _listed_names(names_path, len(wnids), train_dir)
  else:
    names = _synset_names(names_path, wnids)
  return TaskData(train=_class_images(train_dir, wnids, names),
                  test=_class_images(val_dir, wnids, names), class_names=names,
                  files={"train": train_dir, "test": val_dir, "class_names": names_path})


def _class_folders(split_dir: str) -> list[str]:
  wnids = sorted(d.name for d in os.scandir(split_dir) if d.is_dir())
  if not wnids:
    raise TaskDataError(f"{split_dir}: no class folders; expected {IMAGENET_LAYOUT}")
  return wnids


def _listed_names(path: str, count: int, train_dir: str) -> tuple[str, ...]:
  with open(path) as f:
    names = tuple(line.strip() for line in f if line.strip())
  if len(names) != count:
    raise TaskDataError(f"{path}: {len(names)} class names for the {count} class folders of "
                        f"{train_dir}; expected {IMAGENET_LAYOUT}")
  return names


def _synset_names(path: str, wnids: list[str]) -> tuple[str, ...]:
  first_names = {}
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      wnid, _, names = line.strip().partition(" ")
      if not names.strip():
        raise TaskDataError(f"{path}: line {n}: expected '<wnid> <name>, <name>...'; "
                            f"expected {IMAGENET_LAYOUT}")
      first_names[wnid] = names.split(",")[0].strip()
  missing = [w for w in wnids if w not in first_names]
  if missing:
    raise TaskDataError(f"{path}: no line for class folder {missing[0]} ({len(missing)} "
                        f"missing); expected {IMAGENET_LAYOUT}")
  return tuple(first_names[w] for w in wnids)


def _class_images(split_dir: str, wnids: list[str], names) -> list[Example]:
  out = []
  for wnid, name in zip(wnids, names):
    folder = os.path.join(split_dir, wnid)
    if not os.path.isdir(folder):
      continue  # a val without this class
    files = sorted(e.name for e in os.scandir(folder) if e.is_file()
                   and os.path.splitext(e.name)[1].lower() in IMAGENET_EXTENSIONS)
    out.extend(Example(os.path.splitext(f)[0], ImageFile(os.path.join(folder, f)), (name,))
               for f in files)
  return out
