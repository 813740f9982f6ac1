"""Tiny videos (PyAV) and the video tasks' release files, for the video evaluation tests.

Every frame is one solid colour encoding a code 0..511 in three base-8 digits, 32 apart
per channel (lossy codecs move a solid colour by a few levels, far below 16), so a test
reads back which frame of which video it got: code = 64 * video + frame index.
"""
import os

import av
import numpy as np

from eval_fixtures import write_json

SIZE = 32  # even: h264 / yuv420p need even sides
FPS = 4


def colour(code: int) -> tuple[int, int, int]:
  assert 0 <= code < 512
  return (16 + 32 * (code % 8), 16 + 32 * (code // 8 % 8), 16 + 32 * (code // 64))


def code_of(frame) -> int:
  """The code of one solid frame: [H, W, 3] pixels in uint8 range."""
  r, g, b = (int(round((np.asarray(frame, np.float64)[..., c].mean() - 16) / 32)) for c in range(3))
  return r + 8 * g + 64 * b


def codes_of(frames) -> list[int]:
  return [code_of(f) for f in frames]


def frame_codes(video: int, num_frames: int) -> list[int]:
  """The codes of video number `video`'s frames (video < 8, frames < 64)."""
  assert 0 <= video < 8 and 0 < num_frames <= 64
  return [64 * video + i for i in range(num_frames)]


def write_video(path: str, codes, fps: int = FPS, codec: str | None = None, fmt=None) -> str:
  """A SIZE×SIZE video whose frame i is colour(codes[i]); mpeg4 for .avi, else h264."""
  codec = codec or ("mpeg4" if path.endswith(".avi") else
                    "h264" if "h264" in av.codecs_available else "mpeg4")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with av.open(path, "w", format=fmt) as out:
    stream = out.add_stream(codec, rate=fps)
    stream.width = stream.height = SIZE
    stream.pix_fmt = "yuv420p"
    for c in codes:
      image = np.empty((SIZE, SIZE, 3), np.uint8)
      image[:] = colour(c)
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  return path


def _mux_silence(out, audio) -> None:
  frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                     layout="mono")
  frame.sample_rate = 8000
  for packet in [*audio.encode(frame), *audio.encode()]:
    out.mux(packet)


def write_video_without_frames(path: str) -> str:
  """An .avi with a video stream that has no frame (and audio, so that it is written)."""
  with av.open(path, "w") as out:
    video = out.add_stream("mpeg4", rate=FPS)
    video.width = video.height = SIZE
    video.pix_fmt = "yuv420p"
    _mux_silence(out, out.add_stream("aac", rate=8000))
  return path


def write_audio_only(path: str) -> str:
  """An .mp4 with no video stream at all."""
  with av.open(path, "w", format="mp4") as out:
    _mux_silence(out, out.add_stream("aac", rate=8000))
  return path


# MSVD-QA: video_id N is the clip on the `vid<N>` line of youtube_mapping.txt. The lines are
# not in N order and vid4 has no clip and no question, as a reader must not care.
MSVD_CLIPS = {1: "-4wsuPCjDBc_5_15", 3: "zv2RIbUsnSw_335_341", 2: "_0nX-El-ySo_83_93"}
MSVD_TRAIN = [
    {"answer": "egg", "id": 0, "question": "what is a woman cracking?", "video_id": 1},
    {"answer": "man", "id": 1, "question": "who is playing a guitar?", "video_id": 2},
    {"answer": "play", "id": 2, "question": "what does a man do?", "video_id": 2},
]
MSVD_TEST = [
    {"answer": "dog", "id": 30933, "question": "what is chewing on a nut?", "video_id": 3},
    {"answer": "cut", "id": 30934, "question": "what does a woman do to an onion?",
     "video_id": 1},
]
FRAMES_PER_CLIP = 12


def make_msvd_qa(data_dir: str) -> str:
  """data_dir/msvd_qa/ as the MSVD-QA release + MSVD YouTubeClips; video N has colour set N."""
  root = os.path.join(data_dir, "msvd_qa")
  write_json(os.path.join(root, "train_qa.json"), MSVD_TRAIN)
  write_json(os.path.join(root, "val_qa.json"), MSVD_TRAIN[:1])
  write_json(os.path.join(root, "test_qa.json"), MSVD_TEST)
  with open(os.path.join(root, "youtube_mapping.txt"), "w") as f:
    for n, clip in MSVD_CLIPS.items():
      f.write(f"{clip} vid{n}\n")
    f.write("a9Sm4XRUTv8_0_10 vid4\n")
  for n, clip in MSVD_CLIPS.items():
    write_video(os.path.join(root, "YouTubeClips", clip + ".avi"), frame_codes(n, FRAMES_PER_CLIP))
  return root


# MSRVTT-QA: video_id N → MSR-VTT's video<N>.mp4 (train/val 0..7009, test 7010..9999).
MSRVTT_TRAIN = [
    {"answer": "cartoon", "id": 0, "question": "what is shown?", "video_id": 0},
    {"answer": "sing", "id": 1, "question": "what is a girl doing?", "video_id": 6513},
]
MSRVTT_TEST = [
    {"answer": "car", "id": 158581, "question": "what is being driven?", "video_id": 7010},
    {"answer": "two", "id": 158582, "question": "how many men are talking?", "video_id": 7010},
]
MSRVTT_VIDEOS = {0: 1, 6513: 2, 7010: 3}  # video_id → colour set


def make_msrvtt_qa(data_dir: str, layout: str = "release") -> str:
  """data_dir/msrvtt_qa/: 'release' puts the videos in TrainValVideo/ and TestVideo/ (the
  MSR-VTT archives), 'all' in videos/all/, 'flat' in video/."""
  root = os.path.join(data_dir, "msrvtt_qa")
  write_json(os.path.join(root, "train_qa.json"), MSRVTT_TRAIN)
  write_json(os.path.join(root, "val_qa.json"), MSRVTT_TRAIN[1:])
  write_json(os.path.join(root, "test_qa.json"), MSRVTT_TEST)
  for n, colours in MSRVTT_VIDEOS.items():
    folder = {"release": "TrainValVideo" if n < 7010 else "TestVideo",
              "all": os.path.join("videos", "all"), "flat": "video"}[layout]
    write_video(os.path.join(root, folder, f"video{n}.mp4"), frame_codes(colours, FRAMES_PER_CLIP))
  return root


def _vatex_clip(i: int, split: str) -> dict:
  return {"videoID": f"Ab-cd_{i}fgh{split[:2]}_{10 * i:06d}_{10 * i + 10:06d}",
          "enCap": [f"{split} clip {i} caption {k}" for k in range(10)],
          "chCap": [f"{split} 片段 {i} 描述 {k}" for k in range(10)]}


VATEX_TRAIN = [_vatex_clip(i, "training") for i in range(3)]
VATEX_TEST = [_vatex_clip(i, "validation") for i in range(3)]


def make_vatex(data_dir: str, missing=()) -> str:
  """data_dir/vatex/; clips whose videoID is in `missing` get no file (gone from YouTube).
  Training clip i has colour set i + 1, validation clip i colour set i + 4."""
  root = os.path.join(data_dir, "vatex")
  write_json(os.path.join(root, "vatex_training_v1.0.json"), VATEX_TRAIN)
  write_json(os.path.join(root, "vatex_validation_v1.0.json"), VATEX_TEST)
  os.makedirs(os.path.join(root, "videos"), exist_ok=True)
  for offset, clips in ((1, VATEX_TRAIN), (4, VATEX_TEST)):
    for i, clip in enumerate(clips):
      if clip["videoID"] not in missing:
        write_video(os.path.join(root, "videos", clip["videoID"] + ".mp4"),
                    frame_codes(i + offset, FRAMES_PER_CLIP))
  return root
