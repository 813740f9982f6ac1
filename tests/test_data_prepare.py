"""Raw sources → prepared TFDS array_record datasets → training batches.

Every input is a tiny file written here, with ids in both pixels and text
(tests/data_files.py), so any image paired with another record's text is caught.
"""
import base64
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_files import (SMALL, caption, caption_ids, colour, id_of_image_bytes, id_of_pixels,
                        image_ids, jpeg)
from flamingo_jax.data import loader, prepare, prepared, raw


def write(path, data: bytes | str):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
  return str(path)


def jsonl(rows) -> bytes:
  return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def run_cli(capsys, *argv):
  assert prepare.main([str(a) for a in argv]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  return json.loads(last)


# ---------------------------------------------------------------------------------------
# Raw inputs.

def make_pairs(d):
  """images 0..7; pairs.jsonl with good rows 0..3 and bad rows; pairs.csv with 4..7."""
  for i in range(8):
    write(f"{d}/img/{i}.jpg", jpeg(i))
  write(f"{d}/img/corrupt.jpg", jpeg(99)[:40])
  rows = [{"image": f"img/{i}.jpg", "caption": caption(i)} for i in range(4)]
  rows += [{"image": "img/missing.jpg", "caption": "x"},          # image_missing
           {"image": "img/corrupt.jpg", "caption": "x"},          # image_corrupt
           {"image": "img/0.jpg", "caption": "  "},               # empty_text
           {"image": "img/0.jpg"},                                # missing_field
           b'{"image": "img/0.jpg", "caption": "caf\xe9"}',       # invalid_utf8
           b"{not json"]                                          # bad_json
  write(f"{d}/pairs.jsonl", jsonl(rows))
  lines = ["image,caption"] + [f"img/{i}.jpg,{caption(i)}" for i in range(4, 8)]
  lines += ["img/missing.jpg,x", "img/1.jpg,a,b"]  # image_missing, bad_csv
  write(f"{d}/pairs.csv", "\n".join(lines) + "\n")
  return [f"{d}/pairs.jsonl", f"{d}/pairs.csv"]


PAIRS_SKIPPED = {"image_missing": 2, "image_corrupt": 1, "empty_text": 1, "missing_field": 1,
                 "invalid_utf8": 1, "bad_json": 1, "bad_csv": 1}


def make_webdataset(d):
  """Two shards; keys 0..5 good; a mismatched pair of members, a corrupt image, bad UTF-8."""
  def shard(path, members):
    with tarfile.open(path, "w") as tar:
      for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  os.makedirs(d, exist_ok=True)
  shard(f"{d}/shard-000.tar", [
      ("s/000.jpg", jpeg(0)), ("s/000.txt", caption(0).encode()),
      ("s/001.json", json.dumps({"caption": caption(1)}).encode()), ("s/001.jpg", jpeg(1)),
      ("s/002.jpg", jpeg(2)), ("s/002.txt", caption(2).encode()),
      ("s/050.jpg", jpeg(50)),                  # no caption of its own: missing_caption …
      ("s/051.txt", caption(50).encode()),      # … and this text's key has no image
      ("s/052.jpg", jpeg(52)[:50]), ("s/052.txt", b"truncated image"),  # image_corrupt
  ])
  shard(f"{d}/shard-001.tar", [
      ("s/003.jpg", jpeg(3)), ("s/003.txt", caption(3).encode()),
      ("s/053.jpg", jpeg(53)), ("s/053.txt", b"caf\xe9"),  # invalid_utf8
      ("s/004.png", _png(4)), ("s/004.json", json.dumps({"text": caption(4)}).encode()),
      ("s/005.jpg", jpeg(5)), ("s/005.txt", caption(5).encode()),
  ])
  return d


def _png(i):
  out = io.BytesIO()
  Image.new("RGB", (20, 30), colour(i)).save(out, format="PNG")
  return out.getvalue()


WDS_SKIPPED = {"missing_caption": 1, "missing_image": 1, "image_corrupt": 1, "invalid_utf8": 1}


def make_mmc4(d):
  """Documents 0..3 usable; the bad cases each once. Image k of doc i has id 10 i + k,
  and sentence j of doc i says `caption(10 i + j)`."""
  def doc(i, n_sent, images, **extra):
    return dict({"text_list": [caption(10 * i + j) for j in range(n_sent)],
                 "image_info": images}, **extra)
  def img(i, k, j, b64=False):
    write(f"{d}/images/{10 * i + k}.jpg", jpeg(10 * i + k))
    info = {"matched_text_index": j, "matched_sim": 0.3}
    if b64:
      info["image_base64"] = base64.b64encode(jpeg(10 * i + k)).decode()
    else:
      info["image_name"] = f"{10 * i + k}.jpg"
    return info
  docs = [
      doc(0, 3, [img(0, 0, 0), img(0, 1, 2)]),
      doc(1, 2, [img(1, 0, 1, b64=True)],
          similarity_matrix=[[0.1, 0.4]]),
      doc(2, 4, [img(2, 0, 3), {"matched_text_index": 9, "image_name": "0.jpg"}]),  # index out of range
      doc(3, 2, [img(3, 0, 0), {"matched_text_index": 1, "image_name": "nope.jpg"},  # image_missing
                 {"matched_text_index": 0, "image_base64": base64.b64encode(b"xx").decode()}]),  # corrupt
      doc(4, 2, [{"matched_text_index": 0, "image_name": "nope.jpg"}]),  # image_missing + no_usable_image
      {"text_list": ["", " "], "image_info": [img(5, 0, 0)]},  # empty_text
      # one-to-one: two images for sentence 0, the weaker one unmatched; one below 0.24
      doc(6, 2, [dict(img(6, 0, 0), matched_sim=0.5), dict(img(6, 1, 0), matched_sim=0.3),
                 dict(img(6, 2, 1), matched_sim=0.1)]),
      b'{"text_list": ["caf\xe9"], "image_info": []}',  # invalid_utf8
  ]
  write(f"{d}/docs.jsonl", jsonl(docs))
  return f"{d}/docs.jsonl", f"{d}/images"


# Records (documents 4, 5 and 7); the images dropped inside kept documents apart.
MMC4_SKIPPED = {"no_usable_image": 1, "empty_text": 1, "invalid_utf8": 1}
MMC4_DROPPED_IMAGES = {"text_index_out_of_range": 1, "image_missing": 1, "image_corrupt": 1,
                       "image_unmatched": 2}


def write_video(path, ids_per_second, fps=4, size=32):
  """A video whose second s shows the solid colour of id ids_per_second[s]."""
  import av
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(path, "w") as c:
    s = c.add_stream("mpeg4", rate=fps)
    s.width = s.height = size
    s.pix_fmt = "yuv420p"
    for i in ids_per_second:
      for _ in range(fps):
        f = av.VideoFrame.from_ndarray(
            np.array(Image.new("RGB", (size, size), colour(i))), format="rgb24")
        for p in s.encode(f):
          c.mux(p)
    for p in s.encode():
      c.mux(p)


def make_video(d):
  """Clip c (0..2) shows ids 10 c + s in second s; clip 3 is a folder of frames."""
  rows = []
  for c in range(3):
    write_video(f"{d}/v{c}.mp4", [10 * c + s for s in range(10)])
    rows.append({"video": f"v{c}.mp4", "caption": caption(c)})
  for s in range(3):
    write(f"{d}/frames3/{s:03d}.jpg", jpeg(30 + s))
  rows.append({"video": "frames3", "caption": caption(3)})
  write(f"{d}/broken.mp4", b"\x00\x00\x00 ftypisom" + b"garbage" * 20)
  rows += [{"video": "broken.mp4", "caption": "x"},        # video_unreadable
           {"video": "absent.mp4", "caption": "x"}]        # video_unreadable
  write(f"{d}/videos.jsonl", jsonl(rows))
  return f"{d}/videos.jsonl"


# ---------------------------------------------------------------------------------------
# prepare: summaries, strict mode, stored structure.

def read_all(path, kind):
  ds = prepared.PreparedDataset(path, kind)
  return [ds[i] for i in range(len(ds))]


def test_pairs_summary_and_records(tmp_path, capsys):
  inputs = make_pairs(tmp_path / "raw")
  summary = run_cli(capsys, "pairs", "--input", *inputs, "--output", tmp_path / "out")
  assert summary == {"read": 16, "kept": 8, "skipped": PAIRS_SKIPPED}
  records = read_all(tmp_path / "out", "pairs")
  assert sorted(id_of_image_bytes(r["image"]) for r in records) == list(range(8))
  for r in records:
    assert r["caption"] == caption(id_of_image_bytes(r["image"]))
    assert r["image"][:2] == b"\xff\xd8"  # re-encoded JPEG bytes, not pixels
    assert ".jsonl:" in r["id"] or ".csv:" in r["id"]
  assert json.load(open(tmp_path / "out" / "summary_pairs.json")) == summary


def test_webdataset_summary_and_pairing(tmp_path, capsys):
  d = make_webdataset(tmp_path / "raw")
  summary = run_cli(capsys, "webdataset", "--input", d, "--output", tmp_path / "out")
  assert summary == {"read": 10, "kept": 6, "skipped": WDS_SKIPPED}
  records = read_all(tmp_path / "out", "webdataset")
  assert sorted(id_of_image_bytes(r["image"]) for r in records) == list(range(6))
  for r in records:  # never another key's text, and never 50's text with 51's …
    i = id_of_image_bytes(r["image"])
    assert r["caption"] == caption(i), r
    assert r["id"].endswith(f"s/{i:03d}")


def test_mmc4_summary_and_structure(tmp_path, capsys):
  docs, images = make_mmc4(tmp_path / "raw")
  summary = run_cli(capsys, "mmc4", "--input", docs, "--images-dir", images,
                    "--output", tmp_path / "out")
  assert summary == {"read": 8, "kept": 5, "skipped": MMC4_SKIPPED,
                     "dropped_images": MMC4_DROPPED_IMAGES}
  by_line = {int(r["id"].rsplit(":", 1)[1]): r for r in read_all(tmp_path / "out", "mmc4")}
  assert sorted(by_line) == [1, 2, 3, 4, 7]
  assert [id_of_image_bytes(b) for b in by_line.pop(7)["images"]] == [60]
  for line, r in by_line.items():
    doc = line - 1
    assert r["sentences"] == [caption(10 * doc + j) for j in range(len(r["sentences"]))]
    ids = [id_of_image_bytes(b) for b in r["images"]]
    assert ids == [10 * doc + k for k in range(len(ids))]
  np.testing.assert_array_equal(by_line[1]["image_sentence"], [0, 2])
  np.testing.assert_array_equal(by_line[2]["similarity"], np.float32([0.1, 0.4]))
  assert by_line[1]["similarity"].size == 0
  assert len(by_line[3]["images"]) == 1 and len(by_line[4]["images"]) == 1


def test_video_summary_and_frames(tmp_path, capsys):
  summary = run_cli(capsys, "video", "--input", make_video(tmp_path / "raw"),
                    "--output", tmp_path / "out")
  assert summary == {"read": 6, "kept": 4, "skipped": {"video_unreadable": 2}}
  records = read_all(tmp_path / "out", "video")
  by_caption = {r["caption"]: r for r in records}
  for c in range(3):  # 8 frames at 1 FPS out of a 10 s clip: seconds 0..7
    frames = by_caption[caption(c)]["frames"]
    assert [id_of_image_bytes(f) for f in frames] == [10 * c + s for s in range(8)]
  assert [id_of_image_bytes(f) for f in by_caption[caption(3)]["frames"]] == [30, 31, 32]


@pytest.mark.parametrize("kind", ["pairs", "webdataset", "mmc4", "video"])
def test_strict_names_file_and_record(tmp_path, kind):
  d, options = tmp_path / "raw", {}
  if kind == "pairs":
    inputs, where = make_pairs(d)[0], "pairs.jsonl:5"
  elif kind == "webdataset":
    inputs, where = make_webdataset(d), "shard-000.tar:s/050"
  elif kind == "mmc4":
    (inputs, images), where = make_mmc4(d), "docs.jsonl:3: image 1: text_index_out_of_range"
    options["images_dir"] = images
  else:
    inputs, where = make_video(d), "videos.jsonl:5: video_unreadable"
  with pytest.raises(raw.RawDataError, match=r"\S*" + where.replace(".", r"\.")) as e:
    prepare.prepare(kind, inputs, str(tmp_path / "out"), strict=True, **options)
  assert str(d) in str(e.value)
  left = [p for _, dirs, files in os.walk(tmp_path / "out") for p in dirs + files]
  assert not [p for p in left if "incomplete" in p or "array_record" in p], left


def test_worker_processes_prepare_the_same_dataset(tmp_path):
  """Every kind (bad records included): the same records in the same order, the same
  summary, and in strict mode the same first error, with 2 worker processes."""
  d = tmp_path / "raw"
  docs, images = make_mmc4(d / "mmc4")
  cases = {"pairs": (make_pairs(d / "pairs"), {}), "webdataset": (make_webdataset(d / "wds"), {}),
           "mmc4": (docs, {"images_dir": images}), "video": (make_video(d / "video"), {})}
  for kind, (inputs, options) in cases.items():
    runs = [prepare.prepare(kind, inputs, str(tmp_path / f"out{w}"), num_workers=w, **options)
            for w in (0, 2)]
    assert runs[0]["kept"] == runs[1]["kept"] and runs[0]["skipped"] == runs[1]["skipped"], kind
    assert runs[0].get("dropped_images") == runs[1].get("dropped_images"), kind
    # (the same entries; rows that fail before a worker sees them are listed earlier)
    lists = [sorted(open(r["skipped_list"]).read().splitlines()) for r in runs]
    assert lists[0] == lists[1] and len(lists[0]) == sum(runs[0]["skipped"].values()) + sum(
        runs[0].get("dropped_images", {}).values()), kind
    serial, parallel = (read_all(r["path"], kind) for r in runs)
    assert [r["id"] for r in serial] == [r["id"] for r in parallel], kind
    for a, b in zip(serial, parallel):
      assert a.keys() == b.keys()
      for k in a:
        assert np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k], k
    errors = []
    for w in (0, 2):
      with pytest.raises(raw.RawDataError) as e:
        prepare.prepare(kind, inputs, str(tmp_path / f"strict{w}"), strict=True,
                        num_workers=w, **options)
      errors.append(str(e.value))
    assert errors[0] == errors[1], kind


