"""Readers of the raw training sources users have, as generators of clean records.

Every record carries a stable id — `file:line` for jsonl/csv, `tarfile:key` for
WebDataset shards — used as its storage key and in every error message. A record that
cannot be used is skipped: counted by reason in a `Skips` and listed there (file, line or
member, reason, detail); an image that cannot be used inside an MMC4 document that is
kept is counted apart (`Skips.image_counts`) and listed with its index. With
`strict=True` the first failure raises `RawDataError` naming the file and record instead.

Relative image paths (mmc4's `image_name`, the pairs table's image column) are looked up
in `images_dir` when given, else beside the jsonl / csv and then in an `images/` folder
next to it; a missing image's detail names every place looked. Files are opened through
etils epath, so tables, shards and images may be in a bucket (`gs://...`); video files
are decoded by PyAV from local disk.

Kinds and the records they yield (images are re-encoded image bytes, never pixels):
  mmc4        {"id", "sentences": [str], "images": [bytes], "image_sentence": int32[N]
               (the sentence each image goes before: the assignment, see read_mmc4),
               "image_sim": float32[N] (its similarity), "similarity": float32[N * S]
               (the kept images' rows of the image × sentence similarity matrix, row-major,
               when the document has one; else empty)}
  webdataset  {"id", "image": bytes, "caption": str}     (tar shards: KEY.jpg + KEY.txt/.json)
  pairs       {"id", "image": bytes, "caption": str}     (jsonl or csv of image path, caption)
  video       {"id", "frames": [bytes], "caption": str}  (video files via PyAV: `num_frames`
               frames at `fps`; or a folder of frame images)

Skip reasons (the keys of `Skips.counts`): invalid_utf8, bad_json, bad_csv, missing_field,
empty_text, image_missing, image_corrupt, no_usable_image (mmc4), text_index_out_of_range
(mmc4), missing_image / missing_caption (webdataset: a key without one of its members),
tar_error, video_unreadable, video_no_frames, image_unmatched (mmc4). `Skips.counts`
counts records only (so kept + its sum = the records read); for mmc4, image_missing,
image_corrupt, missing_field, image_unmatched and text_index_out_of_range of images
dropped from a kept document are in `Skips.image_counts`, and a document left with no
image is one `no_usable_image` record whose detail says what happened to each image.
A tar shard that breaks midway (tar_error) and a csv whose header is not UTF-8 count as
one record each: what follows them is not read.
"""
import base64
import binascii
import collections
import csv
import functools
import glob
import io
import json
import os
import re
import tarfile
import threading
from typing import Iterable, Iterator

from etils import epath
import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "gif")


class RawDataError(ValueError):
  """A bad raw record in strict mode; the message names the file and the record."""

  def __init__(self, record_id: str, reason: str, detail: str = ""):
    self.record_id, self.reason, self.detail = record_id, reason, detail
    super().__init__(f"{record_id}: {reason}" + (f": {detail}" if detail else ""))

  def __reduce__(self):  # crosses process boundaries (parallel preparation)
    return RawDataError, (self.record_id, self.reason, self.detail)


def location(record_id: str) -> dict:
  """A record id as {"file", "line"} (jsonl / csv), {"file", "member"} (a tar shard's key)
  or {"file"}; an image inside an MMC4 document adds {"image": index}."""
  out = {}
  rid, sep, image = record_id.rpartition(": image ")
  if sep and image.isdigit():
    record_id, out["image"] = rid, int(image)
  path, sep, where = record_id.rpartition(":")
  if not sep or not path:
    return {"file": record_id, **out}
  return {"file": path, **({"line": int(where)} if where.isdigit() else {"member": where}), **out}


