"""The README's main command: the demo learns in context (4 shots beat 0 shots and chance)."""
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train as train_lib  # noqa: E402


def test_demo_learns_in_context(tmp_path):
  spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "configs", "demo.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  workdir = str(tmp_path)
  train_lib.train(demo.get_config(), workdir)
  with open(os.path.join(workdir, "demo_results.json")) as f:
    result = json.load(f)
  assert set(result) == {"accuracy", "chance", "episodes"}
  a0, a4 = result["accuracy"]["0"], result["accuracy"]["4"]
  assert a4 > a0 + 0.1, result  # reading the context helps: Flamingo's signature ability
  assert a4 > 3 * result["chance"], result
  assert os.path.getsize(os.path.join(workdir, "loss.png")) > 0
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert rows[-1]["step"] == 1200 and rows[-1]["loss"] < rows[0]["loss"]
