"""Trains Flamingo: frozen vision encoder and LM, trainable resampler and gated xattn.

  python train.py --config configs/demo.py --workdir /tmp/demo [--config.FIELD=VALUE ...]

Re-running the same command on the same workdir resumes from its latest checkpoint (a
finished one is left as it is; a larger --config.total_steps trains it on). Ctrl-C or
SIGTERM saves a checkpoint and exits 0; a second Ctrl-C aborts at once. --print_config
prints the resolved config; -v 0 shows the libraries' INFO logging. The workdir may be a
bucket (gs://...): every path goes through etils epath.
Sections: config → mesh → data → program (model, shardings and jitted steps, built by
flamingo_jax/train/program.py exactly as train_compile.py builds them) → parameters →
train state → loop.
"""
import json
import os
import time

from absl import flags
from etils import epath
import jax
import numpy as np
from ml_collections import config_flags

from flamingo_jax import cli, multihost, sharding
from flamingo_jax.config import ConfigError, FlamingoConfig
from flamingo_jax.data import loader, prefetch, sources
from flamingo_jax.train import checkpoint, flops, metrics as metrics_lib, partition
from flamingo_jax.train import program as program_lib
from flamingo_jax.train.stop_signals import StopSignals
from flamingo_jax.train.config import check, check_against_mesh

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here "
                               "(a local path or gs://...).")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")


EVAL_BATCH = 64  # eval.py --batch-size 64 scores the same batches
PROGRESS_EVERY_S = 10  # a progress line (step / total, rate, ETA) this often


class NonFiniteLossError(RuntimeError):
  pass


def init_params(program, config) -> tuple[dict, dict, str]:
  """(trainable, frozen, a description), in their shardings: random from `seed`, or a
  converted checkpoint (`init`)."""
  if config.init:
    return (*program.restore_params(config.init), os.path.abspath(config.init))
  return (*program.init_params(config.seed), f"random init (seed {config.seed})")


def global_batch(local: dict, mesh) -> dict:
  """This process's numpy share → global arrays split over the mesh's batch axes."""
  spec = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(spec, np.asarray(v)) for k, v in local.items()}