def test_cli_subprocess_prints_summary_last(tmp_path):
  inputs = make_pairs(tmp_path / "raw")
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
  r = subprocess.run([sys.executable, "-m", "flamingo_jax.data.prepare", "pairs", "--input",
                      *inputs, "--output", str(tmp_path / "out")],
                     capture_output=True, text=True, env=env, timeout=120)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout.strip().splitlines()[-1]) == {"read": 16, "kept": 8,
                                                            "skipped": PAIRS_SKIPPED}
  assert r.stdout.strip().count("\n") == 0, r.stdout  # the summary only
  # TFDS's "Downloading and preparing dataset Unknown size ..." is not printed (nothing is
  # downloaded); the progress bar is, on stderr, with the rate, kept and skipped.
  assert "ownload" not in r.stdout + r.stderr, r.stdout + r.stderr
  assert "records/s" in r.stderr and "kept=8" in r.stderr and "skipped=8" in r.stderr, r.stderr
  assert "Traceback" not in r.stderr
  strict = subprocess.run([sys.executable, "-m", "flamingo_jax.data.prepare", "pairs", "--input",
                           *inputs, "--output", str(tmp_path / "out2"), "--strict"],
                          capture_output=True, text=True, env=env, timeout=120)
  assert strict.returncode == 1 and "pairs.jsonl:5: image_missing" in strict.stderr


