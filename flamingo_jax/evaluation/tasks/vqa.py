"""VQA tasks read from their official files: VQAv2, OK-VQA, TextVQA and VizWiz.

Splits: demonstrations from the official train split, scores on the official val split
(what OpenFlamingo reports; VQAv2 test-dev needs the evaluation server). Targets are the
human answers in file order (10 for each of these datasets); targets[0] is the answer a
demonstration shows, as open_flamingo's eval uses.

Questions and answers live in two files in the VQA format: each question is paired with
its annotation by question_id. (open_flamingo pairs them by list position, which silently
misaligns any file that is not in the same order.) A question without an annotation, or
an id given twice, is a TaskDataError naming the file and the question_id.

Ids (what predictions are keyed on): the question_id; VizWiz has none, and asks exactly
one question per image, so its id is the image file name ("VizWiz_val_00000000.jpg"),
which is also the key of VizWiz's official results format. Duplicates are an error.

Images are never decoded here: a missing folder fails at load, a missing image file when
that example's image is loaded (TaskDataError naming the path).
"""
import os

from flamingo_jax.evaluation.tasks.base import (Example, ImageFile, TaskData, TaskDataError,
                                                 field, read_json, require_dir, require_file)

# (our split, the dataset's split): demonstrations from train, scores on val.
COCO_SPLITS = (("train", "train2014"), ("test", "val2014"))
VQA_SPLITS = (("train", "train"), ("test", "val"))

VQAV2_LAYOUT = ("v2_OpenEnded_mscoco_{train,val}2014_questions.json, "
                "v2_mscoco_{train,val}2014_annotations.json and the images "
                "{train,val}2014/COCO_{train,val}2014_{image_id:012d}.jpg")
OKVQA_LAYOUT = ("OpenEnded_mscoco_{train,val}2014_questions.json, "
                "mscoco_{train,val}2014_annotations.json and the COCO images "
                "{train,val}2014/COCO_{train,val}2014_{image_id:012d}.jpg")
TEXTVQA_LAYOUT = ("TextVQA_0.5.1_{train,val}.json (official) or OpenFlamingo's "
                  "{train,val}_{questions,annotations}_vqa_format.json, and the images "
                  "train_images/{image_id}.jpg (train and val)")
VIZWIZ_LAYOUT = ("{train,val}.json (official annotations; also read from annotations/) or "
                 "OpenFlamingo's {train,val}_{questions,annotations}_vqa_format.json, and the "
                 "images train/ and val/")


def load_vqav2(root: str) -> TaskData:
  """VQAv2 from `root` (VQAV2_LAYOUT)."""
  return _coco_vqa(root, "v2_OpenEnded_mscoco_{}_questions.json",
                   "v2_mscoco_{}_annotations.json", VQAV2_LAYOUT)


def load_okvqa(root: str) -> TaskData:
  """OK-VQA from `root` (OKVQA_LAYOUT)."""
  return _coco_vqa(root, "OpenEnded_mscoco_{}_questions.json", "mscoco_{}_annotations.json",
                   OKVQA_LAYOUT)


def _coco_vqa(root, questions_name, annotations_name, layout) -> TaskData:
  splits, files = {}, {}
  for ours, theirs in COCO_SPLITS:
    questions = os.path.join(root, questions_name.format(theirs))
    annotations = os.path.join(root, annotations_name.format(theirs))
    rows = vqa_format_rows(questions, annotations, layout, image_id_types=int)
    images = require_dir(os.path.join(root, theirs), f"the COCO {theirs} images", layout)
    splits[ours] = [_example(r, os.path.join(images, f"COCO_{theirs}_{r['image_id']:012d}.jpg"))
                    for r in rows]
    files[ours] = {"questions": questions, "annotations": annotations, "images": images}
  return TaskData(train=splits["train"], test=splits["test"], files=files)


