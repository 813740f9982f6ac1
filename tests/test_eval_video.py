"""The video tasks: frame sampling (which frames, shapes, damaged files) and the MSVD-QA,
MSRVTT-QA and VATEX readers on tiny copies of their release files (video_fixtures.py)."""
import json
import os

import numpy as np
import pytest

import video_fixtures as vf
from flamingo_jax.evaluation import video_frames
from flamingo_jax.evaluation.tasks import video as video_tasks
from flamingo_jax.evaluation.tasks.base import TaskDataError
from flamingo_jax.evaluation.video_frames import VideoDecodeError, VideoFile, sample_frames


def expected_indices(num_video_frames, fps, num_frames):
  """The frame on screen at each segment midpoint of a constant-rate clip."""
  duration = num_video_frames / fps
  times = (np.arange(num_frames) + 0.5) * duration / num_frames
  return np.minimum(np.floor(times * fps).astype(int), num_video_frames - 1).tolist()


@pytest.mark.parametrize("ext", ["mp4", "avi"])
def test_longer_video_is_subsampled_at_segment_midpoints(tmp_path, ext):
  # 40 frames at 4 FPS = 10 s: 30 frames is the paper's 3 FPS.
  path = vf.write_video(str(tmp_path / f"long.{ext}"), range(40))
  frames = sample_frames(path, 30)
  assert frames.shape == (30, vf.SIZE, vf.SIZE, 3) and frames.dtype == np.uint8
  expected = expected_indices(40, vf.FPS, 30)
  assert vf.codes_of(frames) == expected
  assert expected[:4] == [0, 2, 3, 4] and expected[-1] == 39
  assert np.abs(frames[5].astype(int) - vf.colour(expected[5])).max() <= 12  # codec tolerance


def test_shorter_video_repeats_the_nearest_frames(tmp_path):
  path = vf.write_video(str(tmp_path / "short.mp4"), range(12))
  codes = vf.codes_of(sample_frames(path, 30))
  assert codes == expected_indices(12, vf.FPS, 30)
  assert sorted(set(codes)) == list(range(12))  # every frame used, in order, none skipped
  assert codes == sorted(codes)


def test_as_many_frames_as_asked_gives_each_frame_once(tmp_path):
  path = vf.write_video(str(tmp_path / "same.avi"), range(20))
  assert vf.codes_of(sample_frames(path, 20)) == list(range(20))
  assert vf.codes_of(sample_frames(path, 1)) == [10]  # the middle of the clip


def test_streams_without_header_duration_or_timestamps(tmp_path):
  # Raw h264 has neither a duration nor frame timestamps; MPEG-TS starts at a non-zero time.
  raw = vf.write_video(str(tmp_path / "raw.h264"), range(12), fmt="h264")
  ts = vf.write_video(str(tmp_path / "clip.ts"), range(12), fmt="mpegts")
  for path in (raw, ts):
    assert vf.codes_of(sample_frames(path, 6)) == expected_indices(12, vf.FPS, 6), path


