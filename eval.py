"""Few-shot evaluation of a Flamingo model on the paper's benchmarks.

  python eval.py --model DIR --tasks coco,vqav2 --shots 0,4,8,16,32 --seeds 3 \
      --data-dir DATA --output OUT [--demonstrations random|rices] [--num-samples N] \
      [--batch-size B] [--prompt-style openflamingo|paper]

DIR: a converted OpenFlamingo model or a train.py workdir (as for flamingo_jax.generate).
DATA: one folder per task in its official layout (`python eval.py --list-tasks`).
OUT: results.json (every score with what reproduces it), results.md (mean ± std over
seeds), scores.png, predictions/*.jsonl (prompt, demonstration ids, output, prediction
per test example). Re-running the same command resumes: finished cells are kept.
Several processes (--num-processes, or a cluster jax.distributed detects) share each
cell's examples; process 0 scores the union.
"""
import argparse
import dataclasses
import os
import sys

from flamingo_jax.cli import EPILOG, Parser, UsageError, run_command

DEFAULT_SHOTS = "0,4,8,16,32"


def parser() -> argparse.ArgumentParser:
  p = Parser(prog="eval.py", description=__doc__.split("\n\n")[0], epilog=EPILOG)
  p.add_argument("--model", help="a converted model or a train.py workdir")
  p.add_argument("--tasks", help="comma-separated task names (--list-tasks)")
  p.add_argument("--shots", default=DEFAULT_SHOTS, help=f"comma-separated (default {DEFAULT_SHOTS})")
  p.add_argument("--seeds", type=int, default=3, help="demonstration draws per shot count")
  p.add_argument("--data-dir", help="the datasets, one folder per task")
  p.add_argument("--output", help="results, predictions and plots go here")
  p.add_argument("--demonstrations", choices=("random", "rices"), default="random")
  p.add_argument("--num-samples", type=int, default=0, help="test examples per cell (0: all)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--prompt-style", choices=("openflamingo", "paper"), default="openflamingo")
  p.add_argument("--query-set-size", type=int, default=2048)
  p.add_argument("--prompt-ensembling", action="store_true",
                 help="classification: average scores over up to 6 demonstration orders")
  p.add_argument("--positions", choices=("openflamingo", "hf"), default="openflamingo",
                 help="position ids of left-padded prompts: counting pads as open_flamingo "
                      "does (its published numbers), or HF's cumsum(mask) - 1")
  p.add_argument("--vqa-normalisation", choices=("official", "open_flamingo"),
                 default="official", help="VQA accuracy: the official vqaEval.py's answer "
                 "normalisation, or open_flamingo's port (normalises every human answer)")
  p.add_argument("--tokenizer", help="an HF tokenizer directory overriding the model's")
  p.add_argument("--list-tasks", action="store_true", help="print the tasks and their files")
  p.add_argument("--coordinator-address", help="jax.distributed: host:port of process 0")
  p.add_argument("--num-processes", type=int, default=0)
  p.add_argument("--process-id", type=int, default=-1)
  return p


def all_tasks() -> dict:
  from flamingo_jax.evaluation.tasks import registry
  return registry.TASKS


def check_args(a, tasks: dict) -> None:
  for flag in ("model", "tasks", "output"):
    if not getattr(a, flag):
      raise UsageError(f"--{flag} is required")
  a.tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
  unknown = [t for t in a.tasks if t not in tasks]
  if unknown or not a.tasks:
    raise UsageError(f"--tasks: unknown {', '.join(unknown) or '(none given)'}; one or more "
                     f"of {', '.join(tasks)}")
  try:
    a.shots = sorted({int(s) for s in a.shots.split(",") if s.strip()})
  except ValueError:
    raise UsageError(f"--shots: comma-separated integers, got {a.shots!r}") from None
  rules = [(bool(a.shots) and min(a.shots) >= 0, "--shots", "must be integers >= 0"),
           (a.seeds >= 1, "--seeds", "must be >= 1"),
           (a.batch_size >= 1, "--batch-size", "must be >= 1"),
           (a.num_samples >= 0, "--num-samples", "must be >= 0 (0: every test example)"),
           (a.query_set_size >= 1, "--query-set-size", "must be >= 1")]
  for ok, flag, message in rules:
    if not ok:
      raise UsageError(f"{flag} {message}, got {getattr(a, flag[2:].replace('-', '_'))}")
  reads_files = [t for t in a.tasks if tasks[t].family != "episodes"]
  if reads_files and not a.data_dir:
    raise UsageError(f"--data-dir is required for {', '.join(reads_files)}")
  if a.data_dir and not os.path.isdir(a.data_dir):
    raise UsageError(f"--data-dir {a.data_dir}: no such directory")