class Skips:
  """Skipped records (and images dropped from kept MMC4 documents): counted by reason and
  listed, each as {"id", "file", "line" or "member", ["image"], "reason", "detail"}, to
  the `log` file (one JSON object a line) or, without one, in `entries`. Raises
  RawDataError on the first failure when `strict`."""

  def __init__(self, strict: bool = False, log=None):
    self.strict, self._log = strict, log
    self.counts: collections.Counter = collections.Counter()  # records
    self.image_counts: collections.Counter = collections.Counter()  # images of kept documents
    self.entries: list[dict] = []
    self._lock = threading.Lock()  # rows are read in a pool's feeder thread

  def __call__(self, record_id: str, reason: str, detail: str = "") -> None:
    """A skipped record."""
    if self.strict:
      raise RawDataError(record_id, reason, detail)
    self.add([_entry(record_id, reason, detail, image=False)])

  def image(self, image_id: str, reason: str, detail: str = "") -> None:
    """An image dropped from a document that is kept."""
    if self.strict:
      raise RawDataError(image_id, reason, detail)
    self.add([_entry(image_id, reason, detail, image=True)])

  def add(self, entries: list[dict]) -> None:
    with self._lock:
      for e in entries:
        (self.image_counts if "image" in e else self.counts)[e["reason"]] += 1
        if self._log is not None:
          self._log.write(json.dumps(e) + "\n")
        else:
          self.entries.append(e)

  @property
  def records(self) -> int:
    """Records skipped."""
    return sum(self.counts.values())

  def as_dict(self) -> dict:
    return dict(sorted(self.counts.items()))

  def images_as_dict(self) -> dict:
    return dict(sorted(self.image_counts.items()))


def _entry(record_id: str, reason: str, detail: str, *, image: bool) -> dict:
  where = location(record_id)
  if not image:
    where.pop("image", None)
  return {"id": record_id, **where, "reason": reason, "detail": detail}


class BadRecord(Exception):
  """Raised while making a record: skipped and counted under `reason`."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(detail)
    self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------------
# Images.

def encode_image(data: bytes, *, max_size: int = 0, fmt: str = "jpeg", quality: int = 95) -> bytes:
  """Decodes `data` fully (so a truncated or corrupt file fails here, not in training),
  converts to RGB, shrinks so the longer side is <= max_size (0: never), re-encodes."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      im = im.convert("RGB")
  except Exception as e:  # PIL raises many types for bad data
    # (without PIL's "<_io.BytesIO object at 0x...>": the same detail in every process)
    detail = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", " the data", str(e))
    raise BadRecord("image_corrupt", f"{type(e).__name__}: {detail}") from None
  return _encode_pil(im, max_size=max_size, fmt=fmt, quality=quality)


def _encode_pil(im: Image.Image, *, max_size: int, fmt: str, quality: int) -> bytes:
  if max_size and max(im.size) > max_size:
    scale = max_size / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                   Image.BICUBIC)
  out = io.BytesIO()
  if fmt == "jpeg":
    im.save(out, format="JPEG", quality=quality)
  elif fmt == "png":
    im.save(out, format="PNG")
  else:
    raise ValueError(f"image format {fmt!r}: 'jpeg' or 'png'")
  return out.getvalue()


def _read_file(path: str) -> bytes:
  try:
    return epath.Path(path).read_bytes()
  except OSError as e:
    raise BadRecord("image_missing", f"{path}: {e.strerror or e}") from None


def _is_abs(path: str) -> bool:
  return os.path.isabs(path) or "://" in path  # gs://bucket/... is absolute too


def _resolve(path: str, base_dir: str) -> str:
  return path if _is_abs(path) else os.path.join(base_dir, path)


def image_dirs(table_path: str, images_dir: str | None) -> tuple[str, ...]:
  """Where a table's relative image paths are looked up, in order: `images_dir` when
  given; else the table's folder, then the `images/` folder next to it."""
  if images_dir:
    return (images_dir,)
  here = os.path.dirname(table_path)
  return (here, os.path.join(here, "images"))


def _read_image(name: str, dirs: tuple[str, ...]) -> bytes:
  """The bytes of image `name` (absolute, or relative to the first of `dirs` holding it)."""
  if _is_abs(name):
    return _read_file(name)
  for d in dirs:
    path = os.path.join(d, name)
    if epath.Path(path).is_file():
      return _read_file(path)
  raise BadRecord("image_missing", f"{name!r} not found; looked in " +
                  ", ".join(os.path.join(d, "") for d in dirs) +
                  ("" if len(dirs) == 1 else " (set --images-dir for another folder)"))


# ---------------------------------------------------------------------------------------
# Line-oriented files (jsonl, csv): bytes → UTF-8 → rows, each with its `file:line` id.

