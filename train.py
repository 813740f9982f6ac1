"""Trains Flamingo: frozen vision encoder and LM, trainable resampler and gated xattn.

  python train.py --config configs/demo.py --workdir /tmp/demo [--config.FIELD=VALUE ...]

Re-running the same command on the same workdir resumes from its latest checkpoint.
Sections: config → mesh → model and parameters → data → train state → step → loop.
"""
import json
import os
import signal
import time

from absl import app, flags, logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from flamingo_jax import sharding
from flamingo_jax.data import loader, sources
from flamingo_jax.lm import token_rows
from flamingo_jax.model import Flamingo
from flamingo_jax.train import checkpoint, flops, metrics as metrics_lib, optimizer as optim
from flamingo_jax.train import partition, step as step_lib
from flamingo_jax.train.config import check, check_against_init, check_against_mesh

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here.")


EVAL_BATCH = 64  # eval.py --batch-size 64 scores the same batches


class NonFiniteLossError(RuntimeError):
  pass


def init_params(model, config, model_config, mesh, rules, example_batch):
  """All parameters, sharded: random from `seed`, or a converted checkpoint (`init`).
  Returns (params, their abstract tree with logical axis names, a description)."""
  images, ids = example_batch.get("images"), example_batch["input_ids"]
  # An explicit media index: init needs no `<image>` id (the paper configs have none).
  init = lambda rng: model.init(rng, images, ids, media_index=jnp.zeros(ids.shape, jnp.int32))
  abstract = jax.eval_shape(init, jax.random.PRNGKey(config.seed))["params"]
  shardings = nn.unbox(sharding.param_shardings(abstract, mesh, rules))
  if config.init:
    from flamingo_jax.convert.openflamingo import load_converted
    init_model, params, _ = load_converted(config.init)
    check_against_init(model_config, init_model.config, config.init)
    params = token_rows.with_rows(params, model_config)
    return jax.device_put(params, shardings), abstract, os.path.abspath(config.init)
  params = jax.jit(lambda rng: nn.unbox(init(rng))["params"], out_shardings=shardings)(
      jax.random.PRNGKey(config.seed))
  return params, abstract, f"random init (seed {config.seed})"


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
  rules = sharding.rules(config.sharding_rules)
  check_against_mesh(config, mesh)
  logging.info("mesh %s on %d devices", dict(mesh.shape), mesh.size)

  # ---- data: one iterator per dataset; this process loads its share of each batch
  iterators = {name: sources.build(name, d, seed=config.seed, process_index=process,
                                   process_count=processes)
               for name, d in config.data.items()}
  weights = {name: float(d.get("weight", 1.0)) for name, d in config.data.items()}
  example = {name: it.batch_at(0) for name, it in iterators.items()}

  # ---- model and parameters: trainable (fp32) and frozen (bf16) subtrees
  model = Flamingo(model_config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params, abstract_params, frozen_source = init_params(
        model, config, model_config, mesh, rules, next(iter(example.values())))
  trainable, frozen = partition.split(params, tuple(config.trainable))
  del params
  trainable = partition.cast(trainable, jnp.float32)
  frozen = partition.cast(frozen, jnp.dtype(config.frozen_dtype))
  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
  frozen_fingerprint = checkpoint.fingerprint(frozen)
  logging.info("trainable %d, frozen %d parameters",
               sum(x.size for x in jax.tree.leaves(trainable)),
               sum(x.size for x in jax.tree.leaves(frozen)))

  # ---- train state (the optimizer sees the trainable subtree only)
  opt = optim.build(**dict(config.optimizer), total_steps=config.total_steps)
  o = config.optimizer
  schedule = optim.learning_rate(o.lr, o.warmup_steps, o.decay, config.total_steps)
  skip_counters = {n: len(loader.SKIP_REASONS) for n, b in example.items() if "skipped" in b}
  new_state = lambda t: step_lib.init_state(t, opt, jax.random.PRNGKey(config.seed + 1),
                                            skip_counters)
  # Optimizer moments inherit their parameter's logical axis names: shard them alike.
  abstract_trainable, _ = partition.split(abstract_params, tuple(config.trainable))
  abstract_state = jax.eval_shape(new_state, abstract_trainable)
  state_shardings = nn.unbox(sharding.param_shardings(abstract_state, mesh, rules))
  state = jax.jit(new_state, out_shardings=state_shardings)(trainable)
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

  # ---- the update step: jit with explicit shardings, the state donated
  def compiled_step(names):
    fn = step_lib.make_train_step(model, opt, {n: weights[n] for n in names}, config.microbatches,
                                  learning_rate=schedule)
    with_rules = lambda s, f, b: _with_rules(rules, fn, s, f, b)
    batch = sharding.batch_sharding(mesh)
    in_shardings = (state_shardings, frozen_shardings,
                    {n: jax.tree.map(lambda _: batch, example[n]) for n in names})
    return jax.jit(with_rules, donate_argnums=(0,), in_shardings=in_shardings,
                   out_shardings=(state_shardings, None))
  groups = ([sorted(iterators)] if config.accumulation == "all" else [[n] for n in sorted(iterators)])
  steps = {tuple(g): compiled_step(g) for g in groups}

  peak = config.peak_flops_per_device or flops.peak_flops_per_device()
  step_flops = {tuple(g): flops.train_step_flops(model, {n: example[n] for n in g},
                                                 tuple(config.trainable)) for g in groups}
  examples_per_step = {g: sum(config.data[n].batch_size for n in g) for g in step_flops}

  # ---- loop
  writer = metrics_lib.MetricWriter(workdir, enabled=process == 0)
  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda sig, frame: stop.update(signal=sig))
  start_step = int(state["step"])
  window_start, window_steps, tokens, window, counts = time.perf_counter(), 0, 0.0, None, {}
  try:
    for step in range(start_step, config.total_steps):
      group = tuple(groups[step % len(groups)])
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


def _with_rules(rules, fn, *args):
  with nn.logical_axis_rules(rules):
    return fn(*args)


def main(argv):
  del argv
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
