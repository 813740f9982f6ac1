"""The video tasks (paper Table 1): MSVD-QA, MSRVTT-QA and VATEX, from their release files.

Each reads a fixed folder under --data-dir; the examples hold `VideoFile`s, decoded to 30
frames (the paper's 3 FPS on these ~10 s clips, video_frames.py) only when used.

  msvd_qa    msvd_qa/: the MSVD-QA release (Xu et al. 2017): train_qa.json, test_qa.json,
             JSON lists of {answer, id, question, video_id: int}; youtube_mapping.txt, lines
             `<youtube-clip-name> vid<N>` (e.g. `-4wsuPCjDBc_5_15 vid1`); and MSVD's own
             YouTubeClips/<youtube-clip-name>.avi. A question's video_id N is the clip on
             the `vid<N>` line: the mapping's first column is the file name, its second the
             number the QA files use (N counts from 1, unpadded).
  msrvtt_qa  msrvtt_qa/: train_qa.json, test_qa.json (same fields; video_id N is MSR-VTT's
             video<N>, 0..9999) and the MSR-VTT videos video<N>.mp4 in any of video/,
             videos/all/, TrainValVideo/ and TestVideo/ (the release's two archives, or
             one folder of all 10,000; a number found in two folders takes the first in
             that order).
  vatex      vatex/: vatex_training_v1.0.json (train) and vatex_validation_v1.0.json (test:
             the public test set has no captions), lists of {videoID:
             "<youtube-id>_<start:06d>_<end:06d>", enCap: [10 English captions], chCap};
             the clips videos/<videoID>.mp4.

val_qa.json is not read: the few-shot protocol draws demonstrations from train and scores
test. VATEX clips are cut from YouTube videos, many of which have disappeared, so a clip
missing from videos/ is skipped and counted (TaskData.files['skipped_missing_videos']); a
split with none of its clips is an error. MSVD and MSR-VTT are distributed whole, so a
missing clip there means a broken copy: an error naming it.

Protocol: QA is open-ended, scored top-1 (exact match after the VQA answer normalisation,
postprocess 'vqa'); VATEX is captioning, CIDEr. max_new_tokens 5 (QA) and 20 (VATEX)
follow the image tasks (evaluation.md); the paper does not state per-task lengths.
"""
import functools
import os
import re

from flamingo_jax.evaluation.tasks.base import (Example, Task, TaskData, TaskDataError, field,
                                                read_json, require_file)
from flamingo_jax.evaluation.video_frames import NUM_FRAMES, VideoFile

MSVD_LAYOUT = ("msvd_qa/: train_qa.json, test_qa.json ([{answer, id, question, video_id}]), "
               "youtube_mapping.txt ('<youtube-clip-name> vid<N>' lines), "
               "YouTubeClips/<youtube-clip-name>.avi")
MSRVTT_FOLDERS = ("video", os.path.join("videos", "all"), "TrainValVideo", "TestVideo")
MSRVTT_LAYOUT = ("msrvtt_qa/: train_qa.json, test_qa.json ([{answer, id, question, video_id}]), "
                 "video<video_id>.mp4 in video/, videos/all/, TrainValVideo/ or TestVideo/")
VATEX_LAYOUT = ("vatex/: vatex_training_v1.0.json, vatex_validation_v1.0.json "
                "([{videoID, enCap: [10 captions]}]), videos/<videoID>.mp4")


def load_msvd_qa(data_dir: str, num_frames: int = NUM_FRAMES) -> TaskData:
  root = os.path.join(data_dir, "msvd_qa")
  mapping_path = os.path.join(root, "youtube_mapping.txt")
  mapping = _read_msvd_mapping(mapping_path)
  clips_dir = os.path.join(root, "YouTubeClips")
  clips = _listing(clips_dir, MSVD_LAYOUT)

  def video_path(video_id, where):
    if video_id not in mapping:
      raise TaskDataError(f"{where}: video_id {video_id} has no 'vid{video_id}' line in "
                          f"{mapping_path}; expected {MSVD_LAYOUT}")
    name = mapping[video_id] + ".avi"
    return os.path.join(clips_dir, name), name in clips

  splits = {s: os.path.join(root, f"{s}_qa.json") for s in ("train", "test")}
  return TaskData(
      train=_qa_examples(splits["train"], video_path, num_frames, MSVD_LAYOUT),
      test=_qa_examples(splits["test"], video_path, num_frames, MSVD_LAYOUT),
      files={**splits, "mapping": mapping_path, "videos": clips_dir,
             "frames_per_video": num_frames})