def load_textvqa(root: str) -> TaskData:
  """TextVQA from `root` (TEXTVQA_LAYOUT): the official files when the train one is there,
  else OpenFlamingo's VQA-format files."""
  official = os.path.join(root, "TextVQA_0.5.1_{}.json")
  vqa_format = _vqa_format_names(root)
  use_official = os.path.isfile(official.format("train"))
  if not (use_official or os.path.isfile(vqa_format[0].format("train"))):
    raise TaskDataError(f"{official.format('train')}: missing (the TextVQA questions; "
                        f"{vqa_format[0].format('train')} is read too); expected "
                        f"{TEXTVQA_LAYOUT}")
  images = require_dir(os.path.join(root, "train_images"), "the TextVQA images",
                       TEXTVQA_LAYOUT)
  splits, files = {}, {}
  for ours, theirs in VQA_SPLITS:
    if use_official:
      path = official.format(theirs)
      rows = _textvqa_rows(path)
      files[ours] = {"questions": path, "images": images}
    else:
      questions, annotations = (n.format(theirs) for n in vqa_format)
      rows = vqa_format_rows(questions, annotations, TEXTVQA_LAYOUT, image_id_types=str)
      files[ours] = {"questions": questions, "annotations": annotations, "images": images}
    splits[ours] = [_example(r, os.path.join(images, f"{r['image_id']}.jpg")) for r in rows]
  return TaskData(train=splits["train"], test=splits["test"], files=files)


def _textvqa_rows(path: str) -> list[dict]:
  """The official TextVQA file: {"data": [{question, image_id, question_id, answers}]}."""
  data = field(read_json(path, TEXTVQA_LAYOUT), "data", list, path, TEXTVQA_LAYOUT)
  rows = []
  for i, q in enumerate(data):
    where = f"{path}: data[{i}]"
    answers = field(q, "answers", list, where, TEXTVQA_LAYOUT)
    rows.append({"question_id": field(q, "question_id", int, where, TEXTVQA_LAYOUT),
                 "image_id": field(q, "image_id", str, where, TEXTVQA_LAYOUT),
                 "question": field(q, "question", str, where, TEXTVQA_LAYOUT),
                 "answers": _strings(answers, f"{where}.answers", TEXTVQA_LAYOUT)})
  _check_unique([r["question_id"] for r in rows], path, "question_id", TEXTVQA_LAYOUT)
  return rows


def load_vizwiz(root: str) -> TaskData:
  """VizWiz from `root` (VIZWIZ_LAYOUT): the official annotations when train.json is there
  (top level or annotations/), else OpenFlamingo's VQA-format files. Ids: the image file
  name either way."""
  official = next((os.path.join(root, d, "{}.json") for d in ("", "annotations")
                   if os.path.isfile(os.path.join(root, d, "train.json"))), None)
  vqa_format = _vqa_format_names(root)
  if official is None and not os.path.isfile(vqa_format[0].format("train")):
    raise TaskDataError(f"{os.path.join(root, 'train.json')}: missing (the VizWiz "
                        f"annotations; annotations/train.json and "
                        f"{vqa_format[0].format('train')} are read too); expected "
                        f"{VIZWIZ_LAYOUT}")
  splits, files = {}, {}
  for ours, theirs in VQA_SPLITS:
    images = require_dir(os.path.join(root, theirs), f"the VizWiz {theirs} images",
                         VIZWIZ_LAYOUT)
    if official is not None:
      path = official.format(theirs)
      rows = _vizwiz_rows(path)
      files[ours] = {"annotations": path, "images": images}
    else:
      questions, annotations = (n.format(theirs) for n in vqa_format)
      rows = vqa_format_rows(questions, annotations, VIZWIZ_LAYOUT, image_id_types=str)
      _check_unique([r["image_id"] for r in rows], questions, "image_id", VIZWIZ_LAYOUT)
      files[ours] = {"questions": questions, "annotations": annotations, "images": images}
    splits[ours] = [_example({**r, "question_id": r["image_id"]},
                             os.path.join(images, r["image_id"])) for r in rows]
  return TaskData(train=splits["train"], test=splits["test"], files=files)