def expand_inputs(inputs: str | Iterable[str], exts: tuple[str, ...]) -> list[str]:
  """Files named by a path, a directory (its files with one of `exts`, sorted) or a glob."""
  paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
  out = []
  for p in map(str, paths):
    path = epath.Path(p)
    if path.is_dir():
      out += sorted(os.path.join(p, f.name) for f in path.iterdir()
                    if f.name.lower().rsplit(".", 1)[-1] in exts)
    elif any(c in p for c in "*?["):
      if "://" in p:  # a bucket: its own glob, from the first folder with a wildcard
        head, rest = p.split("://", 1)
        parts = rest.split("/")
        k = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
        root = epath.Path(f"{head}://" + "/".join(parts[:k]))
        out += sorted(os.fspath(f) for f in root.glob("/".join(parts[k:])))
      else:
        out += sorted(glob.glob(p))
    elif path.exists():
      out.append(p)
    else:
      raise FileNotFoundError(f"input {p!r} does not exist")
  if not out:
    raise FileNotFoundError(f"no input files ({', '.join(exts)}) in {paths}")
  return out


def _jsonl_rows(path: str, skip: Skips) -> Iterator[tuple[str, dict]]:
  with epath.Path(path).open("rb") as f:
    for n, raw in enumerate(f, 1):
      rid = f"{path}:{n}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        skip(rid, "invalid_utf8", str(e))
        continue
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        skip(rid, "bad_json", str(e))
        continue
      if not isinstance(row, dict):
        skip(rid, "bad_json", f"expected an object, got {type(row).__name__}")
        continue
      yield rid, row


def _csv_rows(path: str, skip: Skips) -> Iterator[tuple[str, dict]]:
  """Rows of a csv with a header line (one record per line: no newlines inside cells)."""
  header = None
  with epath.Path(path).open("rb") as f:
    for n, raw in enumerate(f, 1):
      rid = f"{path}:{n}"
      try:
        line = raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError as e:
        skip(rid, "invalid_utf8", str(e) + (" (the header: the whole file is skipped)"
                                            if header is None else ""))
        if header is None:
          return
        continue
      if not line.strip():
        continue
      try:
        cells = next(csv.reader([line]))
      except csv.Error as e:
        skip(rid, "bad_csv", str(e))
        continue
      if header is None:
        header = cells
        continue
      if len(cells) != len(header):
        skip(rid, "bad_csv", f"{len(cells)} cells, the header has {len(header)}")
        continue
      yield rid, dict(zip(header, cells))


def table_rows(path: str, skip: Skips) -> Iterator[tuple[str, dict]]:
  return _csv_rows(path, skip) if path.lower().endswith(".csv") else _jsonl_rows(path, skip)


def _text_field(row: dict, names: tuple[str, ...]) -> str:
  for k in names:
    if k in row:
      v = row[k]
      if not isinstance(v, str):
        raise BadRecord("missing_field", f"{k!r} is a {type(v).__name__}, not a string")
      if not v.strip():
        raise BadRecord("empty_text", f"{k!r} is empty")
      return v
  raise BadRecord("missing_field", f"none of {list(names)} in the record")


# ---------------------------------------------------------------------------------------
# MMC4.

def read_mmc4(inputs, *, images_dir: str | None = None, skip: Skips | None = None,
              sim_threshold: float = 0.24, one_to_one: bool = True, max_image_size: int = 0,
              image_format: str = "jpeg", num_workers: int = 0) -> Iterator[dict]:
  """MMC4 documents (jsonl shards): `text_list`, `image_info` [{`matched_text_index`,
  `matched_sim`, and `image_name` (relative to images_dir; default: the shard's folder
  or the `images/` folder next to it) or `image_base64`}], optionally `similarity_matrix` [images][sentences].

  Images are placed before a sentence by `interleaved.assign_images_to_sentences`
  (OpenFlamingo's recipe: one-to-one Hungarian matching, kept when the similarity is
  >= sim_threshold) on the document's similarity matrix; without one, on a matrix that
  holds only each image's matched_text_index / matched_sim. Unplaced images are dropped
  (reason image_unmatched)."""
  def rows(skip):
    for path in expand_inputs(inputs, ("jsonl", "json")):
      dirs = image_dirs(path, images_dir)
      for rid, doc in _jsonl_rows(path, skip):
        yield rid, (doc, dirs)
  return records(rows, functools.partial(
      _mmc4_doc, sim_threshold=sim_threshold, one_to_one=one_to_one,
      max_image_size=max_image_size, image_format=image_format), skip, num_workers)