def load_msrvtt_qa(data_dir: str, num_frames: int = NUM_FRAMES) -> TaskData:
  root = os.path.join(data_dir, "msrvtt_qa")
  folders = [os.path.join(root, f) for f in MSRVTT_FOLDERS if os.path.isdir(os.path.join(root, f))]
  if not folders:
    raise TaskDataError(f"{root}: no video folder (looked for "
                        f"{', '.join(f + '/' for f in MSRVTT_FOLDERS)}); expected {MSRVTT_LAYOUT}")
  videos: dict[int, str] = {}
  for folder in folders:  # one listing per folder, not a stat per question
    for name in sorted(os.listdir(folder)):
      m = re.fullmatch(r"video(\d+)\.mp4", name)
      if m:
        videos.setdefault(int(m.group(1)), os.path.join(folder, name))

  def video_path(video_id, where):
    if video_id in videos:
      return videos[video_id], True
    return os.path.join(folders[0], f"video{video_id}.mp4"), False

  splits = {s: os.path.join(root, f"{s}_qa.json") for s in ("train", "test")}
  return TaskData(
      train=_qa_examples(splits["train"], video_path, num_frames, MSRVTT_LAYOUT),
      test=_qa_examples(splits["test"], video_path, num_frames, MSRVTT_LAYOUT),
      files={**splits, "videos": folders, "frames_per_video": num_frames})


def load_vatex(data_dir: str, num_frames: int = NUM_FRAMES) -> TaskData:
  root = os.path.join(data_dir, "vatex")
  videos_dir = os.path.join(root, "videos")
  splits = {"train": os.path.join(root, "vatex_training_v1.0.json"),
            "test": os.path.join(root, "vatex_validation_v1.0.json")}
  records = {s: _vatex_records(p) for s, p in splits.items()}  # every JSON checked first
  present = _listing(videos_dir, VATEX_LAYOUT)
  examples, skipped = {}, {}
  for split, rows in records.items():
    kept = [Example(id=vid, media=VideoFile(os.path.join(videos_dir, vid + ".mp4"), num_frames),
                    targets=caps)
            for vid, caps in rows if vid + ".mp4" in present]
    if not kept:
      raise TaskDataError(f"{videos_dir}: none of the {len(rows)} clips of {splits[split]} is "
                          f"there (e.g. {rows[0][0]}.mp4); expected {VATEX_LAYOUT}")
    examples[split], skipped[split] = kept, len(rows) - len(kept)
  return TaskData(
      train=examples["train"], test=examples["test"],
      files={**splits, "videos": videos_dir, "frames_per_video": num_frames,
             "skipped_missing_videos": sum(skipped.values()),
             "skipped_missing_videos_by_split": skipped})


def tasks(num_frames: int = NUM_FRAMES) -> dict[str, Task]:
  """The video tasks by name; `num_frames` frames per video (paper: 30)."""
  qa = dict(family="vqa", metric="top1", max_new_tokens=5, media="video", postprocess="vqa")
  return {
      "msvd_qa": Task(name="msvd_qa", load=functools.partial(load_msvd_qa, num_frames=num_frames),
                      layout=MSVD_LAYOUT, **qa),
      "msrvtt_qa": Task(name="msrvtt_qa",
                        load=functools.partial(load_msrvtt_qa, num_frames=num_frames),
                        layout=MSRVTT_LAYOUT, **qa),
      "vatex": Task(name="vatex", family="captioning", metric="cider", max_new_tokens=20,
                    load=functools.partial(load_vatex, num_frames=num_frames), media="video",
                    postprocess="caption", layout=VATEX_LAYOUT),
  }