# ---------------------------------------------------------------------------------------
# Training batches from prepared datasets.

@pytest.fixture(scope="module")
def datasets(tmp_path_factory, tokenizer_dir):
  """Every kind prepared once (with the tokenizer recorded in the metadata)."""
  d = tmp_path_factory.mktemp("prepared")
  out = {}
  out["pairs"] = prepare.prepare("pairs", make_pairs(d / "pairs"), str(d / "out"),
                                 tokenizer=tokenizer_dir)["path"]
  out["webdataset"] = prepare.prepare("webdataset", make_webdataset(d / "wds"), str(d / "out"),
                                      tokenizer=tokenizer_dir)["path"]
  docs, images = make_mmc4(d / "mmc4")
  out["mmc4"] = prepare.prepare("mmc4", docs, str(d / "out"), images_dir=images,
                                tokenizer=tokenizer_dir)["path"]
  out["video"] = prepare.prepare("video", make_video(d / "video"), str(d / "out"),
                                 tokenizer=tokenizer_dir)["path"]
  return out


@pytest.mark.parametrize("kind", ["pairs", "webdataset"])
def test_pair_batches_keep_each_image_with_its_text(datasets, tokenizer_dir, kind):
  it = prepared.build_iterator(datasets[kind], 4, seed=3, seq_len=12, **SMALL)
  seen = set()
  for _ in range(4):  # 16 positions over 8 / 6 records: more than one epoch
    b = next(it)
    assert b["images"].shape == (4, 1, 1, 16, 16, 3) and b["input_ids"].shape == (4, 12)
    assert b["media_mask"].all() and b["loss_mask"].sum() > 0
    ids = image_ids(b["images"][:, 0, 0])
    assert list(ids) == caption_ids(tokenizer_dir, b["input_ids"])
    seen.update(ids.tolist())
  assert seen == set(range(8 if kind == "pairs" else 6))
  assert b["skipped"].shape == (4, len(loader.SKIP_REASONS)) and not b["skipped"].any()


