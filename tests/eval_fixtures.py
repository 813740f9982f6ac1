"""Tiny evaluation datasets in each official layout, written as a user has them on disk.

`write_<task>(root, ...)` writes root/<folder>/ (the folder registry.py reads for that
task) and returns what its reader must give back:

  {"data_dir": root, "train": [expected], "test": [expected], ...}

an expected example being {"id", "targets", "question", "text", "colour"}: `colour` is its
image's solid RGB (data_files.colour of a number unique within the fixture), so an image
handed to the wrong example is caught. Images are 16×16 JPEG (PNG for HatefulMemes, as
theirs), real files Pillow writes. Extra fields the official files carry are written too,
and the splits a reader must skip (Karpathy val / restval, HatefulMemes test_seen) are
there to be skipped.
"""
import json
import os
import random

from PIL import Image

from data_files import colour

SIZE = 16


def write_image(path: str, number: int) -> tuple:
  """A solid SIZE×SIZE image of colour(number) at `path` (format from the extension)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rgb = colour(number)
  fmt = "PNG" if path.lower().endswith(".png") else "JPEG"
  Image.new("RGB", (SIZE, SIZE), rgb).save(path, format=fmt, **({"quality": 95}
                                                                  if fmt == "JPEG" else {}))
  return rgb


def write_json(path: str, data) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f)
  return path


def write_jsonl(path: str, records) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return path


def _expected(id_, targets, rgb, question=None, text=None) -> dict:
  return {"id": id_, "targets": tuple(targets), "question": question, "text": text,
          "colour": rgb}


# ---------------------------------------------------------------------------------------
# Captioning

def write_coco(root: str, n_train: int = 6, n_test: int = 3,
               official_references: bool = True) -> dict:
  """root/coco: dataset_coco.json (train, test, plus one val and one restval image to be
  skipped), train2014/ and val2014/ images, and (official_references) annotations/
  captions_val2014.json whose captions differ from the Karpathy sentences, listed in
  shuffled order."""
  base = os.path.join(root, "coco")
  splits = ["train"] * n_train + ["val", "restval"] + ["test"] * n_test
  images, official, out = [], [], {"train": [], "test": []}
  for k, split in enumerate(splits):
    folder = "train2014" if split == "train" else "val2014"
    cocoid = 1000 + k
    filename = f"COCO_{folder}_{cocoid:012d}.jpg"
    rgb = write_image(os.path.join(base, folder, filename), k)
    sentences = [f"a photo number {k} ({j})" for j in range(2 + k % 3)]
    images.append({"filepath": folder, "sentids": list(range(10 * k, 10 * k + len(sentences))),
                   "filename": filename, "imgid": k, "split": split,
                   "sentences": [{"tokens": s.split(), "raw": s, "imgid": k, "sentid": 10 * k + j}
                                 for j, s in enumerate(sentences)],
                   "cocoid": cocoid})
    refs = [f"Official caption {k}.{j}" for j in range(5)]
    if folder == "val2014":
      official += [{"image_id": cocoid, "id": 100 * k + j, "caption": c}
                   for j, c in enumerate(refs)]
    if split in out:
      targets = refs if split == "test" and official_references else sentences
      out[split].append(_expected(cocoid, targets, rgb))
  write_json(os.path.join(base, "dataset_coco.json"), {"images": images, "dataset": "coco"})
  if official_references:
    # Images interleaved in shuffled order, each image's captions in their own order.
    random.Random(0).shuffle(official)
    official.sort(key=lambda a: a["id"] % 100)
    write_json(os.path.join(base, "annotations", "captions_val2014.json"),
               {"info": {}, "images": [], "licenses": [], "type": "captions",
                "annotations": official})
  return {"data_dir": root, **out}


def write_flickr30k(root: str, n_train: int = 6, n_test: int = 3,
                    images_folder: str = "flickr30k-images") -> dict:
  """root/flickr30k: dataset_flickr30k.json (train, one val to skip, test) and the images."""
  base = os.path.join(root, "flickr30k")
  splits = ["train"] * n_train + ["val"] + ["test"] * n_test
  images, out = [], {"train": [], "test": []}
  for k, split in enumerate(splits):
    filename = f"{1000092795 + k}.jpg"
    rgb = write_image(os.path.join(base, images_folder, filename), k)
    sentences = [f"people number {k} ({j})" for j in range(5)]
    images.append({"sentids": list(range(5 * k, 5 * k + 5)), "imgid": k, "split": split,
                   "filename": filename,
                   "sentences": [{"tokens": s.split(), "raw": s, "imgid": k, "sentid": 5 * k + j}
                                 for j, s in enumerate(sentences)]})
    if split in out:
      out[split].append(_expected(filename[:-4], sentences, rgb))
  write_json(os.path.join(base, "dataset_flickr30k.json"),
             {"images": images, "dataset": "flickr30k"})
  return {"data_dir": root, **out}


def write_coco_tfds(root: str, n_train: int = 4, n_test: int = 2) -> dict:
  """root/tfds: coco_captions/2014/1.1.0 in array_record, with coco_captions' features
  (image, image/filename, image/id, objects, captions {id, text}) and its four Karpathy
  splits. Written by a builder of the same name and features: the catalog's own class
  needs TensorFlow, and the reader never uses it."""
  import numpy as np
  import tensorflow_datasets as tfds
  from data_files import jpeg

  splits = {"train": range(n_train), "val": range(n_train, n_train + 1),
            "restval": range(n_train + 1, n_train + 2),
            "test": range(n_train + 2, n_train + 2 + n_test)}

  def record(k):
    return {"image": jpeg(k, size=(SIZE, SIZE)), "image/filename": f"COCO_{k:012d}.jpg",
            "image/id": 5000 + k, "objects": [],
            "captions": [{"id": 10 * k + j, "text": f"tfds caption {k} ({j})"}
                         for j in range(2 + k % 2)]}

  class CocoCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "coco_captions"
    VERSION = tfds.core.Version("1.1.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "image/filename": tfds.features.Text(), "image/id": np.int64,
          "objects": tfds.features.Sequence({
              "id": np.int64, "area": np.int64, "bbox": tfds.features.BBoxFeature(),
              "label": tfds.features.ClassLabel(num_classes=80), "is_crowd": np.bool_}),
          "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64})}))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(ks) for split, ks in splits.items()}

    def _generate_examples(self, ks):
      for k in ks:
        yield k, record(k)

  data_dir = os.path.join(root, "tfds")
  CocoCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()
  # TFDS shuffles records within a split by key hash: the reader keeps the stored order,
  # so the expectation is keyed by id.
  out = {split: {5000 + k: _expected(5000 + k, [c["text"] for c in record(k)["captions"]],
                                     colour(k)) for k in splits[split]}
         for split in ("train", "test")}
  return {"data_dir": root, "folder": os.path.join(data_dir, "coco_captions", "2014", "1.1.0"),
          **out}


# ---------------------------------------------------------------------------------------
# VQA

def _shuffled(records: list) -> list:
  """A fixed permutation that is never the identity (for two records or more)."""
  out = list(records)
  random.Random(0).shuffle(out)
  return out[::-1] if out == records else out


def _vqa_answers(question_id, n=10) -> list[str]:
  return [f"answer {question_id} {m}" for m in range(n)]


def _coco_vqa(root, folder, questions_name, annotations_name, n_train, n_test,
              shuffle_annotations) -> dict:
  """Two questions per image; annotations listed in shuffled order (pairing is by id)."""
  base = os.path.join(root, folder)
  out, first_image = {}, 0
  for ours, split, n in (("train", "train2014", n_train), ("test", "val2014", n_test)):
    questions, annotations, out[ours] = [], [], []
    for k in range(n):
      number = first_image + k // 2  # the image's number: two questions each
      image_id = 300000 + 7 * number
      if k % 2 == 0:
        rgb = write_image(os.path.join(base, split, f"COCO_{split}_{image_id:012d}.jpg"),
                          number)
      question_id = image_id * 10 + k % 2
      question = f"What is in picture {image_id}, question {k % 2}?"
      answers = _vqa_answers(question_id)
      questions.append({"image_id": image_id, "question": question,
                        "question_id": question_id})
      annotations.append({"question_type": "what is", "multiple_choice_answer": answers[0],
                          "answers": [{"answer": a, "answer_confidence": "yes",
                                       "answer_id": m + 1} for m, a in enumerate(answers)],
                          "image_id": image_id, "answer_type": "other",
                          "question_id": question_id})
      out[ours].append(_expected(question_id, answers, rgb, question=question))
    first_image += (n + 1) // 2
    if shuffle_annotations:
      annotations = _shuffled(annotations)
    write_json(os.path.join(base, questions_name.format(split)),
               {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                "data_subtype": split, "questions": questions, "license": {}})
    write_json(os.path.join(base, annotations_name.format(split)),
               {"info": {}, "data_type": "mscoco", "data_subtype": split,
                "annotations": annotations, "license": {}})
  return {"data_dir": root, **out}


def write_vqav2(root: str, n_train: int = 6, n_test: int = 3,
                shuffle_annotations: bool = True) -> dict:
  """root/vqav2: the v2_OpenEnded / v2_mscoco files for train2014 and val2014 + images."""
  return _coco_vqa(root, "vqav2", "v2_OpenEnded_mscoco_{}_questions.json",
                   "v2_mscoco_{}_annotations.json", n_train, n_test, shuffle_annotations)


def write_okvqa(root: str, n_train: int = 6, n_test: int = 3,
                shuffle_annotations: bool = True) -> dict:
  """root/okvqa: OpenEnded_mscoco / mscoco annotation files for train2014, val2014 + images."""
  return _coco_vqa(root, "okvqa", "OpenEnded_mscoco_{}_questions.json",
                   "mscoco_{}_annotations.json", n_train, n_test, shuffle_annotations)


def write_textvqa(root: str, n_train: int = 5, n_test: int = 3,
                  layout: str = "official") -> dict:
  """root/textvqa: TextVQA_0.5.1_{train,val}.json (layout='official') or OpenFlamingo's
  {train,val}_{questions,annotations}_vqa_format.json ('vqa_format', annotations shuffled),
  and train_images/{image_id}.jpg for both splits."""
  base = os.path.join(root, "textvqa")
  out, number = {}, 0
  for ours, split, n in (("train", "train", n_train), ("test", "val", n_test)):
    rows, out[ours] = [], []
    for _ in range(n):
      image_id = f"{0xabc000 + number:016x}"
      rgb = write_image(os.path.join(base, "train_images", f"{image_id}.jpg"), number)
      question_id = 34602 + number
      question = f"what does sign {number} say?"
      answers = _vqa_answers(question_id)
      rows.append({"question": question, "image_id": image_id, "image_classes": ["Sign"],
                   "flickr_original_url": "", "flickr_300k_url": "", "image_width": SIZE,
                   "image_height": SIZE, "answers": answers, "question_tokens": question.split(),
                   "question_id": question_id, "set_name": split})
      out[ours].append(_expected(question_id, answers, rgb, question=question))
      number += 1
    if layout == "official":
      write_json(os.path.join(base, f"TextVQA_0.5.1_{split}.json"),
                 {"dataset_type": split, "dataset_name": "textvqa", "dataset_version": "0.5.1",
                  "data": rows})
    else:
      _write_vqa_format(base, split, rows, lambda r: r["image_id"])
  return {"data_dir": root, **out}


def _write_vqa_format(base, split, rows, image_id):
  """OpenFlamingo's conversion: questions and annotations apart, annotations reversed."""
  write_json(os.path.join(base, f"{split}_questions_vqa_format.json"),
             {"questions": [{"image_id": image_id(r), "question": r["question"],
                             "question_id": r["question_id"]} for r in rows]})
  write_json(os.path.join(base, f"{split}_annotations_vqa_format.json"),
             {"annotations": [{"question_id": r["question_id"], "image_id": image_id(r),
                               "answers": [{"answer": a} for a in r["answers"]]}
                              for r in reversed(rows)]})


