"""train.py as a person runs it: the console (what is happening, progress, no library
chatter), Ctrl-C that saves and resumes bitwise, a finished workdir left alone, one row
per step in metrics.jsonl and TensorBoard, config mistakes as one line.

Every run is `python train.py` on the tiny config on one CPU device (the README's
command), in a subprocess; conftest's persistent compilation cache spares the later runs
XLA's compile. Three train; the others stop before the model is built."""
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from config_files import ROOT

TINY = os.path.join(ROOT, "configs", "tiny.py")
STEPS = ["--config.total_steps=16", "--config.checkpoint_every=4", "--config.log_every=4"]
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device
# absl's log prefix (I1201 15:38:14.228 ... file.py:12]): orbax's and jax's INFO lines.
LIBRARY_LINE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ ", re.M)


def train_py(*args, config=TINY, cwd=ROOT, env=ENV):
  command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", config, *args]
  return subprocess.Popen(command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)


def run(*args, **kwargs) -> tuple[int, str]:
  proc = train_py(*args, **kwargs)
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


def read_until(proc, pattern: str) -> list[str]:
  """The output lines up to the first that matches `pattern` (the process runs on)."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if re.search(pattern, line):
      return lines
  raise AssertionError(f"train.py ended before {pattern!r}:\n{''.join(lines)}")


def state_at(workdir, step) -> dict:
  """The train state a checkpoint holds: path → numpy array."""
  import warnings

  import jax
  import orbax.checkpoint as ocp
  with warnings.catch_warnings():  # "sharding info not provided": one device, as saved
    warnings.simplefilter("ignore")
    state = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state))}


def tensorboard_starts(workdir) -> list[int]:
  """The steps of the SessionLog START events in the workdir's event files (TensorBoard
  hides the points of earlier files from such a step on)."""
  from tensorboardX.proto import event_pb2
  starts = []
  for name in sorted(os.listdir(workdir)):
    if not name.startswith("events.out.tfevents"):
      continue
    with open(os.path.join(workdir, name), "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):  # TFRecords: length, its crc, the event, its crc
      n = struct.unpack("<Q", data[i:i + 8])[0]
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        starts.append(event.step)
      i += 12 + n + 4
  return starts


def snapshot(workdir) -> dict:
  """Every file under the workdir: (mtime, bytes)."""
  files = {}
  for folder, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, workdir)] = (os.stat(path).st_mtime_ns, f.read())
  return files


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One workdir trained 16 steps straight, and the same command again (and with -v 0);
  then a copy of it as a kill after step 8's checkpoint leaves it (its checkpoints at 12
  and 16 gone; their metrics rows and TensorBoard points stay), which is finished for
  total_steps=8 and trained on with a larger total_steps, stopped by Ctrl-C while its
  train step compiles, and resumed (from a relative path) to 16."""
  r = {}
  straight = r["straight"] = str(tmp_path_factory.mktemp("straight"))
  r["straight_code"], r["straight_out"] = run("--workdir", straight, *STEPS)
  assert r["straight_code"] == 0, r["straight_out"]
  r["before"] = snapshot(straight)
  r["again"] = run("--workdir", straight, *STEPS)
  r["again_verbose"] = run("--workdir", straight, *STEPS, "-v", "0")
  r["after"] = snapshot(straight)

  parent = tmp_path_factory.mktemp("resumed")
  killed = r["killed"] = str(parent / "run")
  shutil.copytree(straight, killed)
  for step in (12, 16):
    shutil.rmtree(os.path.join(killed, "checkpoints", str(step)))
  r["finished_at_8"] = run("--workdir", killed, *STEPS, "--config.total_steps=8")
  proc = train_py("--workdir", killed, *STEPS, "--config.total_steps=100")
  lines = read_until(proc, r"^step 8 of 100: compiling")
  proc.send_signal(signal.SIGINT)
  out = "".join(lines) + proc.communicate(timeout=300)[0]
  r["ctrl_c"] = (proc.returncode, out)
  saved = re.search(r"^saved the checkpoint at step (\d+) of 100;", r["ctrl_c"][1], re.M)
  assert saved, r["ctrl_c"][1]
  r["k"] = int(saved.group(1))
  r["k_saved"] = os.path.isdir(os.path.join(killed, "checkpoints", str(r["k"])))
  r["resumed"] = run("--workdir", "run", *STEPS, cwd=str(parent))
  return r