def test_mmc4_batches_place_images_before_their_sentences(datasets, tokenizer_dir):
  from flamingo_jax.data.tokenizer import load_tokenizer
  tok, specials = load_tokenizer(tokenizer_dir)
  it = prepared.build_iterator(datasets["mmc4"], 5, seed=0, seq_len=40, max_images=3, **SMALL)
  expected = {0: 0, 1: 2, 10: 11, 20: 23, 30: 30, 60: 60}  # image id → its sentence's id
  seen = set()
  for _ in range(3):
    b = next(it)
    assert b["images"].shape == (5, 3, 1, 16, 16, 3)
    for row in range(5):
      ids = b["input_ids"][row]
      for t in np.flatnonzero(ids == specials.media_token_id):
        slot = b["media_index"][row, t]
        image = int(image_ids(b["images"][row, slot, 0]))
        text = tok.decode(ids[t + 1:].tolist())
        assert int(text.split("caption number ")[1].split("<")[0].split()[0]) == expected[image]
        seen.add(image)
  assert seen == set(expected)


def test_video_batches(datasets, tokenizer_dir):
  it = prepared.build_iterator(datasets["video"], 4, seed=1, seq_len=12, **SMALL)
  b = next(it)
  assert b["images"].shape == (4, 1, 8, 16, 16, 3)
  for frames, c in zip(image_ids(b["images"][:, 0]), caption_ids(tokenizer_dir, b["input_ids"])):
    want = [10 * c + s for s in range(8)] if c < 3 else [30, 31, 32] + [32] * 5
    assert list(frames) == want