def versions() -> dict:
  from importlib import metadata
  out = {}
  for name in ("flamingo_jax", "jax", "flax", "numpy", "transformers", "pycocoevalcap",
               "scikit-learn", "av"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def run(a, tasks: dict) -> dict:
  import jax

  from flamingo_jax import multihost
  from flamingo_jax.evaluation import report, runner
  from flamingo_jax.evaluation.tasks.base import TaskData
  from flamingo_jax.load_model import load_model, train_config
  from flamingo_jax.model import unscanned
  from flamingo_jax.train.checkpoint import fingerprint

  if a.coordinator_address or a.num_processes:
    multihost.initialize(a.coordinator_address, a.num_processes or None,
                         None if a.process_id < 0 else a.process_id)
  process, processes = jax.process_index(), jax.process_count()
  selected = [tasks[t] for t in a.tasks]
  model, params, tokenizer, preprocess = load_model(
      a.model, tokenizer=a.tokenizer,
      require_tokenizer=any(t.family != "episodes" for t in selected))
  model_fingerprint = fingerprint(params)  # of the params as stored
  model, params = unscanned(model, params)  # the layout that decodes fastest
  protocol = runner.Protocol(
      demonstrations=a.demonstrations, prompt_style=a.prompt_style, num_samples=a.num_samples,
      query_set_size=a.query_set_size, prompt_ensembling=a.prompt_ensembling,
      count_padding=a.positions == "openflamingo", vqa_normalisation=a.vqa_normalisation)
  ctx = runner.Context(model=model, params=params, tokenizer=tokenizer, preprocess=preprocess,
                       protocol=protocol, batch_size=a.batch_size, output=a.output,
                       train_config=train_config(a.model), process_index=process,
                       process_count=processes)
  os.makedirs(a.output, exist_ok=True)
  header = dict(model=dict(path=os.path.abspath(a.model), fingerprint=model_fingerprint),
                protocol=dataclasses.asdict(protocol), versions=versions())
  results = runner.start_results(a.output, header)

  # Read every task's files before the first cell: a bad file fails in seconds.
  data, prepared = {}, {}
  for task in selected:
    if task.family == "episodes":
      data[task.name] = TaskData(train=[], test=[])
    else:
      data[task.name] = task.load(a.data_dir)
  for task in selected:
    prepared[task.name] = runner.prepare(ctx, task, data[task.name], a.num_samples)
  cells = [(task, s, seed) for task in selected for s in a.shots for seed in range(a.seeds)
           if not runner.done(results, task.name, s, seed)]
  share = lambda task: -(-len(prepared[task.name]["test_indices"]) // processes)
  progress = _progress(sum(share(t) for t, _, _ in cells), enabled=process == 0)
  for task, shots, seed in cells:
    progress.set_description(runner.cell_name(task.name, shots, seed))
    entry = runner.run_cell(ctx, task, data[task.name], prepared[task.name], shots, seed,
                            progress)
    if process == 0:
      t = results["tasks"].setdefault(task.name, _task_header(task, data[task.name],
                                                              prepared[task.name], protocol))
      t["cells"].setdefault(str(shots), {})[str(seed)] = entry
      runner.write_json(os.path.join(a.output, runner.RESULTS), results)
      report.write(results, a.output)
  progress.close()
  if process != 0:
    return None
  runner.write_json(os.path.join(a.output, runner.RESULTS), results)
  report.write(results, a.output)
  return results


def _task_header(task, data, prepared, protocol) -> dict:
  decoding = ({} if task.family in ("classification", "episodes") else dict(
      num_beams=protocol.num_beams, length_penalty=protocol.length_penalty,
      max_new_tokens=task.max_new_tokens, stop="<|endofchunk|>", postprocess=task.postprocess))
  query = prepared.get("query_set")
  return dict(metric=task.metric, family=task.family, media=task.media, decoding=decoding,
              files=data.files, num_test=len(prepared["test_indices"]),
              query_set=None if query is None else [data.train[i].id for i in query],
              class_names=None if data.class_names is None else list(data.class_names),
              cells={})


def _progress(total: int, enabled: bool):
  from tqdm import tqdm
  return tqdm(total=total, disable=not enabled, unit="example", dynamic_ncols=True)


def main(argv=None) -> int:
  """0 when every cell ran; 2 (one line on stderr) for a user error."""
  from flamingo_jax.evaluation.cider import JavaNotFoundError
  from flamingo_jax.evaluation.vqa_accuracy import StemmingDataError
  tasks = all_tasks()

  def parse(argv):
    a = parser().parse_args(argv)
    if not a.list_tasks:
      check_args(a, tasks)
    return a

  def work(a):
    if a.list_tasks:
      for name, t in tasks.items():
        print(f"{name:14s} {t.metric:13s} {t.layout}")
      return
    results = run(a, tasks)
    if results is not None:  # process 0
      from flamingo_jax.evaluation import report
      print(report.markdown(results))

  return run_command("eval", parse, work, argv,
                     user_errors=(ValueError, OSError, JavaNotFoundError, StemmingDataError))


if __name__ == "__main__":
  sys.exit(main())
