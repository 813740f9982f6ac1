"""Input pipeline throughput: examples/s per CPU core for each source kind, after preparation.

    python benchmarks/input_pipeline.py [--records 192] [--batches 6] [--workers 2]
        [--tokenizer DIR] [--workdir DIR] [--kinds pairs webdataset mmc4 video]

Writes raw data of each kind shaped like the real thing (640×480 photo-like JPEGs,
COCO-length captions; MMC4 documents of 12–20 sentences with 3–6 images; 10 s video
clips at 10 FPS), prepares it with `python -m flamingo_jax.data.prepare`'s code, then times
the training iterator with the paper's processing (320 px 'paper' images with
augmentation, 32 tokens for pairs and video, 256 tokens and up to 5 images for MMC4,
8 frames per clip):

  1 core     num_threads=0, num_workers=0 in this process (BLAS and PIL single-threaded):
             examples/s per core.
  N workers  grain worker processes (--workers): examples/s and its ratio to N × the
             single-core rate (how well it scales on this machine).
  prepare    records/s of the one-process preparation, for sizing that step.

Cores to feed one accelerator = (the accelerator's examples/s) / (examples/s per core).
Without --tokenizer, a byte-level BPE (vocabulary 8192) is trained on the generated
text; HF fast tokenizers cost about the same per token at any vocabulary size.
The last line printed is a JSON object with every number.
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")  # one core means one core

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # uninstalled

WORDS = ("a man woman dog cat sitting standing on the in of with near red blue green large "
         "small street table field water tree car bus train plate food building people "
         "child ball grass snow beach room window").split()

SETTINGS = {  # the paper's processing per kind (prepared.PROCESSING_DEFAULTS fields)
    "pairs": dict(seq_len=32), "webdataset": dict(seq_len=32),
    "mmc4": dict(seq_len=256, max_images=5), "video": dict(seq_len=32, num_frames=8),
}


def sentence(rng, n=(8, 16)) -> str:
  return " ".join(rng.choice(WORDS, int(rng.integers(*n)))).capitalize() + "."


def photo(rng, size=(640, 480)) -> np.ndarray:
  """Smooth colour structure plus fine noise: compresses like a photo (~40-90 KB JPEG)."""
  coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), np.float32)
  image += rng.normal(0, 12, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def jpeg(rng) -> bytes:
  out = io.BytesIO()
  Image.fromarray(photo(rng)).save(out, format="JPEG", quality=90)
  return out.getvalue()


def write_raw(kind: str, d: str, n: int, rng) -> dict:
  """Raw files of `kind` with n records; returns prepare()'s inputs and reader options."""
  os.makedirs(d, exist_ok=True)
  if kind == "pairs":
    with open(f"{d}/pairs.jsonl", "w") as f:
      for i in range(n):
        open(f"{d}/{i:06d}.jpg", "wb").write(jpeg(rng))
        f.write(json.dumps({"image": f"{i:06d}.jpg", "caption": sentence(rng)}) + "\n")
    return dict(inputs=f"{d}/pairs.jsonl")
  if kind == "webdataset":
    for shard in range(2):
      with tarfile.open(f"{d}/{shard:05d}.tar", "w") as tar:
        for i in range(shard * n // 2, (shard + 1) * n // 2):
          for ext, data in (("jpg", jpeg(rng)), ("txt", sentence(rng).encode())):
            info = tarfile.TarInfo(f"{i:09d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dict(inputs=d)
  if kind == "mmc4":
    with open(f"{d}/docs.jsonl", "w") as f:
      for i in range(n):
        texts = [sentence(rng, (10, 30)) for _ in range(int(rng.integers(12, 21)))]
        where = sorted(rng.choice(len(texts), int(rng.integers(3, 7)), replace=False))
        infos = []
        for j, t in enumerate(where):
          open(f"{d}/{i:06d}_{j}.jpg", "wb").write(jpeg(rng))
          infos.append({"image_name": f"{i:06d}_{j}.jpg", "matched_text_index": int(t),
                        "matched_sim": 0.3})
        f.write(json.dumps({"text_list": texts, "image_info": infos}) + "\n")
    return dict(inputs=f"{d}/docs.jsonl")
  if kind == "video":
    import av
    with open(f"{d}/videos.jsonl", "w") as f:
      for i in range(n):
        with av.open(f"{d}/{i:06d}.mp4", "w") as c:
          s = c.add_stream("mpeg4", rate=10)
          s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
          base = photo(rng, (320, 240)).astype(np.int16)
          for t in range(100):  # 10 s: a slowly panning scene
            frame = np.clip(np.roll(base, 2 * t, axis=1) + rng.normal(0, 4, base.shape), 0, 255)
            for p in s.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")):
              c.mux(p)
          for p in s.encode():
            c.mux(p)
        f.write(json.dumps({"video": f"{i:06d}.mp4", "caption": sentence(rng)}) + "\n")
    return dict(inputs=f"{d}/videos.jsonl")
  raise ValueError(kind)


def train_tokenizer(path: str, rng) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = [sentence(rng, (5, 40)) for _ in range(20000)]
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=8192, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)
  return path


def examples_per_sec(path, batch_size, batches, **options) -> float:
  from flamingo_jax.data import prepared
  it = prepared.build_iterator(path, batch_size, seed=0, **options)
  next(it)  # warm-up: worker start, first reads
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batch_size * batches / (time.perf_counter() - start)
  it.close()
  return rate


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--records", type=int, default=192)
  p.add_argument("--batches", type=int, default=6, help="timed batches of 16 per run")
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--tokenizer")
  p.add_argument("--workdir")
  p.add_argument("--kinds", nargs="+", default=["pairs", "webdataset", "mmc4", "video"])
  a = p.parse_args()
  import tensorflow_datasets as tfds
  from flamingo_jax.data import prepare
  tfds.disable_progress_bar()
  rng = np.random.default_rng(0)
  work = a.workdir or tempfile.mkdtemp(prefix="flamingo_input_bench_")
  tokenizer = a.tokenizer or train_tokenizer(os.path.join(work, "tokenizer"), rng)
  results = {"cpu_count": os.cpu_count(), "records": a.records, "batch_size": 16,
             "batches": a.batches, "workers": a.workers, "kinds": {}}
  print(f"{'kind':<11} {'prepare rec/s':>13} {'ex/s 1 core':>12} "
        f"{f'ex/s {a.workers} workers':>16} {'scaling':>8}", flush=True)
  for kind in a.kinds:
    raw = write_raw(kind, os.path.join(work, "raw", kind), a.records, rng)
    start = time.perf_counter()
    summary = prepare.prepare(kind, raw["inputs"], os.path.join(work, "prepared"),
                              tokenizer=tokenizer, overwrite=True)
    prepare_rate = summary["kept"] / (time.perf_counter() - start)
    options = dict(SETTINGS[kind], image_size=320, image_mode="paper", augment=True)
    one = examples_per_sec(summary["path"], 16, a.batches, **options)
    many = (examples_per_sec(summary["path"], 16, a.batches, num_workers=a.workers, **options)
            if a.workers else None)
    results["kinds"][kind] = dict(prepare_records_per_sec=round(prepare_rate, 1),
                                  examples_per_sec_per_core=round(one, 1),
                                  examples_per_sec_workers=many and round(many, 1))
    scaling = f"{many / (a.workers * one):.2f}" if many else "-"
    print(f"{kind:<11} {prepare_rate:>13.1f} {one:>12.1f} "
          f"{(many or 0):>16.1f} {scaling:>8}", flush=True)
  print(json.dumps(results), flush=True)


if __name__ == "__main__":
  main()