@pytest.mark.parametrize("kind", ["pairs", "mmc4"])
def test_resumption_mid_epoch_gives_the_same_next_batches(datasets, kind):
  opts = dict(image_size=16, seq_len=24, augment=True)  # random choices included
  it = prepared.build_iterator(datasets[kind], 3, seed=7, **opts)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  resumed = prepared.build_iterator(datasets[kind], 3, seed=7, state=state, **opts)
  for want in expected:
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  for step in (0, 3):  # batch_at is random access, the same as the stream
    again = prepared.build_iterator(datasets[kind], 3, seed=7, **opts).batch_at(step + 2)
    np.testing.assert_array_equal(again["input_ids"], expected[step]["input_ids"])
  threaded = prepared.build_iterator(datasets[kind], 3, seed=7, state=state, num_threads=3,
                                    **opts)
  for want in expected:  # threads change nothing but speed
    got = next(threaded)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  other_seed = prepared.build_iterator(datasets[kind], 3, seed=8, state=state, **opts)
  assert any(not np.array_equal(next(other_seed)["images"], w["images"]) for w in expected)


def test_processes_read_disjoint_shares_of_each_global_batch(datasets, tokenizer_dir):
  opts = dict(image_size=16, seq_len=12, augment=True)
  single = prepared.build_iterator(datasets["pairs"], 8, seed=5, **opts)
  shares = [prepared.build_iterator(datasets["pairs"], 8, seed=5, process_index=p,
                                    process_count=2, **opts) for p in range(2)]
  for step in range(3):
    whole = single.batch_at(step)
    parts = [s.batch_at(step) for s in shares]
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k], err_msg=k)
    # 8 positions = one epoch of the 8 records: every record exactly once, split 4 / 4
    ids = [set(caption_ids(tokenizer_dir, p["input_ids"])) for p in parts]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(range(8))
  with pytest.raises(ValueError, match="multiple of process_count"):
    prepared.build_iterator(datasets["pairs"], 3, process_count=2)


def test_read_time_failures_are_skipped_and_counted(tmp_path, datasets, tokenizer_dir):
  # A record that passed preparation but fails when read (written here bypassing the
  # raw readers' checks): replaced by the next record of the epoch, and counted.
  records = [{"id": f"r:{i}", "image": jpeg(i), "caption": caption(i)} for i in range(5)]
  records.insert(2, {"id": "r:bad", "image": b"\xff\xd8 not a jpeg", "caption": caption(9)})
  prepare.BUILDERS["pairs"](records=iter(records), data_dir=str(tmp_path)).download_and_prepare()
  it = prepared.build_iterator(str(tmp_path), 6, tokenizer=tokenizer_dir, seq_len=12, **SMALL)
  b = next(it)
  ids = image_ids(b["images"][:, 0, 0])
  assert 9 not in ids and list(ids) == caption_ids(tokenizer_dir, b["input_ids"])
  assert skipped(b) == {"image_decode": 1}
  # The bad record's position holds the record after it in the epoch's order: the other
  # five positions are untouched, so the good records appear once and one twice.
  assert sorted(set(ids)) == [0, 1, 2, 3, 4] and len(ids) == 6
  # Documents the processing rejects: every single-image document, here.
  mmc4 = prepared.build_iterator(datasets["mmc4"], 4, rules="openflamingo",
                                 single_image_drop_p=1.0, **SMALL)
  b = next(mmc4)
  assert (b["media_mask"].sum(1) == 2).all()  # only document 0 has two images
  assert skipped(b)["single_image"] >= 4
  # Too many in a row: a clear error naming the dataset and position.
  with pytest.raises(loader.NoReadableRecord, match=r"position \d+: no example from 1 "
                                                     "records in a row; last: .*single_image"):
    prepared.build_iterator(datasets["mmc4"], 4, rules="openflamingo", max_attempts=1,
                            single_image_drop_p=1.0, **SMALL).batch_at(0)