def test_damaged_packets_are_skipped_not_fatal(tmp_path):
  data = bytearray(open(vf.write_video(str(tmp_path / "v.avi"), range(40)), "rb").read())
  data[len(data) // 3: len(data) // 3 + 200] = b"\xff" * 200
  (tmp_path / "damaged.avi").write_bytes(bytes(data))
  assert sample_frames(str(tmp_path / "damaged.avi"), 30).shape == (30, vf.SIZE, vf.SIZE, 3)


def test_unreadable_and_empty_videos_name_the_file(tmp_path):
  junk = tmp_path / "junk.mp4"
  junk.write_bytes(b"not a video" * 50)
  truncated = tmp_path / "truncated.mp4"
  whole = open(vf.write_video(str(tmp_path / "whole.mp4"), range(12)), "rb").read()
  truncated.write_bytes(whole[: len(whole) // 2])
  no_frames = vf.write_video_without_frames(str(tmp_path / "no_frames.avi"))
  audio_only = vf.write_audio_only(str(tmp_path / "audio.m4a"))
  cases = [(junk, "unreadable"), (truncated, "unreadable"), (no_frames, "no decodable"),
           (audio_only, "no video stream"), (tmp_path / "absent.mp4", "missing")]
  for path, why in cases:
    with pytest.raises(VideoDecodeError, match=why) as e:
      sample_frames(str(path))
    assert str(path) in str(e.value)
    assert isinstance(e.value, TaskDataError)


def test_video_file_preprocesses_every_frame(tmp_path):
  path = vf.write_video(str(tmp_path / "v.mp4"), vf.frame_codes(2, 12))
  seen = []

  def preprocess(image):
    seen.append(image.shape)
    return image[::2, ::2].astype(np.float32) / 255

  out = VideoFile(path, num_frames=8).load(preprocess)
  assert out.shape == (8, vf.SIZE // 2, vf.SIZE // 2, 3) and out.dtype == np.float32
  assert seen == [(vf.SIZE, vf.SIZE, 3)] * 8
  assert vf.codes_of(out * 255) == [128 + i for i in expected_indices(12, vf.FPS, 8)]
  assert VideoFile(path).num_frames == video_frames.NUM_FRAMES == 30


def first_frame_code(example):
  return vf.code_of(example.media.load(lambda image: image.astype(np.float32))[0])


def test_task_objects():
  tasks = video_tasks.tasks()
  assert set(tasks) == {"msvd_qa", "msrvtt_qa", "vatex"}
  for name in ("msvd_qa", "msrvtt_qa"):
    t = tasks[name]
    assert (t.name, t.family, t.metric, t.postprocess, t.max_new_tokens, t.media) == (
        name, "vqa", "top1", "vqa", 5, "video")
  t = tasks["vatex"]
  assert (t.family, t.metric, t.postprocess, t.max_new_tokens, t.media) == (
      "captioning", "cider", "caption", 20, "video")
  assert video_tasks.VATEX.name == "vatex" and video_tasks.MSVD_QA.layout.startswith("msvd_qa/")
  assert video_tasks.tasks(num_frames=8)["vatex"].load.keywords == {"num_frames": 8}


def test_msvd_qa(tmp_path):
  vf.make_msvd_qa(str(tmp_path))
  data = video_tasks.MSVD_QA.load(str(tmp_path))
  assert [e.id for e in data.train] == [0, 1, 2] and [e.id for e in data.test] == [30933, 30934]
  for example, record in zip(data.train + data.test, vf.MSVD_TRAIN + vf.MSVD_TEST):
    assert (example.question, example.targets) == (record["question"], (record["answer"],))
    clip = vf.MSVD_CLIPS[record["video_id"]]
    assert example.media == VideoFile(
        str(tmp_path / "msvd_qa" / "YouTubeClips" / f"{clip}.avi"), 30)
    # The clip of vid<N> carries colour set N: the mapping was read in the right direction.
    assert first_frame_code(example) == 64 * record["video_id"]
  assert data.files["frames_per_video"] == 30


@pytest.mark.parametrize("layout", ["release", "all", "flat"])
def test_msrvtt_qa(tmp_path, layout):
  vf.make_msrvtt_qa(str(tmp_path), layout)
  data = video_tasks.MSRVTT_QA.load(str(tmp_path))
  assert [e.id for e in data.train] == [0, 1] and [e.id for e in data.test] == [158581, 158582]
  for example, record in zip(data.train + data.test, vf.MSRVTT_TRAIN + vf.MSRVTT_TEST):
    assert (example.question, example.targets) == (record["question"], (record["answer"],))
    assert os.path.basename(example.media.path) == f"video{record['video_id']}.mp4"
    assert first_frame_code(example) == 64 * vf.MSRVTT_VIDEOS[record["video_id"]]


def test_vatex(tmp_path):
  vf.make_vatex(str(tmp_path))
  data = video_tasks.VATEX.load(str(tmp_path))
  assert [e.id for e in data.train] == [c["videoID"] for c in vf.VATEX_TRAIN]
  assert [e.id for e in data.test] == [c["videoID"] for c in vf.VATEX_TEST]  # validation
  assert data.test[1].targets == tuple(vf.VATEX_TEST[1]["enCap"])
  assert len(data.test[1].targets) == 10
  assert data.train[0].question is None
  assert [first_frame_code(e) for e in data.train + data.test] == [64 * k for k in range(1, 7)]
  assert data.files["skipped_missing_videos"] == 0


def test_vatex_missing_clips_are_skipped_and_counted(tmp_path):
  gone = {vf.VATEX_TRAIN[0]["videoID"], vf.VATEX_TEST[1]["videoID"], vf.VATEX_TEST[2]["videoID"]}
  vf.make_vatex(str(tmp_path), missing=gone)
  data = video_tasks.VATEX.load(str(tmp_path))
  assert [e.id for e in data.train] == [c["videoID"] for c in vf.VATEX_TRAIN[1:]]
  assert [e.id for e in data.test] == [vf.VATEX_TEST[0]["videoID"]]
  assert data.files["skipped_missing_videos"] == 3
  assert data.files["skipped_missing_videos_by_split"] == {"train": 1, "test": 2}


def test_vatex_with_every_clip_of_a_split_missing_names_the_folder(tmp_path):
  vf.make_vatex(str(tmp_path), missing={c["videoID"] for c in vf.VATEX_TEST})
  with pytest.raises(TaskDataError, match="none of the 3 clips") as e:
    video_tasks.VATEX.load(str(tmp_path))
  assert str(tmp_path / "vatex" / "videos") in str(e.value)
  assert "vatex_validation_v1.0.json" in str(e.value)


def rewrite_json(path, edit):
  with open(path) as f:
    value = json.load(f)
  edit(value)
  with open(path, "w") as f:
    json.dump(value, f)


def test_qa_file_errors_name_file_and_field(tmp_path):
  root = vf.make_msvd_qa(str(tmp_path))
  test_json = os.path.join(root, "test_qa.json")
  rewrite_json(test_json, lambda v: v[1].update(video_id="vid1"))
  with pytest.raises(TaskDataError, match=r"test_qa.json\[1\]: field 'video_id' is str"):
    video_tasks.MSVD_QA.load(str(tmp_path))
  rewrite_json(test_json, lambda v: v[1].pop("video_id") and v[0].pop("question"))
  with pytest.raises(TaskDataError, match=r"test_qa.json\[0\]: no field 'question'"):
    video_tasks.MSVD_QA.load(str(tmp_path))
  os.remove(test_json)
  with pytest.raises(TaskDataError, match="missing") as e:
    video_tasks.MSVD_QA.load(str(tmp_path))
  assert test_json in str(e.value) and "msvd_qa/" in str(e.value)  # and the layout


def test_msvd_mapping_and_clip_errors(tmp_path):
  root = vf.make_msvd_qa(str(tmp_path))
  mapping = os.path.join(root, "youtube_mapping.txt")
  lines = open(mapping).read().splitlines()
  clip_1 = os.path.join(root, "YouTubeClips", vf.MSVD_CLIPS[1] + ".avi")
  os.remove(clip_1)
  with pytest.raises(TaskDataError, match="of its videos are missing") as e:
    video_tasks.MSVD_QA.load(str(tmp_path))
  assert clip_1 in str(e.value) and "video_id 1" in str(e.value)
  vf.write_video(clip_1, vf.frame_codes(1, vf.FRAMES_PER_CLIP))
  with open(mapping, "w") as f:
    f.write("\n".join(l for l in lines if not l.endswith(" vid3")) + "\n")
  with pytest.raises(TaskDataError, match=r"test_qa.json\[0\]: video_id 3 has no 'vid3' line"):
    video_tasks.MSVD_QA.load(str(tmp_path))
  with open(mapping, "w") as f:
    f.write(lines[0] + "\nvid2 " + vf.MSVD_CLIPS[2] + "\n")  # columns the wrong way round
  with pytest.raises(TaskDataError, match=r"youtube_mapping.txt:2: .* is not '<youtube-clip-name"):
    video_tasks.MSVD_QA.load(str(tmp_path))
  with open(mapping, "w") as f:
    f.write("\n".join(lines) + "\n")
  video_tasks.MSVD_QA.load(str(tmp_path))
  for path in (os.path.join(root, "YouTubeClips"), mapping):
    os.rename(path, path + ".moved")
    with pytest.raises(TaskDataError, match="missing") as e:
      video_tasks.MSVD_QA.load(str(tmp_path))
    assert path in str(e.value)
    os.rename(path + ".moved", path)


def test_msrvtt_missing_folder_and_video(tmp_path):
  root = vf.make_msrvtt_qa(str(tmp_path), "flat")
  os.remove(os.path.join(root, "video", "video7010.mp4"))
  with pytest.raises(TaskDataError, match="video7010.mp4 .video_id 7010."):
    video_tasks.MSRVTT_QA.load(str(tmp_path))
  os.rename(os.path.join(root, "video"), os.path.join(root, "clips"))
  with pytest.raises(TaskDataError, match="no video folder") as e:
    video_tasks.MSRVTT_QA.load(str(tmp_path))
  assert root in str(e.value) and "TrainValVideo/" in str(e.value)


def test_vatex_file_errors(tmp_path):
  root = vf.make_vatex(str(tmp_path))
  train = os.path.join(root, "vatex_training_v1.0.json")
  rewrite_json(train, lambda v: v[2].update(enCap="one caption"))
  with pytest.raises(TaskDataError, match=r"training_v1.0.json\[2\]: field 'enCap' is str"):
    video_tasks.VATEX.load(str(tmp_path))
  rewrite_json(train, lambda v: v[2].update(enCap=[]))
  with pytest.raises(TaskDataError, match=r"\[2\]: field 'enCap' must be a non-empty list"):
    video_tasks.VATEX.load(str(tmp_path))
  with open(train, "w") as f:
    f.write("{not json")
  with pytest.raises(TaskDataError, match="not valid JSON"):
    video_tasks.VATEX.load(str(tmp_path))
  with open(train, "w") as f:
    json.dump({"videoID": "x"}, f)
  with pytest.raises(TaskDataError, match="expected a list of clips"):
    video_tasks.VATEX.load(str(tmp_path))
  vf.make_vatex(str(tmp_path))
  os.rename(os.path.join(root, "videos"), os.path.join(root, "clips"))
  with pytest.raises(TaskDataError, match="missing .the video folder.") as e:
    video_tasks.VATEX.load(str(tmp_path))
  assert os.path.join(root, "videos") in str(e.value)


def test_corrupt_video_fails_when_loaded_naming_the_file(tmp_path):
  root = vf.make_msvd_qa(str(tmp_path))
  clip = os.path.join(root, "YouTubeClips", vf.MSVD_CLIPS[3] + ".avi")
  with open(clip, "wb") as f:
    f.write(os.urandom(2000))
  data = video_tasks.MSVD_QA.load(str(tmp_path))  # lazily: reading the files decodes nothing
  # (random bytes now and then parse as a container holding no video stream: either error)
  with pytest.raises(VideoDecodeError, match="unreadable video|no video stream") as e:
    data.test[0].media.load(lambda image: image.astype(np.float32))
  assert clip in str(e.value)