def _mmc4_doc(rid, item, skip, *, sim_threshold, one_to_one, max_image_size,
              image_format) -> dict:
  from flamingo_jax.data.interleaved import assign_images_to_sentences
  doc, dirs = item
  sentences, infos = doc.get("text_list"), doc.get("image_info")
  if not isinstance(sentences, list) or not isinstance(infos, list):
    raise BadRecord("missing_field", "needs lists 'text_list' and 'image_info'")
  if not all(isinstance(s, str) for s in sentences):
    raise BadRecord("missing_field", "'text_list' holds a non-string")
  if not any(s.strip() for s in sentences):
    raise BadRecord("empty_text", "every sentence is empty")
  sim_matrix = doc.get("similarity_matrix")
  images, matched, sims, sim_rows = [], [], [], []
  dropped = []  # (image id, reason, detail): counted only if the document is kept

  def drop(iid, reason, detail):
    if skip.strict:
      skip.image(iid, reason, detail)  # raises
    dropped.append((iid, reason, detail))

  for j, info in enumerate(infos):
    iid = f"{rid}: image {j}"
    try:
      if not isinstance(info, dict):
        raise BadRecord("missing_field", "image_info entry is not an object")
      t = info.get("matched_text_index")
      if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < len(sentences):
        raise BadRecord("text_index_out_of_range",
                   f"matched_text_index={t!r}, the document has {len(sentences)} sentences")
      if info.get("image_base64") is not None or info.get("base64") is not None:
        try:
          data = base64.b64decode(info.get("image_base64") or info.get("base64"), validate=True)
        except (binascii.Error, TypeError, ValueError) as e:
          raise BadRecord("image_corrupt", f"bad base64: {e}") from None
      elif isinstance(info.get("image_name"), str):
        data = _read_image(info["image_name"], dirs)
      else:
        raise BadRecord("image_missing", "neither 'image_name' nor 'image_base64'")
      encoded = encode_image(data, max_size=max_image_size, fmt=image_format)
      sim = float(info.get("matched_sim", 1.0))
    except (BadRecord, TypeError, ValueError) as e:
      if not isinstance(e, BadRecord):
        e = BadRecord("missing_field", f"{type(e).__name__}: {e}")
      drop(iid, e.reason, e.detail)
      continue
    images.append((j, encoded))
    matched.append(t)
    sims.append(sim)
    if isinstance(sim_matrix, list) and j < len(sim_matrix):
      sim_rows.append(sim_matrix[j])
  if not images:
    raise BadRecord("no_usable_image", _dropped_detail(
        f"none of its {len(infos)} images could be used", dropped))

  similarity, from_doc = None, False
  if isinstance(sim_matrix, list) and len(sim_rows) == len(images):
    try:
      m = np.asarray(sim_rows, np.float32)
      if m.shape == (len(images), len(sentences)) and np.isfinite(m).all():
        similarity, from_doc = m, True
    except (TypeError, ValueError):
      pass  # a malformed matrix: fall back to matched_text_index
  if similarity is None:  # only the matched pairs are candidates
    similarity = np.full((len(images), len(sentences)), -1e6, np.float32)
    similarity[np.arange(len(images)), matched] = sims
  where = assign_images_to_sentences(similarity, sim_threshold, one_to_one)
  kept = [k for k, w in enumerate(where) if w is not None]
  for k, w in enumerate(where):
    if w is None:
      drop(f"{rid}: image {images[k][0]}", "image_unmatched",
           f"not placed (similarity threshold {sim_threshold}, one_to_one={one_to_one})")
  if not kept:
    raise BadRecord("no_usable_image", _dropped_detail("no image placed before a sentence", dropped))
  for d in dropped:
    skip.image(*d)
  return {"id": rid, "sentences": sentences, "images": [images[k][1] for k in kept],
          "image_sentence": np.asarray([where[k] for k in kept], np.int32),
          "image_sim": similarity[kept, np.asarray([where[k] for k in kept])].astype(np.float32),
          "similarity": (similarity[kept].reshape(-1) if from_doc
                         else np.zeros((0,), np.float32))}


def _dropped_detail(what: str, dropped) -> str:
  return what + "".join(f"; image {iid.rsplit(' ', 1)[-1]}: {reason} ({detail})"
                        for iid, reason, detail in dropped)


# ---------------------------------------------------------------------------------------
# WebDataset shards of image-text pairs.

def _wds_key(name: str) -> tuple[str, str]:
  """'dir/000123.jpg' → ('dir/000123', 'jpg'); the key ends at the basename's first dot."""
  d, b = os.path.split(name)
  stem, _, ext = b.partition(".")
  return os.path.join(d, stem) if d else stem, ext.lower()