def _vizwiz_rows(path: str) -> list[dict]:
  """The official VizWiz file: [{image, question, answers: [{answer, ...}], ...}]."""
  data = read_json(path, VIZWIZ_LAYOUT)
  if not isinstance(data, list):
    raise TaskDataError(f"{path}: top level is {type(data).__name__}, expected a list of "
                        f"questions; expected {VIZWIZ_LAYOUT}")
  rows = []
  for i, q in enumerate(data):
    where = f"{path}: [{i}]"
    rows.append({"image_id": field(q, "image", str, where, VIZWIZ_LAYOUT),
                 "question": field(q, "question", str, where, VIZWIZ_LAYOUT),
                 "answers": _answers(q, where, VIZWIZ_LAYOUT)})
  _check_unique([r["image_id"] for r in rows], path, "image", VIZWIZ_LAYOUT)
  return rows


def _vqa_format_names(root: str) -> tuple[str, str]:
  """OpenFlamingo's converted files (TextVQA, VizWiz): questions, annotations; '{}' the
  split."""
  return (os.path.join(root, "{}_questions_vqa_format.json"),
          os.path.join(root, "{}_annotations_vqa_format.json"))


# ---------------------------------------------------------------------------------------
# The VQA format: questions and annotations in two files, paired by question_id.

def vqa_format_rows(questions_path: str, annotations_path: str, layout: str, *,
                    image_id_types) -> list[dict]:
  """[{question_id, image_id, question, answers}] in the questions file's order, each
  question's answers found by its question_id in the annotations file."""
  require_file(questions_path, "the questions", layout)
  require_file(annotations_path, "the answers", layout)
  questions = field(read_json(questions_path, layout), "questions", list, questions_path,
                    layout)
  answers = _answers_by_id(annotations_path, layout)
  rows = []
  for i, q in enumerate(questions):
    where = f"{questions_path}: questions[{i}]"
    question_id = field(q, "question_id", int, where, layout)
    if question_id not in answers:
      raise TaskDataError(f"{annotations_path}: no annotation with question_id {question_id} "
                          f"(asked in {questions_path}); the two files must be the same "
                          f"split; expected {layout}")
    rows.append({"question_id": question_id,
                 "image_id": field(q, "image_id", image_id_types, where, layout),
                 "question": field(q, "question", str, where, layout),
                 "answers": answers[question_id]})
  _check_unique([r["question_id"] for r in rows], questions_path, "question_id", layout)
  return rows


def _answers_by_id(path: str, layout: str) -> dict:
  annotations = field(read_json(path, layout), "annotations", list, path, layout)
  out = {}
  for i, a in enumerate(annotations):
    where = f"{path}: annotations[{i}]"
    question_id = field(a, "question_id", int, where, layout)
    if question_id in out:
      raise TaskDataError(f"{where}: question_id {question_id} is annotated twice; expected "
                          f"{layout}")
    out[question_id] = _answers(a, where, layout)
  return out


def _answers(record, where: str, layout: str) -> tuple[str, ...]:
  """record['answers'] = [{answer: str, ...}] → the answer strings, at least one."""
  answers = field(record, "answers", list, where, layout)
  out = tuple(field(a, "answer", str, f"{where}.answers[{j}]", layout)
              for j, a in enumerate(answers))
  if not out:
    raise TaskDataError(f"{where}: field 'answers' is empty; expected {layout}")
  return out


def _strings(values: list, where: str, layout: str) -> tuple[str, ...]:
  if not values or not all(isinstance(v, str) for v in values):
    raise TaskDataError(f"{where}: expected a non-empty list of answer strings; expected "
                        f"{layout}")
  return tuple(values)


def _check_unique(ids: list, path: str, name: str, layout: str):
  seen = set()
  for i in ids:
    if i in seen:
      raise TaskDataError(f"{path}: {name} {i!r} appears twice; expected {layout}")
    seen.add(i)


def _example(row: dict, image_path: str) -> Example:
  return Example(row["question_id"], ImageFile(image_path), row["answers"],
                 question=row["question"])