def skipped(batch) -> dict:
  return {r: int(c) for r, c in zip(loader.SKIP_REASONS, batch["skipped"].sum(0)) if c}


def test_tokenizer_is_recorded_and_required(tmp_path, datasets, tokenizer_dir):
  ds = prepared.PreparedDataset(datasets["pairs"])
  meta = ds.metadata["tokenizer"]
  assert meta["path"] == os.path.abspath(tokenizer_dir)
  from flamingo_jax.data.tokenizer import load_tokenizer
  assert meta["special_tokens"]["media_token_id"] == load_tokenizer(tokenizer_dir)[1].media_token_id
  records = [{"id": "r:0", "image": jpeg(0), "caption": caption(0)}]
  prepare.BUILDERS["pairs"](records=iter(records), data_dir=str(tmp_path)).download_and_prepare()
  with pytest.raises(prepared.PreparedDataError, match="no tokenizer"):
    prepared.build_iterator(str(tmp_path), 2)
  with pytest.raises(prepared.PreparedDataError, match="not 'mmc4'"):
    prepared.PreparedDataset(datasets["pairs"], "mmc4")


def test_sources_build_prepared(datasets, tokenizer_dir):
  from flamingo_jax.config import ConfigError
  from flamingo_jax.data import sources
  cfg = dict(source="prepared", path=os.path.dirname(os.path.dirname(datasets["webdataset"])),
             kind="webdataset", batch_size=4, weight=1.0, seq_len=12, **SMALL)
  it = sources.build("laion", cfg, seed=0, process_index=1, process_count=2)
  b = next(it)
  assert b["input_ids"].shape == (2, 12) and it.get_state() == {"next_index": 4}
  ids = image_ids(b["images"][:, 0, 0])
  assert list(ids) == caption_ids(tokenizer_dir, b["input_ids"])
  with pytest.raises(ConfigError, match="unknown keys"):
    sources.build("laion", dict(cfg, image_sise=3), seed=0)
  with pytest.raises(ConfigError, match="data.laion: .*expected one prepared dataset"):
    sources.build("laion", dict(cfg, kind="mmc5"), seed=0)
  synthetic = sources.build("toy", dict(source="synthetic", batch_size=2), seed=0)
  assert next(synthetic)["images"].shape[0] == 2
  # The shapes train_compile.py compiles for, from the config alone, are the batches'
  # (global: two processes' shares), for every kind.
  for kind in ("webdataset", "mmc4", "video"):
    c = dict(cfg, kind=kind, path=os.path.dirname(os.path.dirname(datasets[kind])))
    local = next(sources.build("x", c, seed=0, process_index=0, process_count=2))
    assert sources.batch_shapes("x", c, None) == {
        k: ((2 * v.shape[0],) + v.shape[1:], v.dtype) for k, v in local.items()}, kind


# ---------------------------------------------------------------------------------------
# prepare: the skipped list, the summary's arithmetic, errors before anything is written.

def skipped_list(out, kind):
  with open(os.path.join(out, f"flamingo_{kind}", "skipped.jsonl")) as f:
    return [json.loads(line) for line in f]


def where(entry) -> tuple:
  """(file name, line or member[, image]) of a skipped.jsonl entry."""
  place = entry["line"] if "line" in entry else entry["member"]
  return (os.path.basename(entry["file"]), place) + ((entry["image"],) if "image" in entry else ())