def read_webdataset(inputs, *, skip: Skips | None = None, caption_fields=("caption", "text"),
                    max_image_size: int = 0, image_format: str = "jpeg",
                    num_workers: int = 0) -> Iterator[dict]:
  """Pairs from WebDataset tar shards. Members are grouped by key as WebDataset does
  (consecutive members sharing a key); a group's image is only ever paired with the
  caption of the same group, from KEY.txt or a caption field of KEY.json."""
  def rows(skip):
    for path in expand_inputs(inputs, ("tar",)):
      yield from _tar_groups(path, skip)
  return records(rows, functools.partial(
      _wds_pair, caption_fields=caption_fields, max_image_size=max_image_size,
      image_format=image_format), skip, num_workers)


def _tar_groups(path: str, skip: Skips) -> Iterator[tuple[str, dict]]:
  key, members = None, {}
  try:
    with epath.Path(path).open("rb") as shard, tarfile.open(fileobj=shard, mode="r:*") as tar:
      for m in tar:
        if not m.isfile():
          continue
        k, ext = _wds_key(m.name)
        if k != key:
          if key is not None:
            yield f"{path}:{key}", members
          key, members = k, {}
        f = tar.extractfile(m)
        members[ext] = f.read() if f is not None else b""
  except (tarfile.TarError, OSError, EOFError) as e:
    skip(f"{path}:{key or '<start>'}", "tar_error", f"{type(e).__name__}: {e}")
    return  # what follows a broken tar cannot be located reliably
  if key is not None:
    yield f"{path}:{key}", members


