"""The benchmarks run (how fast is for an idle machine, not for CI): benchmarks/train_step.py
at a tiny shape against open_flamingo, whose first-step loss must equal ours."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_benchmark_runs_against_open_flamingo():
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--vs-openflamingo",
         "--shape", "tiny", "--batch", "2", "--seq-len", "32", "--steps", "1", "--parts"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user's CPU
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                       env=dict(env, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  ours, theirs = r["flamingo_jax"], r["open_flamingo"]
  # Same weights, same batch, same loss: the two steps are the same computation.
  assert r["first_loss_rel_diff"] < 1e-5, (ours["first_loss"], theirs["first_loss"])
  assert ours["analytic_flops"] > 0 and 0 < ours["mfu"] and ours["memory_gib"]["temporaries"] > 0
  # The frozen-aware count (train/flops.py) is the work the compiled step does.
  assert 0.95 < ours["xla_over_analytic"] < 1.05, ours["xla_over_analytic"]
  assert r["speedup"] == round(theirs["step_s"] / ours["step_s"], 3)
  parts = r["parts_s"]
  assert set(parts) == {"flamingo_jax vision forward", "flamingo_jax rest forward",
                        "flamingo_jax rest forward + backward",
                        "flamingo_jax rest forward + backward, resampler frozen",
                        "open_flamingo vision forward",
                        "open_flamingo whole forward"}
  assert parts["flamingo_jax rest forward + backward"] > parts["flamingo_jax rest forward"] > 0


def test_input_overlap_benchmark_runs():
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "input_overlap.py"), "--config",
         os.path.join(ROOT, "configs", "tiny.py"), "--steps", "4", "--latency", "0.01",
         "--prefetch", "0,2"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=dict(env, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  (r,) = json.loads(out.stdout.strip().splitlines()[-1])["results"]
  assert r["latency_s"] == 0.01 and set(r["step_s"]) == {"0", "2"} and min(r["step_s"].values()) > 0
  assert r["speedup"]["2"] == pytest.approx(r["step_s"]["0"] / r["step_s"]["2"], rel=1e-2)


def test_matmul_benchmark_runs():
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "matmul_cpu.py"), "--reps", "2"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=dict(env, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert {row["form"] for row in r["rows"]} == {"x@W", "g@Wt", "xt@g"}
  for row in r["rows"]:
    assert row["xla_gflops"] > 0 and row["torch_gflops"] > 0
    assert row["xla_over_torch_time"] == pytest.approx(row["torch_gflops"] / row["xla_gflops"], rel=0.02)
