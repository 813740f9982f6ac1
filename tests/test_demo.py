"""The README's main command: the demo runs end to end and eval.py on its workdir gives the
accuracies train.py wrote; in full (marked slow) it learns in context."""
import json
import os
import sys

import jax
import pytest

from config_files import ROOT, load_config

sys.path.insert(0, ROOT)
import eval as eval_cli  # noqa: E402
import train as train_lib  # noqa: E402


def run_demo(workdir: str, **fields) -> dict:
  """train.py on configs/demo.py (fields overridden), on one device as the README command
  runs on a CPU (the suite simulates eight); the demo_results.json it writes."""
  config = load_config("demo")
  config.update(fields)
  train_lib.train(config, workdir, devices=jax.devices()[:1])
  with open(os.path.join(workdir, "demo_results.json")) as f:
    return json.load(f)


def test_demo_runs_end_to_end_and_eval_py_agrees(tmp_path):
  """The README's main command, shortened to 30 steps: its results, loss plot and metrics;
  then the README's evaluation command on the same workdir (seed 0 is train.py's episodes)
  gives the accuracies train.py wrote. The full run's learning: the slow test below."""
  workdir = str(tmp_path)
  result = run_demo(workdir, total_steps=30, log_every=10, checkpoint_every=30)
  assert set(result) == {"accuracy", "chance", "episodes"} and result["chance"] == 1 / 8
  assert set(result["accuracy"]) == {"0", "4"} and result["episodes"] == 512
  assert os.path.getsize(os.path.join(workdir, "loss.png")) > 0
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert rows[-1]["step"] == 30 and rows[-1]["loss"] < rows[0]["loss"]
  output = os.path.join(workdir, "eval")
  assert eval_cli.main(["--model", workdir, "--tasks", "synthetic", "--shots", "0,4",
                        "--seeds", "1", "--output", output, "--batch-size", "64"]) == 0
  with open(os.path.join(output, "results.json")) as f:
    cells = json.load(f)["tasks"]["synthetic"]["cells"]
  for shots in ("0", "4"):
    assert cells[shots]["0"]["score"] == 100 * result["accuracy"][shots]


@pytest.mark.slow
def test_demo_learns_in_context(tmp_path):
  """The full README run (1500 steps, about 5 minutes): 4 shots beat 0 shots and chance."""
  result = run_demo(str(tmp_path))
  a0, a4 = result["accuracy"]["0"], result["accuracy"]["4"]
  # Reading the context is Flamingo's signature ability: 4 shots must beat 0 shots and
  # chance clearly. (Measured here: 1.0 at 4 shots; but a run that stays on the colour-only
  # plateau, as one did on 8 devices, reaches only ≈ 0.61, so the bound leaves room for
  # other CPUs' rounding.)
  assert a4 > a0 + 0.1 and a4 > 3 * result["chance"], result