def write_vizwiz(root: str, n_train: int = 5, n_test: int = 3,
                 layout: str = "official") -> dict:
  """root/vizwiz: the official {train,val}.json (layout='official'; 'annotations' puts them
  in annotations/ as the archive does) or OpenFlamingo's VQA-format files ('vqa_format'),
  and the images train/, val/. Ids are the image file names."""
  base = os.path.join(root, "vizwiz")
  out, number = {}, 0
  for ours, split, n in (("train", "train", n_train), ("test", "val", n_test)):
    records, out[ours] = [], []
    for k in range(n):
      image = f"VizWiz_{split}_{k:08d}.jpg"
      rgb = write_image(os.path.join(base, split, image), number)
      question = f"What is this, number {number}?"
      answers = [f"thing {number} {m}" if m % 4 else "unanswerable" for m in range(10)]
      records.append({"image": image, "question": question,
                      "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers],
                      "answer_type": "other", "answerable": 1})
      out[ours].append(_expected(image, answers, rgb, question=question))
      number += 1
    if layout == "vqa_format":
      _write_vqa_format(base, split, [{"question": r["question"], "question_id": 900 + i,
                                       "image": r["image"],
                                       "answers": [a["answer"] for a in r["answers"]]}
                                      for i, r in enumerate(records)], lambda r: r["image"])
    else:
      folder = "annotations" if layout == "annotations" else ""
      write_json(os.path.join(base, folder, f"{split}.json"), records)
  return {"data_dir": root, **out}