def _wds_pair(rid, members, skip, *, caption_fields, max_image_size, image_format) -> dict:
  image_ext = next((e for e in IMAGE_EXTS if e in members), None)
  if image_ext is None:
    raise BadRecord("missing_image", f"members {sorted(members)} hold no image")
  if "txt" in members:
    try:
      caption = members["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecord("invalid_utf8", f".txt: {e}") from None
    if not caption.strip():
      raise BadRecord("empty_text", ".txt is empty")
  elif "json" in members:
    try:
      meta = json.loads(members["json"].decode("utf-8"))
    except UnicodeDecodeError as e:
      raise BadRecord("invalid_utf8", f".json: {e}") from None
    except json.JSONDecodeError as e:
      raise BadRecord("bad_json", f".json: {e}") from None
    if not isinstance(meta, dict):
      raise BadRecord("bad_json", ".json is not an object")
    caption = _text_field(meta, tuple(caption_fields))
  else:
    raise BadRecord("missing_caption", f"members {sorted(members)} hold no .txt or .json")
  return {"id": rid, "image": encode_image(members[image_ext], max_size=max_image_size,
                                           fmt=image_format), "caption": caption}


# ---------------------------------------------------------------------------------------
# A folder of images + a jsonl or csv of (image path, caption).

def read_pairs(inputs, *, images_dir: str | None = None, skip: Skips | None = None,
               image_fields=("image", "image_path", "file", "filename", "path"),
               caption_fields=("caption", "text"), max_image_size: int = 0,
               image_format: str = "jpeg", num_workers: int = 0) -> Iterator[dict]:
  return records(functools.partial(_table_items, inputs, images_dir, images=True), functools.partial(
      _pair, image_fields=image_fields, caption_fields=caption_fields,
      max_image_size=max_image_size, image_format=image_format), skip, num_workers)


def _table_items(inputs, base_dir, skip, *, images=False):
  """(id, (row, the base of its relative paths)) for every row of jsonl / csv tables;
  with `images`, the base is the tuple of folders `image_dirs` gives."""
  for path in expand_inputs(inputs, ("jsonl", "json", "csv")):
    base = image_dirs(path, base_dir) if images else base_dir or os.path.dirname(path)
    for rid, row in table_rows(path, skip):
      yield rid, (row, base)


def _pair(rid, item, skip, *, image_fields, caption_fields, max_image_size, image_format):
  row, dirs = item
  image_path = _text_field(row, tuple(image_fields))
  caption = _text_field(row, tuple(caption_fields))
  data = _read_image(image_path, dirs)
  return {"id": rid, "image": encode_image(data, max_size=max_image_size, fmt=image_format),
          "caption": caption}


# ---------------------------------------------------------------------------------------
# Video–text: a jsonl or csv of (video file or folder of frames, caption).

def sample_video(path: str, *, num_frames: int = 8, fps: float = 1.0) -> list[Image.Image]:
  """Up to `num_frames` frames at `fps`: the first frame at or after t = 0, 1/fps, 2/fps, …
  (fewer when the video is shorter). Raises BadRecord('video_unreadable') for what PyAV cannot
  open or decode."""
  import av  # PyAV; imported here so the other kinds work without it
  frames: list[Image.Image] = []
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise BadRecord("video_unreadable", "no video stream")
      stream = container.streams.video[0]
      tb = stream.time_base
      next_t = 0.0
      for frame in container.decode(stream):
        t = float(frame.pts * tb) if frame.pts is not None and tb is not None else frame.time
        if t is None:
          t = next_t
        if t + 1e-6 >= next_t:
          frames.append(frame.to_image())
          next_t += 1.0 / fps
          if len(frames) == num_frames:
            break
  except BadRecord:
    raise
  except Exception as e:  # av.error.* and OSError for unreadable or corrupt files
    raise BadRecord("video_unreadable", f"{type(e).__name__}: {e}") from None
  return frames


def frame_folder(path: str, *, num_frames: int = 8) -> list[bytes]:
  """The folder's images in name order; when there are more than `num_frames`, that many
  evenly spaced ones (the folder is taken to hold frames already sampled in time)."""
  names = sorted(f.name for f in epath.Path(path).iterdir()
                 if f.name.lower().rsplit(".", 1)[-1] in IMAGE_EXTS)
  if len(names) > num_frames:
    names = [names[i] for i in np.linspace(0, len(names) - 1, num_frames).round().astype(int)]
  return [_read_file(os.path.join(path, n)) for n in names]


def read_video(inputs, *, videos_dir: str | None = None, skip: Skips | None = None,
               video_fields=("video", "video_path", "frames", "path", "file"),
               caption_fields=("caption", "text"), num_frames: int = 8, fps: float = 1.0,
               max_image_size: int = 0, image_format: str = "jpeg",
               num_workers: int = 0) -> Iterator[dict]:
  return records(functools.partial(_table_items, inputs, videos_dir), functools.partial(
      _clip, video_fields=video_fields, caption_fields=caption_fields, num_frames=num_frames,
      fps=fps, max_image_size=max_image_size, image_format=image_format), skip, num_workers)


def _clip(rid, item, skip, *, video_fields, caption_fields, num_frames, fps, max_image_size,
          image_format):
  row, base = item
  video = _resolve(_text_field(row, tuple(video_fields)), base)
  caption = _text_field(row, tuple(caption_fields))
  if epath.Path(video).is_dir():
    frames = [encode_image(b, max_size=max_image_size, fmt=image_format)
              for b in frame_folder(video, num_frames=num_frames)]
  elif os.path.exists(video):
    frames = [_encode_pil(im.convert("RGB"), max_size=max_image_size, fmt=image_format,
                          quality=95)
              for im in sample_video(video, num_frames=num_frames, fps=fps)]
  else:
    raise BadRecord("video_unreadable", f"{video} does not exist")
  if not frames:
    raise BadRecord("video_no_frames", f"{video} gave no frames")
  return {"id": rid, "frames": frames, "caption": caption}


# ---------------------------------------------------------------------------------------
# Rows → records, here or in worker processes.

def records(rows, make_record, skip: Skips | None, num_workers: int) -> Iterator[dict]:
  """`make_record(id, item, skip)` over `rows(skip)` (cheap: lines, tar members), in
  order. With num_workers > 0 the records (decoding and re-encoding images: the
  expensive part) are made in that many processes; the output, the skip counts and the
  strict-mode error are the same as in one process."""
  skip = skip if skip is not None else Skips()
  if num_workers <= 0:
    for rid, item in rows(skip):
      try:
        yield make_record(rid, item, skip)
      except BadRecord as e:
        skip(rid, e.reason, e.detail)
    return
  import multiprocessing
  work = functools.partial(_record_in_worker, make_record, skip.strict)
  # spawn: the parent may hold threads (the pool's own, TFDS's) that fork would copy.
  with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
    for record, entries, failure in pool.imap(work, rows(skip), chunksize=4):
      skip.add(entries)
      if failure is not None:
        skip(*failure)  # strict: raises here, naming the record
      else:
        yield record


def _record_in_worker(make_record, strict: bool, row):
  rid, item = row
  skip = Skips(strict)
  try:
    return make_record(rid, item, skip), skip.entries, None
  except RawDataError as e:  # strict, inside the record (an MMC4 document's image)
    return None, skip.entries, (e.record_id, e.reason, e.detail)
  except BadRecord as e:
    return None, skip.entries, (rid, e.reason, e.detail)


READERS = {"mmc4": read_mmc4, "webdataset": read_webdataset, "pairs": read_pairs,
           "video": read_video}
