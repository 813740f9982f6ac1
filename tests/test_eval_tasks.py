"""The image tasks' readers on tiny files in each official layout (eval_fixtures.py).

Every reader is checked through the registry (so the --data-dir folders are checked too):
ids, targets, questions, OCR text, class names, and each example's pixels, loaded lazily
through `media.load`. VQA answers must follow their question by question_id whatever the
annotation order; every file problem must raise TaskDataError naming the file and field.
"""
import json
import os
import re
import shutil

import numpy as np
import pytest

import eval_fixtures as fx
from flamingo_jax.evaluation.tasks import base, captioning, registry
from flamingo_jax.evaluation.tasks.base import TaskDataError
from flamingo_jax.evaluation.tasks.registry import TASKS

IMAGE_TASKS = ("coco", "flickr30k", "vqav2", "okvqa", "textvqa", "vizwiz", "hateful_memes",
               "imagenet", "coco_tfds")
WRITERS = {"coco": fx.write_coco, "flickr30k": fx.write_flickr30k, "vqav2": fx.write_vqav2,
           "okvqa": fx.write_okvqa, "textvqa": fx.write_textvqa, "vizwiz": fx.write_vizwiz,
           "hateful_memes": fx.write_hateful_memes, "imagenet": fx.write_imagenet,
           "coco_tfds": fx.write_coco_tfds}


def as_float(image: np.ndarray) -> np.ndarray:
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  return image.astype(np.float32)


def check(examples, expected):
  """Reader output == the fixture's expectation, pixels included (JPEG: ±3 levels)."""
  assert [e.id for e in examples] == [x["id"] for x in expected]
  for e, x in zip(examples, expected):
    assert (e.targets, e.question, e.text) == (x["targets"], x["question"], x["text"]), e.id
    assert isinstance(e.media, base.ImageFile | captioning.TfdsImage)
    pixels = e.media.load(as_float)
    assert pixels.shape == (1, fx.SIZE, fx.SIZE, 3) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels.mean(axis=(0, 1, 2)), x["colour"], atol=3,
                               err_msg=str(e.id))


def load_and_check(tmp_path, task, **kw):
  want = WRITERS[task](str(tmp_path), **kw)
  data = TASKS[task].load(str(tmp_path))
  check(data.train, want["train"])
  check(data.test, want["test"])
  json.dumps(data.files)  # recorded in results.json
  return data, want


@pytest.mark.parametrize("official", [True, False])
def test_coco_karpathy_train_and_test(tmp_path, official):
  data, _ = load_and_check(tmp_path, "coco", official_references=official)
  assert len(data.train) == 6 and len(data.test) == 3  # val and restval left out
  coco = tmp_path / "coco"
  if official:  # CIDEr references: the official captions of each test image, in order
    assert data.files["references"] == str(coco / "annotations" / "captions_val2014.json")
    assert data.test[0].targets[0] == "Official caption 8.0"
    assert data.train[0].targets[0] == "a photo number 0 (0)"  # demonstrations: Karpathy
  else:
    assert data.files["references"] == f"{coco / 'dataset_coco.json'} sentences"
  assert data.test[0].media.path == str(coco / "val2014" / "COCO_val2014_000000001008.jpg")
  assert data.class_names is None


def test_coco_references_must_cover_every_test_image(tmp_path):
  fx.write_coco(str(tmp_path))
  path = tmp_path / "coco" / "annotations" / "captions_val2014.json"
  refs = json.loads(path.read_text())
  refs["annotations"] = [a for a in refs["annotations"] if a["image_id"] != 1009]
  path.write_text(json.dumps(refs))
  with pytest.raises(TaskDataError, match=rf"{re.escape(str(path))}: no caption with "
                     r"image_id 1009 \(Karpathy test image COCO_val2014_000000001009.jpg\)"):
    TASKS["coco"].load(str(tmp_path))


@pytest.mark.parametrize("folder", ["flickr30k-images", "flickr30k_images"])
def test_flickr30k(tmp_path, folder):
  data, _ = load_and_check(tmp_path, "flickr30k", images_folder=folder)
  assert data.test[0].id == "1000092802" and len(data.test[0].targets) == 5


def test_coco_tfds_reads_the_prepared_folder(tmp_path):
  """By tfds.builder_from_directory: no TensorFlow needed (this machine has none)."""
  want = fx.write_coco_tfds(str(tmp_path))
  data = TASKS["coco_tfds"].load(str(tmp_path))
  for split in ("train", "test"):
    examples = getattr(data, split)
    assert sorted(e.id for e in examples) == sorted(want[split])
    check(examples, [want[split][e.id] for e in examples])
  assert data.files["tfds"] == want["folder"]