def test_the_console_says_what_happens_and_nothing_else(runs):
  out = runs["straight_out"]
  lines = out.splitlines()
  assert not LIBRARY_LINE.search(out), out  # no orbax / jax INFO
  assert "Traceback" not in out and "WARNING" not in out, out
  assert lines[0].endswith("(mesh {'slice': 1, 'data': 1, 'fsdp': 1, 'tensor': 1})"), out
  compiling = lines.index("step 0 of 16: compiling the train step...")
  first = next(i for i, line in enumerate(lines) if line.startswith("step       1 | "))
  assert re.fullmatch(r"compiled in [\d.]+ s", lines[compiling + 1]), out
  assert compiling < first, out
  # The first metrics line is step 1's, not log_every's (4).
  logged = [int(line.split()[1]) for line in lines if re.match(r"step +\d+ \|", line)]
  assert logged == [1, 4, 8, 12, 16], out
  assert re.search(r"^step 1 of 16: the first step took [\d.]+ s$", out, re.M), out
  assert re.search(r"^step 16/16 \(100\.0%\) \| [\d.e+]+ steps/s \| ETA 0:00:00$", out, re.M), out


def test_a_finished_workdir_is_left_as_it_is(runs):
  """The same command again: one line says so and no file is written (not even with the
  same bytes); -v 0 brings orbax's INFO lines back."""
  assert runs["again"] == (0, f"{runs['straight']} is finished: step 16 of total_steps=16; "
                              "nothing to do (a larger --config.total_steps trains it on)\n")
  code, verbose = runs["again_verbose"]
  assert code == 0 and "is finished" in verbose, verbose
  assert re.search(r"^I\d{4} .* checkpoint_manager\.py:\d+\]", verbose, re.M), verbose
  assert runs["after"] == runs["before"]
  code, out = runs["finished_at_8"]
  assert code == 0 and out.startswith(f"{runs['killed']} is finished: step 8 of total_steps=8"), out


def test_a_larger_total_steps_trains_a_finished_workdir_on(runs):
  code, out = runs["ctrl_c"]
  assert "resumed from the checkpoint at step 8" in out and "step 8 of 100: compiling" in out, out
  assert re.search(r"^step +9 \| ", out, re.M), out


def test_ctrl_c_saves_a_checkpoint_and_exits(runs):
  code, out = runs["ctrl_c"]
  assert code == 0, out
  assert "Ctrl-C: saving a checkpoint after this step, then exiting" in out, out
  assert f"saved the checkpoint at step {runs['k']} of 100; the same command resumes from it" in out
  assert 9 <= runs["k"] < 16 and runs["k_saved"], out
  assert "Traceback" not in out and not LIBRARY_LINE.search(out), out


def test_the_resumed_run_ends_bitwise_on_the_straight_runs_state(runs):
  code, out = runs["resumed"]
  assert code == 0 and f"resumed from the checkpoint at step {runs['k']}" in out, out
  ours, theirs = state_at(runs["killed"], 16), state_at(runs["straight"], 16)
  assert set(ours) == set(theirs)
  for key in theirs:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_metrics_have_one_row_per_step_after_resumes(runs):
  """The straight run's rows past step 8 are dropped when the copy resumes from 8."""
  k = runs["k"]
  rows = lambda w: [json.loads(line) for line in open(os.path.join(w, "metrics.jsonl"))]
  ours, straight = rows(runs["killed"]), rows(runs["straight"])
  steps = [r["step"] for r in ours]
  assert steps == sorted(set(steps)) and steps[-1] == 16 and {9, k + 1} <= set(steps), steps
  assert [r for r in ours if r["step"] <= 8] == [r for r in straight if r["step"] <= 8]