# ---------------------------------------------------------------------------------------
# Classification

def write_hateful_memes(root: str, n_train: int = 6, n_test: int = 4,
                        test_name: str = "dev_seen.jsonl") -> dict:
  """root/hateful_memes: train.jsonl, `test_name` (dev_seen.jsonl, or dev.jsonl as phase 1
  named it), a test_seen.jsonl of other memes that must not be read, and img/*.png."""
  base = os.path.join(root, "hateful_memes")
  out, number = {}, 0
  for ours, name, n in (("train", "train.jsonl", n_train), ("test", test_name, n_test),
                        ("unused", "test_seen.jsonl", 2)):
    records, out[ours] = [], []
    for k in range(n):
      meme_id = 1235 + 11 * number
      img = f"img/{meme_id:05d}.png"
      rgb = write_image(os.path.join(base, img), number)
      label = number % 2
      text = f"meme text {number}"
      records.append({"id": meme_id, "img": img, "label": label, "text": text})
      out[ours].append(_expected(meme_id, [("no", "yes")[label]], rgb, text=text))
      number += 1
    write_jsonl(os.path.join(base, name), records)
  del out["unused"]
  return {"data_dir": root, "class_names": ("no", "yes"), **out}


def write_imagenet(root: str, n_classes: int = 3, n_train: int = 2, n_val: int = 1,
                   names: str = "classnames") -> dict:
  """root/imagenet: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, the class names as
  classnames.txt (names='classnames') or LOC_synset_mapping.txt ('synset': lines shuffled,
  an extra synset with no folder, several names per line), or neither ('none')."""
  base = os.path.join(root, "imagenet")
  wnids = [f"n0{1440764 + 97 * c:07d}" for c in range(n_classes)]
  class_names = tuple(f"kind {c} thing" for c in range(n_classes))
  out, number = {"train": [], "test": []}, 0
  for ours, split, n in (("train", "train", n_train), ("test", "val", n_val)):
    for wnid, name in zip(wnids, class_names):
      for k in range(n):
        stem = f"{wnid}_{10026 + k}" if split == "train" else f"ILSVRC2012_val_{number:08d}"
        rgb = write_image(os.path.join(base, split, wnid, f"{stem}.JPEG"), number)
        out[ours].append(_expected(stem, [name], rgb))
        number += 1
  if names == "classnames":
    with open(os.path.join(base, "classnames.txt"), "w") as f:
      f.write("\n".join(class_names) + "\n")
  elif names == "synset":
    lines = [f"{w} {n}, other name {c}, third" for c, (w, n) in
             enumerate(zip(wnids, class_names))] + ["n09999999 unused class, spare"]
    random.Random(0).shuffle(lines)
    with open(os.path.join(base, "LOC_synset_mapping.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return {"data_dir": root, "class_names": class_names, "wnids": wnids, **out}
