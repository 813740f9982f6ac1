"""Trains Flamingo: frozen vision encoder and LM, trainable resampler and gated xattn.

  python train.py --config configs/demo.py --workdir /tmp/demo [--config.FIELD=VALUE ...]

Re-running the same command on the same workdir resumes from its latest checkpoint.
Sections: config → mesh → data → program (model, shardings and jitted steps, built by
flamingo_jax/train/program.py exactly as train_compile.py builds them) → parameters →
train state → loop.
"""
import json
import os
import signal
import time

from absl import app, flags, logging
import jax
import numpy as np
from ml_collections import config_flags

from flamingo_jax import sharding
from flamingo_jax.data import loader, sources
from flamingo_jax.lm import token_rows
from flamingo_jax.train import checkpoint, flops, metrics as metrics_lib, partition
from flamingo_jax.train import program as program_lib
from flamingo_jax.train.config import check, check_against_init, check_against_mesh

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here.")


EVAL_BATCH = 64  # eval.py --batch-size 64 scores the same batches


class NonFiniteLossError(RuntimeError):
  pass


def init_params(program, config) -> tuple[dict, dict, str]:
  """(trainable, frozen, a description), in their shardings: random from `seed`, or a
  converted checkpoint (`init`)."""
  if config.init:
    from flamingo_jax.convert.openflamingo import load_converted
    init_model, params, _ = load_converted(config.init)
    check_against_init(program.model_config, init_model.config, config.init)
    params = token_rows.with_rows(params, program.model_config)
    return (*program.place_params(params), os.path.abspath(config.init))
  return (*program.init_params(config.seed), f"random init (seed {config.seed})")


def global_batch(local: dict, mesh) -> dict:
  """This process's numpy share → global arrays split over the mesh's batch axes."""
  spec = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(spec, np.asarray(v)) for k, v in local.items()}


def save_loss_plot(workdir: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [r["step"] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(steps, [r["loss"] for r in rows])
  ax.set_xlabel("step"), ax.set_ylabel("training loss"), ax.set_yscale("log")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "loss.png"), dpi=100)
  plt.close(fig)


def evaluate(config, model, params, workdir: str, write: bool = True) -> dict | None:
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
    with open(os.path.join(workdir, "demo_results.json"), "w") as f:
      json.dump(result, f, indent=1)
  return result


def train(config, workdir: str, devices=None) -> dict:
  """Runs (or resumes) training; returns the final state, frozen params and eval result.
  `devices`: the mesh's devices (default: all)."""
  # ---- config (every mistake is reported here, before anything compiles)
  model_config = check(config)
  if config.distributed.enabled:
    d = config.distributed
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU clusters only
    jax.distributed.initialize(d.coordinator_address or None, d.num_processes or None,
                               None if d.process_id < 0 else d.process_id)
  process, processes = jax.process_index(), jax.process_count()
  os.makedirs(workdir, exist_ok=True)

  # ---- mesh
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  check_against_mesh(config, mesh)
  logging.info("mesh %s on %d devices", dict(mesh.shape), mesh.size)

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
  logging.info("trainable %d, frozen %d parameters",
               sum(x.size for x in jax.tree.leaves(trainable)),
               sum(x.size for x in jax.tree.leaves(frozen)))

  # ---- train state (the optimizer sees the trainable subtree only)
  state = program.init_state(trainable)
  del trainable
  state_shardings = program.state_shardings
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
  manifest = dict(frozen_source=frozen_source, frozen_fingerprint=frozen_fingerprint,
                  config=config.to_json())
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = checkpoint.abstract_like(state, state_shardings)
    state, data_state, _ = ckpt.restore(latest, abstract, frozen_fingerprint)
    for name, it in iterators.items():
      it.set_state(data_state[name])
    logging.info("resumed from step %d", latest)

  groups, steps = program.groups, program.steps
  peak = config.peak_flops_per_device or flops.peak_flops_per_device()
  step_flops = {g: program.step_flops(g) for g in groups}
  examples_per_step = {g: sum(config.data[n].batch_size for n in g) for g in step_flops}

  # ---- loop
  writer = metrics_lib.MetricWriter(workdir, enabled=process == 0)
  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda sig, frame: stop.update(signal=sig))
  start_step = int(state["step"])
  window_start, window_steps, tokens, window, counts = time.perf_counter(), 0, 0.0, None, {}
  try:
    for step in range(start_step, config.total_steps):
      group = groups[step % len(groups)]
      local = {n: next(iterators[n]) for n in group}
      with jax.set_mesh(mesh):
        batches = {n: global_batch(b, mesh) for n, b in local.items()}
        state, m = steps[group](state, frozen, batches)
      # Sums over the logging window, on device (no sync): the log shows window means.
      window = m if window is None else {**window, **{k: window.get(k, 0) + v for k, v in m.items()}}
      counts.update({k: counts.get(k, 0) + 1 for k in m})
      window_steps += 1
      tokens += sum(float(np.asarray(b["attention_mask"]).sum()) for b in local.values())
      done = step + 1
      if done % config.log_every == 0 or done == config.total_steps:
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
      data_state = {n: it.get_state() for n, it in iterators.items()}
      if stop["signal"] is not None or done == config.total_steps or done % config.checkpoint_every == 0:
        ckpt.save(done, state, data_state, manifest, force=True)
      if stop["signal"] is not None:
        logging.warning("SIGTERM: saved step %d, exiting", done)
        break
  finally:
    for it in iterators.values():
      it.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    signal.signal(signal.SIGTERM, previous)

  result = {"step": int(state["step"]), "preempted": stop["signal"] is not None, "eval": None}
  if stop["signal"] is None:
    if process == 0:
      save_loss_plot(workdir)
    if config.eval.kind:  # the frozen weights as trained (frozen_dtype): no fp32 copy
      params = partition.merge(state["params"], frozen)
      result["eval"] = evaluate(config, model, params, workdir, write=process == 0)
  result["state"], result["frozen"] = state, frozen
  return result


def main(argv):
  del argv
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