_DEFAULT = tasks()
MSVD_QA, MSRVTT_QA, VATEX = _DEFAULT["msvd_qa"], _DEFAULT["msrvtt_qa"], _DEFAULT["vatex"]


def _listing(folder: str, layout: str) -> set[str]:
  """The file names in `folder`, read once (a stat per clip is slow on network disks)."""
  if not os.path.isdir(folder):
    raise TaskDataError(f"{folder}: missing (the video folder); expected {layout}")
  return set(os.listdir(folder))


def _json_list(path: str, what: str, layout: str) -> list:
  records = read_json(path, layout)
  if not isinstance(records, list):
    raise TaskDataError(f"{path}: a JSON {type(records).__name__}, expected a list of {what}; "
                        f"expected {layout}")
  if not records:
    raise TaskDataError(f"{path}: no {what}; expected {layout}")
  return records


def _qa_examples(path: str, video_path, num_frames: int, layout: str) -> list[Example]:
  """One Example per question; `video_path(video_id, where)` → (the file, whether it is there)."""
  examples, missing, ids = [], [], set()
  for i, record in enumerate(_json_list(path, "questions", layout)):
    where = f"{path}[{i}]"
    qid = field(record, "id", int, where, layout)
    question = field(record, "question", str, where, layout)
    answer = field(record, "answer", str, where, layout)
    video_id = field(record, "video_id", int, where, layout)
    if qid in ids:  # predictions are keyed on the question id
      raise TaskDataError(f"{where}: question id {qid} appears twice; expected {layout}")
    ids.add(qid)
    video, present = video_path(video_id, where)
    if not present:
      missing.append((video_id, video))
      continue
    examples.append(Example(id=qid, media=VideoFile(video, num_frames), question=question,
                            targets=(answer,)))
  if missing:
    absent = sorted(set(missing))
    raise TaskDataError(f"{path}: {len(absent)} of its videos are missing, e.g. {absent[0][1]} "
                        f"(video_id {absent[0][0]}); expected {layout}")
  return examples


def _read_msvd_mapping(path: str) -> dict[int, str]:
  """youtube_mapping.txt → {N: youtube-clip-name} from its `<youtube-clip-name> vid<N>` lines."""
  require_file(path, "the MSVD-QA clip-name mapping", MSVD_LAYOUT)
  mapping: dict[int, str] = {}
  with open(path) as f:
    for n, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      m = re.fullmatch(r"vid(\d+)", parts[1]) if len(parts) == 2 else None
      if m is None:
        raise TaskDataError(f"{path}:{n}: {line.strip()!r} is not '<youtube-clip-name> vid<N>'; "
                            f"expected {MSVD_LAYOUT}")
      vid = int(m.group(1))
      if mapping.setdefault(vid, parts[0]) != parts[0]:
        raise TaskDataError(f"{path}:{n}: vid{vid} is mapped twice ({mapping[vid]}, "
                            f"{parts[0]}); expected {MSVD_LAYOUT}")
  if not mapping:
    raise TaskDataError(f"{path}: empty; expected {MSVD_LAYOUT}")
  return mapping


def _vatex_records(path: str) -> list[tuple[str, tuple[str, ...]]]:
  """[(videoID, English captions)] of a VATEX annotation file."""
  rows = []
  for i, record in enumerate(_json_list(path, "clips", VATEX_LAYOUT)):
    where = f"{path}[{i}]"
    vid = field(record, "videoID", str, where, VATEX_LAYOUT)
    caps = field(record, "enCap", list, where, VATEX_LAYOUT)
    if not caps or not all(isinstance(c, str) for c in caps):
      raise TaskDataError(f"{where}: field 'enCap' must be a non-empty list of strings; "
                          f"expected {VATEX_LAYOUT}")
    rows.append((vid, tuple(caps)))
  return rows
