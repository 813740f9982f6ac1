"""What every evaluation task gives the runner: examples, and how they are scored.

A task reads its official files (the layouts ../README and each reader's docstring name)
into `TaskData`: the train split (demonstrations are drawn from it) and the test split
(what is scored). An `Example` is one image or video with its text:

  captioning      targets = the reference captions (targets[0] is the demonstration's)
  vqa             question, targets = the human answers (10 for VQAv2; targets[0] is
                  the demonstration's answer, as open_flamingo uses)
  classification  targets = (class name,); `text` = HatefulMemes' OCR text

Media load lazily (`media.load(preprocess)` → float32 [F, H, W, 3], the model's input;
F = 1 for an image), so a 2048-example query set costs nothing until it is used.

Every file problem raises TaskDataError naming the file, the field and the layout
expected.
"""
import dataclasses
from typing import Callable, Protocol

import numpy as np

Preprocess = Callable[[np.ndarray], np.ndarray]  # uint8 [H, W, 3] -> float32 [h, w, 3]


class TaskDataError(ValueError):
  """A missing or malformed dataset file; the message names the file, field and layout."""


class Media(Protocol):
  def load(self, preprocess: Preprocess) -> np.ndarray:
    """float32 [F, H, W, 3]: the model's input for this image (F = 1) or video."""


@dataclasses.dataclass(frozen=True)
class ImageFile:
  path: str

  def load(self, preprocess: Preprocess) -> np.ndarray:
    from flamingo_jax.decoding.prompts import PromptError, read_image
    try:
      image = read_image(self.path)
    except PromptError as e:  # missing or undecodable: a dataset problem, named by its path
      raise TaskDataError(str(e)) from e
    return preprocess(image)[None]


@dataclasses.dataclass(frozen=True)
class EncodedImage:
  """An image held as encoded bytes (a TFDS record)."""
  data: bytes = dataclasses.field(repr=False)
  where: str = ""  # for error messages

  def load(self, preprocess: Preprocess) -> np.ndarray:
    from flamingo_jax.data import images
    try:
      return preprocess(images.decode(self.data))[None]
    except images.ImageDecodeError as e:
      raise TaskDataError(f"{self.where}: {e}") from e


@dataclasses.dataclass(frozen=True)
class Example:
  id: str | int  # what the metric and the predictions file key on (cocoid, question_id…)
  media: Media
  targets: tuple[str, ...]
  question: str | None = None
  text: str | None = None


@dataclasses.dataclass(frozen=True)
class TaskData:
  train: list[Example]
  test: list[Example]
  class_names: tuple[str, ...] | None = None  # classification: the candidates, in order
  files: dict = dataclasses.field(default_factory=dict)  # what was read, for results.json


@dataclasses.dataclass(frozen=True)
class Task:
  """A task's fixed protocol; `load(data_dir)` reads its files."""
  name: str
  family: str  # 'captioning' | 'vqa' | 'classification'
  metric: str  # 'cider' | 'vqa_accuracy' | 'roc_auc' | 'top1'
  max_new_tokens: int  # generation tasks (evaluation.md); 0 for classification
  load: Callable[[str], TaskData] = dataclasses.field(repr=False, compare=False)
  media: str = "image"  # 'image' | 'video'
  postprocess: str = "vqa"  # answer post-processing: 'caption' | 'vqa' | 'ok_vqa'
  layout: str = ""  # the files expected under --data-dir, for errors and the README


def require_file(path: str, what: str, layout: str) -> str:
  """`path` if it is a file, else TaskDataError naming it and the layout."""
  import os
  if not os.path.isfile(path):
    raise TaskDataError(f"{path}: missing ({what}); expected {layout}")
  return path


def require_dir(path: str, what: str, layout: str) -> str:
  """`path` if it is a folder, else TaskDataError naming it and the layout."""
  import os
  if not os.path.isdir(path):
    raise TaskDataError(f"{path}: missing ({what}); expected {layout}")
  return path


def first_file(folder: str, names, what: str, layout: str) -> str:
  """The first of `names` (paths relative to `folder`) that is a file; else TaskDataError
  naming them all."""
  import os
  for name in names:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise TaskDataError(f"{folder}: none of {', '.join(names)} found ({what}); expected {layout}")


def read_json(path: str, layout: str):
  import json
  require_file(path, "a JSON file", layout)
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise TaskDataError(f"{path}: not valid JSON ({e}); expected {layout}") from e


def field(record, name: str, types, where: str, layout: str):
  """record[name], checked to be one of `types`; else TaskDataError naming the field."""
  if not isinstance(record, dict) or name not in record:
    raise TaskDataError(f"{where}: no field {name!r}; expected {layout}")
  value = record[name]
  if not isinstance(value, types):
    names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
    raise TaskDataError(f"{where}: field {name!r} is {type(value).__name__}, expected "
                        f"{names}; expected {layout}")
  return value