def test_coco_tfds_errors(tmp_path):
  with pytest.raises(TaskDataError, match=r"tfds/coco_captions/2014: missing"):
    TASKS["coco_tfds"].load(str(tmp_path))
  want = fx.write_coco_tfds(str(tmp_path))
  info_path = os.path.join(want["folder"], "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"
  with open(info_path, "w") as f:
    json.dump(info, f)
  with pytest.raises(TaskDataError, match=r"1\.1\.0: stored as tfrecord; .*array_record"):
    TASKS["coco_tfds"].load(str(tmp_path))


@pytest.mark.parametrize("task", ["vqav2", "okvqa"])
def test_coco_vqa_pairs_answers_by_question_id(tmp_path, task):
  data, want = load_and_check(tmp_path, task)
  folder = "vqav2" if task == "vqav2" else "okvqa"
  prefix = "v2_" if task == "vqav2" else ""
  annotations = json.loads((tmp_path / folder / f"{prefix}mscoco_train2014_annotations.json")
                           .read_text())["annotations"]
  # The annotation file is in another order than the questions; answers still follow.
  assert [a["question_id"] for a in annotations] != [e.id for e in data.train]
  for e in data.train + data.test:
    assert len(e.targets) == 10 and all(t.startswith(f"answer {e.id} ") for t in e.targets)
  # Two questions share each image.
  assert data.train[0].media.path == data.train[1].media.path != data.train[2].media.path
  assert data.test[0].media.path.endswith("val2014/COCO_val2014_000000300021.jpg")


def test_vqa_question_without_annotation_names_file_and_id(tmp_path):
  fx.write_vqav2(str(tmp_path))
  path = tmp_path / "vqav2" / "v2_mscoco_val2014_annotations.json"
  data = json.loads(path.read_text())
  dropped = data["annotations"].pop(1)["question_id"]
  path.write_text(json.dumps(data))
  with pytest.raises(TaskDataError, match=rf"{re.escape(str(path))}: no annotation with "
                     rf"question_id {dropped} \(asked in .*v2_OpenEnded_mscoco_val2014"):
    TASKS["vqav2"].load(str(tmp_path))
  data["annotations"] += data["annotations"][:1]
  path.write_text(json.dumps(data))
  with pytest.raises(TaskDataError, match=r"annotations\[\d+\]: question_id \d+ is "
                     "annotated twice"):
    TASKS["vqav2"].load(str(tmp_path))


@pytest.mark.parametrize("layout", ["official", "vqa_format"])
def test_textvqa(tmp_path, layout):
  data, _ = load_and_check(tmp_path, "textvqa", layout=layout)
  assert data.test[0].media.path.startswith(str(tmp_path / "textvqa" / "train_images"))
  key = "annotations" if layout == "vqa_format" else "questions"
  assert data.files["test"][key].endswith("_vqa_format.json" if layout == "vqa_format"
                                          else "TextVQA_0.5.1_val.json")
  if layout == "official":  # answers are plain strings there
    path = str(tmp_path / "textvqa" / "TextVQA_0.5.1_train.json")
    _edit(path, lambda d: d["data"][2].__setitem__("answers", ["a", 1]))
    with pytest.raises(TaskDataError, match=rf"{re.escape(path)}: data\[2\].answers: "
                       "expected a non-empty list of answer strings"):
      TASKS["textvqa"].load(str(tmp_path))


@pytest.mark.parametrize("layout", ["official", "annotations", "vqa_format"])
def test_vizwiz_ids_are_image_file_names(tmp_path, layout):
  data, _ = load_and_check(tmp_path, "vizwiz", layout=layout)
  assert data.test[0].id == "VizWiz_val_00000000.jpg"
  assert data.test[0].targets[0] == "unanswerable"


def test_vizwiz_duplicate_image_is_an_error(tmp_path):
  fx.write_vizwiz(str(tmp_path))
  path = tmp_path / "vizwiz" / "val.json"
  records = json.loads(path.read_text())
  path.write_text(json.dumps(records + records[:1]))
  with pytest.raises(TaskDataError, match=rf"{re.escape(str(path))}: image "
                     "'VizWiz_val_00000000.jpg' appears twice"):
    TASKS["vizwiz"].load(str(tmp_path))


@pytest.mark.parametrize("test_name", ["dev_seen.jsonl", "dev.jsonl"])
def test_hateful_memes_scores_dev_seen(tmp_path, test_name):
  data, want = load_and_check(tmp_path, "hateful_memes", test_name=test_name)
  assert data.class_names == ("no", "yes") == want["class_names"]
  assert data.files["test"] == str(tmp_path / "hateful_memes" / test_name)  # not test_seen
  assert {e.targets for e in data.train} == {("no",), ("yes",)}


@pytest.mark.parametrize("names", ["classnames", "synset"])
def test_imagenet(tmp_path, names):
  data, want = load_and_check(tmp_path, "imagenet", names=names)
  assert data.class_names == want["class_names"]
  assert data.test[0].id == "ILSVRC2012_val_00000006"


def test_imagenet_class_name_errors(tmp_path):
  want = fx.write_imagenet(str(tmp_path), names="none")
  base_dir = tmp_path / "imagenet"
  with pytest.raises(TaskDataError, match=r"none of classnames.txt, LOC_synset_mapping.txt "
                     r"found \(the class names\)"):
    TASKS["imagenet"].load(str(tmp_path))
  (base_dir / "classnames.txt").write_text("one\ntwo\n")
  with pytest.raises(TaskDataError, match=r"classnames.txt: 2 class names for the 3 class "
                     "folders"):
    TASKS["imagenet"].load(str(tmp_path))
  os.remove(base_dir / "classnames.txt")
  (base_dir / "LOC_synset_mapping.txt").write_text(f"{want['wnids'][0]} tench, Tinca\n")
  with pytest.raises(TaskDataError, match=rf"LOC_synset_mapping.txt: no line for class "
                     rf"folder {want['wnids'][1]} \(2 missing\)"):
    TASKS["imagenet"].load(str(tmp_path))
  (base_dir / "LOC_synset_mapping.txt").write_text(f"{want['wnids'][0]}\n")
  with pytest.raises(TaskDataError, match=r"LOC_synset_mapping.txt: line 1: expected"):
    TASKS["imagenet"].load(str(tmp_path))
  os.makedirs(base_dir / "val" / "n99999999")
  with pytest.raises(TaskDataError, match=r"val/n99999999: class folder not in"):
    TASKS["imagenet"].load(str(tmp_path))


# ---------------------------------------------------------------------------------------
# Error paths, each task: (fixture kwargs, a required file, a JSON file with a record
# to break: how to find the record, the field, how the message names the record, and a
# folder of images).

def _jsonl_first(records):
  return records[0]


ERRORS = {
    "coco": ({}, "coco/dataset_coco.json", "coco/dataset_coco.json",
             lambda d: d["images"][0], "cocoid", "images[0]", "coco/train2014"),
    "coco_refs": ({}, None, "coco/annotations/captions_val2014.json",
                  lambda d: d["annotations"][2], "caption", "annotations[2]", "coco/val2014"),
    "flickr30k": ({}, "flickr30k/dataset_flickr30k.json", "flickr30k/dataset_flickr30k.json",
                  lambda d: d["images"][1], "sentences", "images[1]",
                  "flickr30k/flickr30k-images"),
    "vqav2": ({}, "vqav2/v2_mscoco_val2014_annotations.json",
              "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
              lambda d: d["questions"][0], "image_id", "questions[0]", "vqav2/val2014"),
    "vqav2_answers": ({}, "vqav2/v2_OpenEnded_mscoco_train2014_questions.json",
                      "vqav2/v2_mscoco_train2014_annotations.json",
                      lambda d: d["annotations"][3]["answers"][4], "answer",
                      "annotations[3].answers[4]", "vqav2/train2014"),
    "okvqa": ({}, "okvqa/mscoco_train2014_annotations.json",
              "okvqa/OpenEnded_mscoco_train2014_questions.json",
              lambda d: d["questions"][1], "question", "questions[1]", "okvqa/train2014"),
    "textvqa": ({}, "textvqa/TextVQA_0.5.1_val.json", "textvqa/TextVQA_0.5.1_val.json",
                lambda d: d["data"][0], "question_id", "data[0]", "textvqa/train_images"),
    "textvqa_vqa_format": ({"layout": "vqa_format"},
                           "textvqa/val_annotations_vqa_format.json",
                           "textvqa/val_annotations_vqa_format.json",
                           lambda d: d["annotations"][0], "question_id", "annotations[0]",
                           "textvqa/train_images"),
    "vizwiz": ({}, "vizwiz/val.json", "vizwiz/val.json", lambda d: d[1]["answers"][0],
               "answer", "[1].answers[0]", "vizwiz/val"),
    "hateful_memes": ({}, "hateful_memes/dev_seen.jsonl", "hateful_memes/train.jsonl",
                      _jsonl_first, "label", "line 1", "hateful_memes/img"),
}


def _task(case):
  return {"coco_refs": "coco", "vqav2_answers": "vqav2",
          "textvqa_vqa_format": "textvqa"}.get(case, case)


def _edit(path, change):
  """Apply `change` to the JSON (or each line of the JSON-lines) file at `path`."""
  with open(path) as f:
    text = f.read()
  if path.endswith(".jsonl"):
    records = [json.loads(line) for line in text.splitlines()]
    change(records)
    text = "".join(json.dumps(r) + "\n" for r in records)
  else:
    data = json.loads(text)
    change(data)
    text = json.dumps(data)
  with open(path, "w") as f:
    f.write(text)


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_name_the_file_and_field(tmp_path, case):
  kwargs, required, broken, locate, name, where, images = ERRORS[case]
  task, root = TASKS[_task(case)], str(tmp_path)
  WRITERS[_task(case)](root, **kwargs)
  path = os.path.join(root, broken)
  original = open(path).read()

  def expect(pattern):
    with pytest.raises(TaskDataError, match=pattern) as e:
      task.load(root)
    assert "expected" in str(e.value)  # and the layout

  # A field of the wrong type, then a missing one.
  _edit(path, lambda d: locate(d).__setitem__(name, None))
  expect(rf"{re.escape(path)}: {re.escape(where)}: field '{name}' is NoneType, expected")
  _edit(path, lambda d: locate(d).pop(name))
  expect(rf"{re.escape(path)}: {re.escape(where)}: no field '{name}'")
  # Not JSON at all.
  with open(path, "w") as f:
    f.write("{" + original)
  expect(rf"{re.escape(path)}: (line 1: )?not valid JSON")
  with open(path, "w") as f:
    f.write(original)
  task.load(root)
  # A missing folder of images: at load, before any example.
  shutil.move(os.path.join(root, images), os.path.join(root, "moved"))
  expect(rf"{re.escape(os.path.join(root, images))}: missing")
  shutil.move(os.path.join(root, "moved"), os.path.join(root, images))
  # A missing image file: when that example's image is loaded, naming it.
  data = task.load(root)
  example = (data.train + data.test)[-1] if images.endswith(("val2014", "val")) else \
      data.train[0]
  with open(example.media.path, "wb") as f:
    f.write(b"not an image")
  with pytest.raises(TaskDataError, match=rf"image {re.escape(example.media.path)}: not a "
                     "readable image"):
    example.media.load(as_float)
  os.remove(example.media.path)
  with pytest.raises(TaskDataError, match=rf"image {re.escape(example.media.path)}: cannot "
                     "read it"):
    example.media.load(as_float)
  # A missing file: named by its path (or, where there are alternatives, by its folder and
  # every name looked for).
  if required:
    os.remove(os.path.join(root, required))
    folder, name = os.path.split(os.path.join(root, required))
    expect(rf"^{re.escape(folder)}(/{re.escape(name)}: missing|: none of {re.escape(name)}, )")


def test_missing_task_folder_names_the_layout(tmp_path):
  for name in IMAGE_TASKS:
    with pytest.raises(TaskDataError, match=r"missing|none of") as e:
      TASKS[name].load(str(tmp_path))
    assert str(tmp_path) in str(e.value) and "expected" in str(e.value), name


# ---------------------------------------------------------------------------------------
# The registry

def test_registry_protocol():
  assert set(IMAGE_TASKS) <= set(TASKS)
  protocol = {name: (t.family, t.metric, t.max_new_tokens, t.media)
              for name, t in TASKS.items() if name in IMAGE_TASKS}
  assert protocol == {
      "coco": ("captioning", "cider", 20, "image"),
      "coco_tfds": ("captioning", "cider", 20, "image"),
      "flickr30k": ("captioning", "cider", 20, "image"),
      "vqav2": ("vqa", "vqa_accuracy", 5, "image"),
      "okvqa": ("vqa", "vqa_accuracy", 5, "image"),
      "textvqa": ("vqa", "vqa_accuracy", 10, "image"),
      "vizwiz": ("vqa", "vqa_accuracy", 5, "image"),
      "hateful_memes": ("classification", "roc_auc", 0, "image"),
      "imagenet": ("classification", "top1", 0, "image")}
  assert {n: TASKS[n].postprocess for n in ("coco", "flickr30k", "coco_tfds", "vqav2",
                                            "okvqa", "textvqa", "vizwiz")} == {
      "coco": "caption", "flickr30k": "caption", "coco_tfds": "caption", "vqav2": "vqa",
      "okvqa": "ok_vqa", "textvqa": "vqa", "vizwiz": "vqa"}
  for name in IMAGE_TASKS:
    folder = "tfds" if name == "coco_tfds" else name
    assert TASKS[name].name == name and TASKS[name].layout.startswith(f"{folder}/ holding ")
    assert "\n" not in TASKS[name].layout


def test_register_and_get():
  with pytest.raises(ValueError, match="registered twice"):
    registry.register(TASKS["coco"])
  with pytest.raises(ValueError, match=r"unknown task 'cocoo'; known tasks: coco, coco_tfds"):
    registry.get("cocoo")
  assert registry.get("vqav2") is TASKS["vqav2"]
