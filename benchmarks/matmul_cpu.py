"""One float32 matmul, XLA:CPU against torch, at the shapes benchmarks/train_step.py's small
model multiplies: how much of the step's gap to open_flamingo is the matmul kernel itself.

    python benchmarks/matmul_cpu.py [--reps 40] [--threads N]

Each shape is jitted in JAX (XLA:CPU's own dot) and run through torch (its BLAS: MKL in
the CPU wheel) on the same arrays, the two alternating; reported: GFLOP/s of each
(median of --reps) and XLA's time over torch's. Forward matmuls x @ W, input gradients
g @ Wᵀ, weight gradients xᵀ @ g. One JSON object on the last line.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_models import machine, pin_threads  # noqa: E402

# (what, rows, contracted, columns, form): the small model's projections (ViT width 384,
# 16 images of 197 tokens; MPT d 512, 1024 tokens, vocabulary 8192) and a square one.
SHAPES = [
    ("ViT q/k/v", 3152, 384, 1152, "x@W"),
    ("ViT MLP up", 3152, 384, 1536, "x@W"),
    ("ViT MLP down", 3152, 1536, 384, "x@W"),
    ("LM q/k/v", 1024, 512, 1536, "x@W"),
    ("LM MLP up", 1024, 512, 2048, "x@W"),
    ("LM MLP down", 1024, 2048, 512, "x@W"),
    ("LM head", 1024, 512, 8192, "x@W"),
    ("LM head, input gradient", 1024, 8192, 512, "g@Wt"),
    ("MLP up, input gradient", 1024, 2048, 512, "g@Wt"),
    ("MLP up, weight gradient", 512, 1024, 2048, "xt@g"),
    ("square 2048", 2048, 2048, 2048, "x@W"),
]


def median_time(fn, reps: int) -> float:
  fn(), fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=40)
  parser.add_argument("--threads", type=int, default=0, help="0: every schedulable CPU")
  a = parser.parse_args()
  threads = pin_threads(a.threads)
  import jax
  import jax.numpy as jnp
  import torch
  torch.set_num_threads(threads)
  forms = {"x@W": lambda x, y: x @ y, "g@Wt": lambda x, y: x @ y.T, "xt@g": lambda x, y: x.T @ y}
  rows = []
  for what, m, k, n, form in SHAPES:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((k, m) if form == "xt@g" else (m, k), np.float32)
    y = rng.standard_normal((n, k) if form == "g@Wt" else (k, n), np.float32)
    op = forms[form]
    jitted, jx, jy = jax.jit(op), jnp.asarray(x), jnp.asarray(y)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    np.testing.assert_allclose(np.asarray(jitted(jx, jy)), op(tx, ty).numpy(), rtol=2e-3, atol=2e-2)
    t_xla, t_torch = [], []
    for _ in range(2):  # alternating halves
      t_xla.append(median_time(lambda: jitted(jx, jy).block_until_ready(), a.reps // 2 or 1))
      t_torch.append(median_time(lambda: op(tx, ty), a.reps // 2 or 1))
    t_xla, t_torch = min(t_xla), min(t_torch)
    flop = 2 * m * k * n
    row = dict(what=what, m=m, k=k, n=n, form=form, xla_gflops=round(flop / t_xla / 1e9, 1),
               torch_gflops=round(flop / t_torch / 1e9, 1), xla_over_torch_time=round(t_xla / t_torch, 3))
    rows.append(row)
    print(f"{what:26s} {m}×{k}×{n} {form:5s}  XLA {row['xla_gflops']:6.1f}  torch "
          f"{row['torch_gflops']:6.1f} GFLOP/s  XLA/torch time {row['xla_over_torch_time']:.2f}",
          file=sys.stderr, flush=True)
  ratios = [r["xla_over_torch_time"] for r in rows]
  print(json.dumps(dict(benchmark="matmul_cpu", machine=machine(threads, reference=True),
                        reps=a.reps, rows=rows, xla_over_torch_time_range=[min(ratios), max(ratios)])))


if __name__ == "__main__":
  main()
