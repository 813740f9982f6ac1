"""Does the step wait for its input? train.py's own loop, its input made in the loop
(`prefetch_steps` 0) or ahead in the background thread (the default 2), with each batch
made to wait `latency` seconds first (the host core idle, as when reading from a bucket).

    python benchmarks/input_overlap.py [--config configs/demo.py] [--steps 200]
        [--latency 0,0.05,0.09] [--prefetch 0,2]

Each (latency, prefetch) pair is one `train.train` run of `--steps` steps (no eval, no
checkpoint), alternating the prefetch values; reported: the median of the logged step
times after the first window (train.py's `step_time`: wall time over the window's steps),
and per latency each one's speed-up over the first `--prefetch` value's. One device; use
an idle machine. The last line is one JSON object with every number.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # train.py, uninstalled flamingo_jax


class Waiting:
  """A data iterator whose every batch waits `latency` s before it is drawn."""

  def __init__(self, it, latency: float):
    self.it, self.latency = it, latency

  def __getattr__(self, name):
    return getattr(self.it, name)

  def __iter__(self):
    return self

  def __next__(self):
    time.sleep(self.latency)
    return next(self.it)


def step_time(config_path: str, steps: int, latency: float, prefetch: int) -> float:
  import jax
  import train as train_lib
  from flamingo_jax.data import sources
  from flamingo_jax.train.config import from_file
  config = from_file(config_path)
  log_every = max(1, steps // 4)
  config.update(total_steps=steps, log_every=log_every, checkpoint_every=steps + 1,
                prefetch_steps=prefetch)
  config.eval.kind = ""
  build = sources.build
  sources.build = lambda *a, **k: Waiting(build(*a, **k), latency)
  try:
    with tempfile.TemporaryDirectory() as workdir:
      train_lib.train(config, workdir, devices=jax.devices()[:1])
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
  finally:
    sources.build = build
  times = [r["step_time"] for r in rows if r["step"] > log_every]  # after compile and warm-up
  return statistics.median(times or [rows[-1]["step_time"]])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"))
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--latency", default="0,0.05,0.09", help="seconds a batch waits, comma-separated")
  parser.add_argument("--prefetch", default="0,2", help="prefetch_steps values, comma-separated")
  a = parser.parse_args()
  latencies = [float(x) for x in a.latency.split(",")]
  prefetches = [int(x) for x in a.prefetch.split(",")]
  results = []
  for latency in latencies:
    times = {}
    for prefetch in prefetches:
      times[prefetch] = step_time(a.config, a.steps, latency, prefetch)
      print(f"latency {latency:.3f} s, prefetch_steps {prefetch}: {times[prefetch]:.4f} s a step",
            file=sys.stderr, flush=True)
    results.append(dict(latency_s=latency, step_s={str(p): round(t, 5) for p, t in times.items()},
                        speedup={str(p): round(times[prefetches[0]] / t, 3)
                                  for p, t in times.items()}))
  print(json.dumps(dict(benchmark="input_overlap", config=os.path.relpath(a.config, ROOT),
                        steps=a.steps, command=" ".join([os.path.basename(sys.executable)] + sys.argv),
                        results=results)))


if __name__ == "__main__":
  main()
