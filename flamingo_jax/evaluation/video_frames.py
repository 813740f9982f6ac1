"""Video files → a fixed number of RGB frames, sampled as the Flamingo paper evaluates.

The paper evaluates video tasks on 30 frames at 3 FPS (its temporal embeddings, learned on
8 frames at 1 FPS, are linearly interpolated; the model takes any frame count). MSVD,
MSR-VTT and VATEX clips are ~10 s, so 30 frames is 3 FPS on them; a FIXED count (rather
than a fixed rate) gives every video of a batch the same shape. So:

  `sample_frames(path, num_frames=30) -> uint8 [num_frames, H, W, 3]`

takes the midpoints of `num_frames` equal segments of the clip's duration and, for each,
the frame on screen at that time (the last frame starting at or before it; the first frame
for a time before every frame). A clip with fewer frames than asked, or whose frames end
before its stated duration, repeats frames (the nearest one); it never fails for that.

One sequential decoding pass, stopped at the last timestamp; only the chosen frames are
converted to RGB (the conversion costs more than decoding these small clips). A packet the
decoder rejects is skipped, as players do. A file that cannot be opened, has no video
stream or decodes to no frame raises VideoDecodeError (a TaskDataError) naming it.

`VideoFile(path, num_frames)` is the lazy media the video tasks hold: `load(preprocess)`
applies the image preprocessing to every sampled frame → float32 [F, h, w, 3].
"""
import dataclasses
from fractions import Fraction

import numpy as np

from flamingo_jax.evaluation.tasks.base import Preprocess, TaskDataError

NUM_FRAMES = 30  # paper: 30 frames at 3 FPS at inference


class VideoDecodeError(TaskDataError):
  """A video file that cannot be read; the message names the file."""


def sample_frames(path: str, num_frames: int = NUM_FRAMES) -> np.ndarray:
  """uint8 [num_frames, H, W, 3]: the frames on screen at the midpoints of `num_frames`
  equal segments of the clip (see the module docstring)."""
  import av
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  try:
    container = av.open(path)
  except av.error.FileNotFoundError as e:
    raise VideoDecodeError(f"{path}: missing video file") from e
  except (av.error.FFmpegError, OSError) as e:
    raise VideoDecodeError(f"{path}: unreadable video ({e})") from e
  with container:
    if not container.streams.video:
      raise VideoDecodeError(f"{path}: no video stream")
    stream = container.streams.video[0]
    duration = _duration(container, stream)
    if duration is None:  # no duration in the headers: read the packet times (no decoding)
      with av.open(path) as scan:
        duration = _scanned_duration(scan, scan.streams.video[0])
    stream.thread_type = "AUTO"  # frame-parallel decoding: HD VATEX clips decode much faster
    targets = (np.arange(num_frames) + 0.5) * (duration or 0.0) / num_frames
    chosen: list[np.ndarray | None] = [None] * num_frames
    size = None  # every chosen frame is scaled to the first's size, should a stream change it
    last, last_rgb = None, None  # the most recent frame converted (consecutive targets reuse it)

    def rgb(frame):
      nonlocal size, last, last_rgb
      if frame is not last:
        size = size or (frame.width, frame.height)
        last, last_rgb = frame, frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
      return last_rgb

    k, previous = 0, None
    for frame, t in _frames(container, stream):
      # Targets before this frame starts were on screen during the previous frame.
      while k < num_frames and t > targets[k]:
        chosen[k] = rgb(previous if previous is not None else frame)
        k += 1
      if k == num_frames:
        break
      previous = frame
    if previous is None and k == 0:
      raise VideoDecodeError(f"{path}: no decodable video frame")
    for j in range(k, num_frames):  # past the last frame: it stays on screen
      chosen[j] = rgb(previous)
  return np.stack(chosen)


def _seconds(value, time_base) -> float | None:
  if value is None or time_base is None:
    return None
  return float(value * time_base)


def _duration(container, stream) -> float | None:
  """The video stream's duration in seconds from the headers, else None."""
  import av
  d = _seconds(stream.duration, stream.time_base)
  if d and d > 0:
    return d
  if container.duration and container.duration > 0:  # whole file (may include audio)
    return container.duration / av.time_base
  if stream.frames:
    return float(stream.frames / _rate(stream))
  return None


def _scanned_duration(container, stream) -> float | None:
  """The end of the last video packet, from a demuxing pass (no decoding); for a stream
  without timestamps (a raw .h264), its packet count over the frame rate."""
  import av
  period = 1 / _rate(stream)
  start, end, count = None, None, 0
  try:
    for packet in container.demux(stream):
      if packet.size == 0:  # the flush packet at the end
        continue
      count += 1
      if packet.pts is None or packet.time_base is None:
        continue
      s = packet.pts * packet.time_base
      e = s + (packet.duration * packet.time_base if packet.duration else period)
      start = s if start is None else min(start, s)
      end = e if end is None else max(end, e)
  except av.error.FFmpegError:  # a damaged tail: the packets read so far
    pass
  if end is None:
    return float(count * period) if count else None
  origin = stream.start_time * stream.time_base if stream.start_time is not None else start
  return float(end - origin)


def _rate(stream) -> Fraction:
  # FFmpeg's guess (av_guess_frame_rate) is right where the average is a default (raw h264).
  return Fraction(stream.guessed_rate or stream.average_rate or 25)


def _frames(container, stream):
  """(frame, seconds since the stream's start) in display order, skipping bad packets."""
  import av
  period = float(1 / _rate(stream))
  origin = _seconds(stream.start_time, stream.time_base)
  t = None
  packets = container.demux(stream)
  while True:
    try:
      packet = next(packets)
    except StopIteration:
      return
    except av.error.FFmpegError:  # the demuxer cannot go on (a truncated file): stop here
      return
    try:
      frames = packet.decode()
    except av.error.FFmpegError:  # one damaged packet: skip it
      continue
    for frame in frames:
      if frame.pts is not None and frame.time_base is not None:
        seconds = float(frame.pts * frame.time_base)
        if origin is None:
          origin = seconds
        t = seconds - origin
      else:  # no timestamp: one frame period after the previous frame
        t = 0.0 if t is None else t + period
        if origin is None:
          origin = 0.0
      yield frame, t


@dataclasses.dataclass(frozen=True)
class VideoFile:
  """A video on disk, decoded only when loaded."""
  path: str
  num_frames: int = NUM_FRAMES

  def load(self, preprocess: Preprocess) -> np.ndarray:
    frames = sample_frames(self.path, self.num_frames)
    return np.stack([np.asarray(preprocess(f), np.float32) for f in frames])