def test_skipped_list_names_every_skipped_record(tmp_path):
  out = str(tmp_path / "out")
  summary = prepare.prepare("pairs", make_pairs(tmp_path / "raw"), out)
  entries = skipped_list(out, "pairs")
  assert summary["skipped_list"] == os.path.join(out, "flamingo_pairs", "skipped.jsonl")
  assert {where(e): e["reason"] for e in entries} == {
      ("pairs.jsonl", 5): "image_missing", ("pairs.jsonl", 6): "image_corrupt",
      ("pairs.jsonl", 7): "empty_text", ("pairs.jsonl", 8): "missing_field",
      ("pairs.jsonl", 9): "invalid_utf8", ("pairs.jsonl", 10): "bad_json",
      ("pairs.csv", 6): "image_missing", ("pairs.csv", 7): "bad_csv"}
  assert len(entries) == sum(summary["skipped"].values())
  for e in entries:
    assert e["detail"] and e["id"] == f"{e['file']}:{e['line']}" and e["file"].startswith(str(tmp_path))
  # Tar members by key.
  prepare.prepare("webdataset", make_webdataset(tmp_path / "wds"), out)
  assert {where(e): e["reason"] for e in skipped_list(out, "webdataset")} == {
      ("shard-000.tar", "s/050"): "missing_caption", ("shard-000.tar", "s/051"): "missing_image",
      ("shard-000.tar", "s/052"): "image_corrupt", ("shard-001.tar", "s/053"): "invalid_utf8"}
  # MMC4: skipped documents, and the images dropped inside kept ones (with their index).
  docs, images = make_mmc4(tmp_path / "mmc4")
  prepare.prepare("mmc4", docs, out, images_dir=images)
  entries = {where(e): e for e in skipped_list(out, "mmc4")}
  assert {k: e["reason"] for k, e in entries.items()} == {
      ("docs.jsonl", 5): "no_usable_image", ("docs.jsonl", 6): "empty_text",
      ("docs.jsonl", 8): "invalid_utf8",
      ("docs.jsonl", 3, 1): "text_index_out_of_range", ("docs.jsonl", 4, 1): "image_missing",
      ("docs.jsonl", 4, 2): "image_corrupt", ("docs.jsonl", 7, 1): "image_unmatched",
      ("docs.jsonl", 7, 2): "image_unmatched"}
  # The skipped document says what happened to its image.
  assert "image 0: image_missing" in entries[("docs.jsonl", 5)]["detail"]
  assert "nope.jpg" in entries[("docs.jsonl", 4, 1)]["detail"]


def test_summary_counts_records(tmp_path):
  """kept + the sum of skipped = the records read (lines of the tables, keys of the
  shards, documents), for every kind; mmc4's dropped images are apart."""
  docs, images = make_mmc4(tmp_path / "mmc4")
  cases = {"pairs": (make_pairs(tmp_path / "pairs"), {}, 10 + 6),  # 10 jsonl lines, 6 csv rows
           "webdataset": (make_webdataset(tmp_path / "wds"), {}, 10),  # 10 keys
           "mmc4": (docs, {"images_dir": images}, 8),  # 8 documents
           "video": (make_video(tmp_path / "video"), {}, 6)}
  for kind, (inputs, options, records) in cases.items():
    s = prepare.prepare(kind, inputs, str(tmp_path / "out"), **options)
    assert s["read"] == records and s["kept"] + sum(s["skipped"].values()) == records, (kind, s)
    on_disk = json.load(open(tmp_path / "out" / f"summary_{kind}.json"))
    assert on_disk == {k: v for k, v in s.items() if k not in ("path", "skipped_list")}
    assert len(prepared.PreparedDataset(s["path"], kind)) == s["kept"]
    assert ("dropped_images" in s) == (kind == "mmc4")
  assert s["kept"] == 4  # (video, the last case)


def run_main(capsys, *argv):
  code = prepare.main([str(a) for a in argv] + ["--no-progress"])
  out, err = capsys.readouterr()
  return code, out, err


def test_a_run_that_keeps_nothing_fails_with_its_summary(tmp_path, capsys):
  d = tmp_path / "raw"
  write(f"{d}/pairs.jsonl", jsonl([{"image": "gone.jpg", "caption": "x"}, {"image": "gone.jpg"},
                                   b"{not json"]))
  out = tmp_path / "out"
  with pytest.raises(prepare.NothingKept, match="^nothing kept: all 3 records read were skipped") as e:
    prepare.prepare("pairs", f"{d}/pairs.jsonl", str(out))
  assert e.value.summary == {"read": 3, "kept": 0, "skipped": {
      "image_missing": 1, "missing_field": 1, "bad_json": 1}}
  code, stdout, stderr = run_main(capsys, "pairs", "--input", f"{d}/pairs.jsonl", "--output", out,
                                  "--overwrite")
  assert code == 1
  assert json.loads(stdout.strip().splitlines()[-1]) == e.value.summary
  assert stderr.count("\n") == 1 and stderr.startswith("prepare: error: nothing kept"), stderr
  assert "skipped.jsonl" in stderr and "AssertionError" not in stderr
  # No dataset (nor TFDS leftovers); the summary and the list of what was skipped stay.
  left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
  assert left == ["flamingo_pairs", "flamingo_pairs/skipped.jsonl", "summary_pairs.json"], left
  assert len(skipped_list(out, "pairs")) == 3
  # An empty input: nothing read.
  write(f"{d}/empty.jsonl", "")
  with pytest.raises(prepare.NothingKept, match="no records in"):
    prepare.prepare("pairs", f"{d}/empty.jsonl", str(tmp_path / "out2"))