def save_loss_plot(workdir) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  workdir = epath.Path(workdir)
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(steps, [r["loss"] for r in rows])
  ax.set_xlabel("step"), ax.set_ylabel("training loss"), ax.set_yscale("log")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  with (workdir / "loss.png").open("wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)


def evaluate(config, model, params, workdir, write: bool = True) -> dict | None:
  """The config's held-out evaluation (the demo's 0- vs 4-shot accuracy), as eval.py's
  synthetic task scores it."""
  if config.eval.kind != "synthetic_fewshot":
    return None
  from flamingo_jax.data import synthetic
  from flamingo_jax.evaluation.tasks import synthetic as synthetic_task
  data = config.data[config.eval.dataset]
  task = synthetic.TaskConfig(**dict(data.get("task", {})))
  scores = synthetic_task.model_scores(model, params, rows=EVAL_BATCH)
  runs = [synthetic_task.accuracy(scores, task, config.seed, shots, config.eval.episodes,
                                  batch_size=EVAL_BATCH) for shots in config.eval.shots]
  result = {"accuracy": {str(r["shots"]): r["accuracy"] for r in runs},
            "chance": runs[0]["chance"], "episodes": int(config.eval.episodes)}
  if write:
    print("held-out accuracy:", json.dumps(result), flush=True)
    (epath.Path(workdir) / "demo_results.json").write_text(json.dumps(result, indent=1))
  return result


def outputs(config, workdir) -> list:
  """What a finished run leaves besides its checkpoints: the loss plot and the eval's
  results."""
  workdir = epath.Path(workdir)
  return [workdir / "loss.png"] + (
      [workdir / "demo_results.json"] if config.eval.kind == "synthetic_fewshot" else [])


def train(config, workdir: str, devices=None) -> dict:
  """Runs (or resumes) training; returns the final state, frozen params and eval result
  (on a finished workdir: nothing done, `finished` True, no state). `devices`: the mesh's
  devices (default: all)."""
  # ---- config (every mistake is reported here, before anything compiles)
  model_config = check(config)
  if config.distributed.enabled:
    d = config.distributed
    multihost.initialize(d.coordinator_address or None, d.num_processes or None,
                         None if d.process_id < 0 else d.process_id)
  process, processes = jax.process_index(), jax.process_count()
  say = (lambda line: print(line, flush=True)) if process == 0 else (lambda line: None)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
  latest = ckpt.latest_step()
  finished = latest is not None and latest >= config.total_steps
  if finished and all(p.exists() for p in outputs(config, workdir)):  # else: plot and eval
    ckpt.close()
    say(f"{workdir} is finished: step {latest} of total_steps={config.total_steps}; nothing "
        "to do (a larger --config.total_steps trains it on)")
    return {"step": latest, "finished": True, "preempted": False, "eval": None, "state": None,
            "frozen": None}

  # ---- mesh
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  check_against_mesh(config, mesh)
  say(f"{workdir}: building the model on {mesh.size} {jax.devices()[0].platform} devices "
      f"(mesh {dict(mesh.shape)})")

  # ---- data: one iterator per dataset; this process loads its share of each batch
  iterators = {name: sources.build(name, d, seed=config.seed, process_index=process,
                                   process_count=processes, model_config=model_config)
               for name, d in config.data.items()}
  example = {name: it.batch_at(0) for name, it in iterators.items()}
  shapes = {name: {k: ((s[0] * processes,) + s[1:], d)  # global batch shapes
                   for k, (s, d) in program_lib.batch_shapes_of(b).items()}
            for name, b in example.items()}

  # ---- the program (shared with train_compile.py): model, shardings, jitted steps
  program = program_lib.build(config, model_config, mesh, shapes)
  model = program.model

  # ---- parameters: trainable (fp32) and frozen (frozen_dtype) subtrees, in their shardings
  trainable, frozen, frozen_source = init_params(program, config)
  frozen_fingerprint = checkpoint.fingerprint(frozen)
  say(f"parameters: {sum(x.size for x in jax.tree.leaves(trainable)):,} trainable, "
      f"{sum(x.size for x in jax.tree.leaves(frozen)):,} frozen ({frozen_source})")

  # ---- train state (the optimizer sees the trainable subtree only)
  state = program.init_state(trainable)
  del trainable
  manifest = dict(frozen_source=frozen_source, frozen_fingerprint=frozen_fingerprint,
                  config=config.to_json())
  if latest is not None:
    state, data_state, _ = ckpt.restore(latest, program.abstract_state, frozen_fingerprint)
    for name, it in iterators.items():
      it.set_state(data_state[name])
    say(f"resumed from the checkpoint at step {latest}")

  groups = program.groups
  peak = config.peak_flops_per_device or flops.peak_flops_per_device()
  step_flops = {g: program.step_flops(g) for g in groups}
  examples_per_step = {g: sum(config.data[n].batch_size for n in g) for g in step_flops}

  # ---- loop
  start_step = int(state["step"])
  # Rows logged after the checkpoint we resume from (a killed run) are dropped: one per step.
  writer = metrics_lib.MetricWriter(workdir, enabled=process == 0, start_step=start_step)
  stop = StopSignals(say)
  if start_step < config.total_steps:
    say(f"step {start_step} of {config.total_steps}: compiling the train step...")
    compile_start = time.perf_counter()
    steps = {g: program.lower(g).compile() for g in groups}  # before any step runs:
    multihost.barrier("train_steps_compiled")  # processes start stepping together
    say(f"compiled in {time.perf_counter() - compile_start:.1f} s")

  def inputs(step):
    """Step `step`'s batches on the mesh, their tokens, and the iterators' state after them."""
    group = groups[step % len(groups)]
    local = {n: next(iterators[n]) for n in group}
    tokens = sum(float(np.asarray(b["attention_mask"]).sum()) for b in local.values())
    return (group, {n: global_batch(b, mesh) for n, b in local.items()}, tokens,
            {n: it.get_state() for n, it in iterators.items()})

  ahead = prefetch.Prefetcher(inputs, start_step, config.total_steps, config.prefetch_steps)
  window_start, window_steps, tokens, window, counts = time.perf_counter(), 0, 0.0, None, {}
  loop_start = first_done = progress_at = window_start  # first_done: after the first step
  preempted = False
  try:
    for step, (group, batches, step_tokens, data_state) in enumerate(ahead, start_step):
      with jax.set_mesh(mesh):
        state, m = steps[group](state, frozen, batches)
      # Sums over the logging window, on device (no sync): the log shows window means.
      window = m if window is None else {**window, **{k: window.get(k, 0) + v for k, v in m.items()}}
      counts.update({k: counts.get(k, 0) + 1 for k in m})
      window_steps += 1
      tokens += step_tokens
      done = step + 1
      # The first step is logged too: its line shows the run is under way.
      if done % config.log_every == 0 or done == config.total_steps or step == start_step:
        last, window = jax.device_get(m), jax.device_get(window)
        m = {k: v / counts[k] for k, v in window.items()}  # means over the window
        m.update(skipped=window["skipped"], nonfinite_total=last["nonfinite_total"])
        elapsed = time.perf_counter() - window_start
        step_time = elapsed / window_steps
        # Records the input pipelines passed over so far (all processes), by reason.
        for n, counts_n in jax.device_get(state["skipped_records"]).items():
          m.update({f"skipped_records/{n}/{r}": int(c)
                    for r, c in zip(loader.SKIP_REASONS, counts_n) if c})
        m.update(lr=last["lr"], step_time=step_time,
                 examples_per_sec=examples_per_step[group] / step_time,
                 tokens_per_sec=tokens / elapsed * processes,
                 mfu=step_flops[group] / step_time / (mesh.size * peak))
        writer.write(done, m)
        window_start, window_steps, tokens, window, counts = time.perf_counter(), 0, 0.0, None, {}
      # Reading the counter waits for the step: do it only now and then, not every step.
      check_now = done % min(config.log_every, config.max_nonfinite_in_row) == 0
      if check_now and int(state["nonfinite_in_row"]) >= config.max_nonfinite_in_row:
        raise NonFiniteLossError(
            f"{int(state['nonfinite_in_row'])} updates in a row had a non-finite loss or "
            f"gradient (max_nonfinite_in_row={config.max_nonfinite_in_row}); lower "
            "optimizer.lr, check the data, or resume from an earlier checkpoint")
      now = time.perf_counter()
      if step == start_step:
        first_done = progress_at = now
        say(f"step {done} of {config.total_steps}: the first step took {now - loop_start:.1f} s")
      elif now - progress_at >= PROGRESS_EVERY_S or done == config.total_steps:
        progress_at = now
        rate = (done - start_step - 1) / max(now - first_done, 1e-9)
        say(f"step {done}/{config.total_steps} ({done / config.total_steps:.1%}) | "
            f"{rate:.3g} steps/s | ETA {eta(config.total_steps - done, rate)}")
      stopping = stop.signal is not None  # read once: the signal's thread may set it any time
      if stopping or done == config.total_steps or done % config.checkpoint_every == 0:
        ckpt.save(done, state, data_state, manifest, force=True)
      if stopping:
        preempted = True
        ckpt.wait()
        say(f"saved the checkpoint at step {done} of {config.total_steps}; the same command "
            "resumes from it")
        break
  finally:
    stop.close()
    ahead.close()  # before the iterators it draws from
    for it in iterators.values():
      it.close()
    ckpt.wait()
    ckpt.close()
    writer.close()

  result = {"step": int(state["step"]), "preempted": preempted, "eval": None}
  if not preempted:
    if process == 0:
      save_loss_plot(workdir)
    if config.eval.kind:  # the frozen weights as trained (frozen_dtype): no fp32 copy
      params = partition.merge(state["params"], frozen)
      result["eval"] = evaluate(config, model, params, workdir, write=process == 0)
  result["state"], result["frozen"] = state, frozen
  return result


def eta(steps: int, rate: float) -> str:
  seconds = int(steps / rate) if rate > 0 else 0
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise ConfigError("--config: required, e.g. --config configs/tiny.py")
  if _PRINT_CONFIG.value:  # with the model's defaults filled in
    config = _CONFIG.value
    config.model = FlamingoConfig.from_dict(config.model).to_dict()
    print(config, end="")
    return
  if not _WORKDIR.value:
    raise ConfigError("--workdir: required (checkpoints, metrics and results go there), "
                      "e.g. --workdir /tmp/run")
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  # A mistake in the flags or the config is one line and exit status 2 (--traceback: the
  # traceback); so is resuming onto other frozen weights.
  cli.run_absl("train", main, (ConfigError, checkpoint.FrozenWeightsMismatch, ValueError, OSError))