def test_tensorboard_drops_the_points_past_each_resume(runs):
  """Each run's event file starts with a SessionLog START at its first step: TensorBoard
  hides the earlier files' points from there on (9 for the copy of the straight run
  resumed at 8, k + 1 for its resume after Ctrl-C)."""
  assert tensorboard_starts(runs["straight"]) == [1]
  assert tensorboard_starts(runs["killed"]) == [1, 9, runs["k"] + 1]


STOP_SIGNALS = """
import sys
import numpy as np
sys.path.insert(0, %r)
import train
train.StopSignals(lambda line: print(line, flush=True))
print("ready", flush=True)
a = np.ones((1500, 1500))
for _ in range(1000):  # C code, where Python's own signal handlers wait
  a @ a
""" % ROOT


def test_a_second_ctrl_c_aborts_at_once():
  """The first Ctrl-C only asks the loop to stop; the second ends the process at once,
  while its main thread is in C code."""
  proc = subprocess.Popen([sys.executable, "-c", STOP_SIGNALS], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=ENV)
  lines = read_until(proc, "^ready")
  proc.send_signal(signal.SIGINT)
  lines += read_until(proc, "^Ctrl-C: saving a checkpoint after this step")
  assert proc.poll() is None
  proc.send_signal(signal.SIGINT)
  start = time.perf_counter()
  out = "".join(lines) + proc.communicate(timeout=60)[0]
  assert proc.returncode == 130 and "Ctrl-C again: aborted without saving" in out, out
  assert time.perf_counter() - start < 5


MISTAKES = {
    "bad value": (["--config.total_steps=0"], "total_steps: must be a positive integer, got 0"),
    "unknown field": (["--config.model.lm.no_such_field=3"],
                      "--config.model.lm.no_such_field: the config has no field 'no_such_field'"),
    "not a number": (["--config.optimizer.lr=fast"], "--config.optimizer.lr=fast: could not convert"),
    "no config file": ([], "--config: configs/nothere.py does not exist"),
    "no workdir": ([], "--workdir: required"),
}


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
  """Every mistake's run (at once: each only imports and parses), --traceback's and
  --print_config's: name → (exit status, output, workdir)."""
  tmp = tmp_path_factory.mktemp("mistakes")
  procs = {}
  for name, (args, _) in MISTAKES.items():
    workdir = [] if name == "no workdir" else ["--workdir", str(tmp / name)]
    config = "configs/nothere.py" if name == "no config file" else TINY
    procs[name] = train_py(*workdir, *args, config=config)
  procs["traceback"] = train_py("--workdir", str(tmp / "traceback"), "--config.total_steps=0",
                                "--traceback")
  procs["print_config"] = train_py("--print_config", "--config.total_steps=7",
                                   "--config.model.lm.d_model=32")
  outs = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
  return {name: (p.returncode, outs[name], tmp / name) for name, p in procs.items()}


@pytest.mark.parametrize("name", MISTAKES)
def test_config_mistakes_are_one_line(mistakes, name):
  code, out, workdir = mistakes[name]
  assert code == 2, out
  assert len(out.splitlines()) == 1 and out.startswith("train: error: "), out
  assert MISTAKES[name][1] in out, out
  assert not os.path.exists(workdir)


def test_traceback_shows_the_traceback(mistakes):
  code, out, _ = mistakes["traceback"]
  assert code == 1 and "Traceback" in out and "ConfigError: total_steps" in out, out


def test_print_config_prints_the_resolved_config(mistakes):
  code, out, _ = mistakes["print_config"]
  assert code == 0, out
  assert re.search(r"^total_steps: 7$", out, re.M) and re.search(r"^ +d_model: 32$", out, re.M), out
  assert re.search(r"^ +warmup_steps: 5$", out, re.M), out  # the config file's
  assert re.search(r"^ +rope_theta: 10000\.0$", out, re.M), out  # the model's defaults
