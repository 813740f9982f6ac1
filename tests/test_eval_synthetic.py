"""eval.py on a train.py workdir of the demo's synthetic task: the accuracies train.py
wrote, a killed evaluation that resumes without recomputing, and two processes that give
the numbers of one."""
import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from config_files import ROOT, load_config

sys.path.insert(0, ROOT)
import eval as eval_cli  # noqa: E402
import train as train_lib  # noqa: E402

EPISODES = 40
BATCH = 16  # 40 episodes: batches of 16, 16, 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """The demo config, a few steps: what matters is that eval.py and train.py agree."""
  path = str(tmp_path_factory.mktemp("synthetic"))
  config = load_config("demo")
  config.total_steps, config.checkpoint_every, config.log_every = 3, 3, 3
  config.eval.episodes = EPISODES
  train_lib.train(config, path, devices=jax.devices()[:1])
  with open(os.path.join(path, "demo_results.json")) as f:
    return path, json.load(f)


def evaluate(workdir, output, *extra) -> int:
  return eval_cli.main(["--model", workdir, "--tasks", "synthetic", "--shots", "0,4",
                        "--seeds", "2", "--output", output, "--batch-size", str(BATCH), *extra])


def scores(output) -> dict:
  with open(os.path.join(output, "results.json")) as f:
    cells = json.load(f)["tasks"]["synthetic"]["cells"]
  return {(int(s), int(seed)): c["score"] for s, seeds in cells.items() for seed, c in seeds.items()}


@pytest.fixture(scope="module")
def reference(workdir, tmp_path_factory):
  output = str(tmp_path_factory.mktemp("eval"))
  assert evaluate(workdir[0], output) == 0
  return output, scores(output)


def test_seed_0_gives_train_py_accuracies(workdir, reference):
  _, train_result = workdir
  got = reference[1]
  assert train_result["episodes"] == EPISODES
  for shots in (0, 4):
    assert got[(shots, 0)] == pytest.approx(100 * train_result["accuracy"][str(shots)], abs=1e-9)
  # Seed 1 draws other episodes (a test of the seed, not of the model: the few-step model
  # scores near chance, so equal scores could still happen; the predictions differ).
  with open(os.path.join(reference[0], "predictions", "synthetic_4shot_seed1.jsonl")) as f:
    seed1 = [json.loads(line)["answer"] for line in f]
  with open(os.path.join(reference[0], "predictions", "synthetic_4shot_seed0.jsonl")) as f:
    seed0 = [json.loads(line)["answer"] for line in f]
  assert seed0 != seed1 and len(seed0) == EPISODES


def test_killed_evaluation_resumes_without_recomputing(workdir, reference, tmp_path, monkeypatch):
  from flamingo_jax.evaluation import runner
  predict, calls = runner.predict, []

  def dies_in_the_second_cell(ctx, task, data, prepared, shots, seed, indices):
    calls.append((shots, seed, tuple(indices)))
    if len(calls) == 5:  # cell (0 shots, seed 1)'s second batch
      raise RuntimeError("killed")
    return predict(ctx, task, data, prepared, shots, seed, indices)

  monkeypatch.setattr(runner, "predict", dies_in_the_second_cell)
  output = str(tmp_path)
  with pytest.raises(RuntimeError, match="killed"):
    evaluate(workdir[0], output)
  # The first cell (3 batches) had finished.
  assert list(scores(output)) == [(0, 0)]
  calls.clear()
  monkeypatch.setattr(runner, "predict", lambda *a: calls.append(a[4:6]) or predict(*a))
  assert evaluate(workdir[0], output) == 0
  # The finished cell is not recomputed, the cut one keeps its first batch, the others
  # run whole.
  assert calls.count((0, 0)) == 0 and calls.count((0, 1)) == 2
  assert calls.count((4, 0)) == 3 and calls.count((4, 1)) == 3
  assert scores(output) == reference[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_give_the_numbers_of_one(workdir, reference, tmp_path):
  output, port = str(tmp_path), _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "eval.py"), "--model", workdir[0], "--tasks",
       "synthetic", "--shots", "0,4", "--seeds", "2", "--output", output, "--batch-size",
       str(BATCH), "--coordinator-address", f"localhost:{port}", "--num-processes", "2",
       "--process-id", str(i)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  assert scores(output) == reference[1]
  # Each process wrote half of every cell; the joined file has every episode once.
  with open(os.path.join(output, "predictions", "synthetic_0shot_seed0.jsonl")) as f:
    assert [json.loads(line)["index"] for line in f] == list(range(EPISODES))