@pytest.mark.parametrize("args,flag", [
    (["--input", "{raw}/absent.jsonl"], "--input"),
    (["--input", "{raw}/*.nothing"], "--input"),
    (["--input", "{raw}/pairs.jsonl", "--images-dir", "{raw}/no_such_dir"], "--images-dir"),
    (["--input", "{raw}/pairs.jsonl", "--tokenizer", "{raw}/no_tokenizer"], "--tokenizer"),
    (["--input", "{raw}/pairs.jsonl", "--num-workers", "-1"], "--num-workers"),
    (["--input", "{raw}/pairs.jsonl", "--max-image-size", "-3"], "--max-image-size"),
    (["--input", "{raw}/pairs.jsonl", "--num-workers", "two"], "--num-workers"),  # argparse's
    (["--input", "{raw}/pairs.jsonl", "--image-format", "gif"], "--image-format"),
])
def test_mistakes_are_one_line_before_anything_is_written(tmp_path, capsys, args, flag):
  raw_dir = tmp_path / "raw"
  make_pairs(raw_dir)
  out = tmp_path / "out"
  code, stdout, stderr = run_main(capsys, "pairs", *[a.format(raw=raw_dir) for a in args],
                                  "--output", out)
  assert code == 2, stderr
  assert stderr.count("\n") == 1 and stderr.startswith("prepare: error: "), stderr
  assert flag in stderr and "Traceback" not in stderr and not stdout
  assert not out.exists()  # nothing created


def test_an_existing_dataset_needs_overwrite(tmp_path, capsys):
  inputs = make_pairs(tmp_path / "raw")
  out = tmp_path / "out"
  assert run_main(capsys, "pairs", "--input", *inputs, "--output", out)[0] == 0
  before = sorted(p.stat().st_mtime_ns for p in out.rglob("*"))
  code, _, stderr = run_main(capsys, "pairs", "--input", *inputs, "--output", out)
  assert code == 2 and "--output" in stderr and "--overwrite" in stderr, stderr
  assert sorted(p.stat().st_mtime_ns for p in out.rglob("*")) == before  # untouched
  assert run_main(capsys, "pairs", "--input", *inputs, "--output", out, "--overwrite")[0] == 0
  code, _, stderr = run_main(capsys, "nokind", "--input", *inputs, "--output", out)
  assert code == 2 and stderr.count("\n") == 1 and "nokind" in stderr, stderr


def test_no_temporary_folders_are_left(tmp_path):
  inputs = make_pairs(tmp_path / "raw")
  out = tmp_path / "out"
  prepare.prepare("pairs", inputs, str(out))
  names = [p.name for p in out.rglob("*")]
  assert not [n for n in names if "incomplete" in n or "tmp" in n.lower() or n == "downloads"], names
  with pytest.raises(raw.RawDataError):  # a failed run leaves nothing at all
    prepare.prepare("pairs", inputs, str(tmp_path / "strict"), strict=True)
  assert not (tmp_path / "strict").exists()


def test_relative_images_beside_the_table_or_in_images(tmp_path):
  """Without --images-dir, `a.jpg` is found beside the jsonl or in images/ next to it;
  a missing one's detail names both places."""
  d = tmp_path / "raw"
  write(f"{d}/0.jpg", jpeg(0))
  write(f"{d}/images/1.jpg", jpeg(1))
  write(f"{d}/images/sub/2.jpg", jpeg(2))
  write(f"{d}/pairs.jsonl", jsonl([{"image": "0.jpg", "caption": caption(0)},
                                   {"image": "1.jpg", "caption": caption(1)},
                                   {"image": "sub/2.jpg", "caption": caption(2)},
                                   {"image": "3.jpg", "caption": caption(3)}]))
  out = str(tmp_path / "out")
  s = prepare.prepare("pairs", f"{d}/pairs.jsonl", out)
  assert s["kept"] == 3 and s["skipped"] == {"image_missing": 1}
  assert sorted(id_of_image_bytes(r["image"]) for r in read_all(out, "pairs")) == [0, 1, 2]
  [missing] = skipped_list(out, "pairs")
  assert where(missing) == ("pairs.jsonl", 4)
  assert f"looked in {d}/, {d}/images/" in missing["detail"], missing["detail"]
  assert "--images-dir" in missing["detail"]
  # Given --images-dir, only there.
  s = prepare.prepare("pairs", f"{d}/pairs.jsonl", out, overwrite=True, images_dir=f"{d}/images")
  assert s["kept"] == 2
  assert any(f"looked in {d}/images/" in e["detail"] and "0.jpg" in e["detail"]
             for e in skipped_list(out, "pairs"))
  # MMC4's image_name the same way: make_mmc4 puts the images in images/ next to docs.jsonl.
  docs, images = make_mmc4(tmp_path / "mmc4")
  assert prepare.prepare("mmc4", docs, str(tmp_path / "m1"))["kept"] == 5
