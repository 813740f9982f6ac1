"""Training speed: one train step of flamingo_jax against open_flamingo's, same model and batch.

    python benchmarks/train_step.py [--vs-openflamingo] [--shape small|tiny|openflamingo_3b|flamingo_3b]
        [--batch 8] [--seq-len 128] [--images 2] [--steps 4] [--dtype float32|bfloat16]
        [--remat none|full|...] [--unroll] [--threads N] [--profile DIR] [--parts]

Ours is the step `train.py` runs, built by `flamingo_jax.train.program.build` from a train
config (the default trainable set: resampler, gated xattn, the `<image>` /
`<|endofchunk|>` embedding rows; AdamW, weight decay 0.1, gradient clip 1.0) on batches
of the `random` source: `--batch` documents of `--seq-len` tokens, `--images` images each.
`--vs-openflamingo` (shapes small and tiny) builds the same weights as open_flamingo's
Flamingo (benchmark_models.build_reference: the files OpenFlamingo's users get, loaded
into ours with `flamingo_jax.load_openflamingo`) and times its step as its
train/train_utils.py runs it: forward with labels (the same tokens and loss mask), backward,
the embedding gradient masked to the two new rows, gradient-norm clip 1.0, torch AdamW
over the same parameters, zero_grad. One warm-up step each (ours compiles), then --steps
timed steps alternating the two sides; medians. The first step's losses are compared
(same weights and batch: they must agree).

Reported: step time, examples/s, tokens/s, MFU (the analytic frozen-aware FLOPs of
flamingo_jax.train.flops over step time and the device's peak: on CPU the fp32 matmul
rate measured here), XLA's own FLOP count of the step (scans unrolled; a check of the
analytic one), the compiled step's memory_analysis(), and the ratio
open_flamingo step time / ours. `--profile DIR` writes a jax.profiler trace of two of our
steps; `--parts` also times pieces of the step on the same batch, alternating with the
steps: ours' frozen vision forward, the rest of the loss's forward (resampler, LM with
xattn, token loss) and that forward with its backward (also with the resampler frozen);
open_flamingo's vision encoder and whole forward under no_grad. Use an idle machine.
Progress goes to stderr; the last line on stdout is one JSON object with every number,
the machine and the command line.
"""
import argparse
import json
import os
import shlex
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_models import (SHAPES, build_reference, init_ours, jax_config,  # noqa: E402
                              load_ours, log, machine, pin_threads, timed)

REFERENCE_SHAPES = ("small", "tiny")  # shapes with a PyTorch build here


# --- the two steps -----------------------------------------------------------------------------

def train_config(model_config, a):
  """The benchmark's train config: defaults (the paper's recipe), one `random` dataset."""
  from flamingo_jax.train import config as train_config_lib
  c = train_config_lib.defaults()
  c.model = model_config.to_dict()
  c.model.remat_policy = a.remat
  c.unroll_layers = a.unroll
  c.frozen_dtype = a.dtype
  c.optimizer.warmup_steps = 0  # open_flamingo's side runs a constant rate too
  c.data.bench = dict(source="random", batch_size=a.batch, seq_len=a.seq_len,
                      max_images=a.images)
  return c


def our_side(config, params=None):
  """(step() -> loss, the host batch, program): train.py's program over all devices, on
  one batch of the `random` source (kept on device; the step is the same for any)."""
  import jax
  from flamingo_jax import sharding
  from flamingo_jax.data import sources
  from flamingo_jax.train import program as program_lib
  program = program_lib.from_config(config)  # checks e.g. that --batch splits over the devices
  mesh, model_config = program.mesh, program.model_config
  if params is None:
    trainable, frozen = program.init_params(config.seed)
  else:
    trainable, frozen = program.place_params(params)
  state = {"state": program.init_state(trainable)}
  data = sources.build("bench", config.data.bench, seed=config.seed, model_config=model_config)
  spec = sharding.batch_sharding(mesh)
  host = data.batch_at(0)
  batches = {"bench": {k: jax.device_put(np.asarray(v), spec) for k, v in host.items()}}
  group, = program.groups
  fn = program.steps[group]

  def step():
    with jax.set_mesh(mesh):
      state["state"], m = fn(state["state"], frozen, batches)
    return float(m["loss"])  # waits for the step
  return step, host, program


def torch_inputs(host: dict):
  """The host batch as open_flamingo takes it: (vision_x [B, M, F, C, H, W], ids, mask)."""
  import torch
  vision_x = torch.from_numpy(np.asarray(host["images"])).permute(0, 1, 2, 5, 3, 4).contiguous()
  ids = torch.from_numpy(np.asarray(host["input_ids"]).astype(np.int64))
  mask = torch.from_numpy(np.asarray(host["attention_mask"]).astype(np.int64))
  return vision_x, ids, mask


def reference_side(ref, host: dict, config):
  """open_flamingo's step (train/train_utils.py) on the same batch: step() -> loss."""
  import torch
  vision_x, ids, mask = torch_inputs(host)
  # HF shifts labels inside the loss: label t + 1 counts where our loss_mask[t] does.
  labels = ids.clone()
  keep = np.concatenate([np.zeros((ids.shape[0], 1), bool),
                         np.asarray(host["loss_mask"])[:, :-1] > 0], axis=1)
  labels[~torch.from_numpy(keep)] = -100
  ref.train()
  embed = ref.lang_encoder.get_input_embeddings().weight
  params = [p for p in ref.parameters() if p.requires_grad]
  o = config.optimizer
  opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                          weight_decay=o.weight_decay)
  rows = [ref.media_token_id, ref.eoc_token_id]

  def step():
    loss = ref(vision_x=vision_x, lang_x=ids, attention_mask=mask, labels=labels)[0]
    loss.backward()
    zero = torch.zeros_like(embed.grad)
    zero[rows] = 1
    embed.grad = embed.grad * zero
    torch.nn.utils.clip_grad_norm_(ref.parameters(), o.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())
  return step


def our_parts(program, params, host: dict) -> dict:
  """Ours in pieces, on the step's batch: the frozen vision tower's forward; the rest of
  the loss's forward (resampler, LM with xattn, token loss) on its features; that
  forward with its backward (the gradient of the trainable weights), and the same with
  the resampler frozen (what its backward costs)."""
  import jax
  import jax.numpy as jnp
  from flamingo_jax.layers.scan import unrolled
  from flamingo_jax.train import partition, step as step_lib
  model = program.model

  def run(fn, *args):
    with unrolled(program.config.unroll_layers):  # as the step's (traced at the first call)
      return jax.block_until_ready(fn(*args))
  trainable, frozen = program.place_params(params)
  whole = partition.merge(trainable, frozen)
  batch = {k: jnp.asarray(np.asarray(v)) for k, v in host.items()}
  vision = jax.jit(lambda p, images: step_lib.vision_features(
      model, p, {"bench": {"images": images}})["bench"])
  inputs = {k: v for k, v in batch.items() if k in step_lib.BATCH_KEYS}
  inputs["vision_features"] = run(vision, whole, batch["images"])
  loss = lambda t, f, x: step_lib.summed_losses(model, partition.merge(t, f), {"bench": x})["bench"]
  forward, gradient = jax.jit(loss), jax.jit(jax.grad(loss))
  # The same split with the resampler's weights among the frozen ones.
  no_resampler = tuple(p for p in program.config.trainable if not p.startswith("resampler"))
  t2, f2 = jax.device_put(partition.split(jax.device_get(whole), no_resampler))
  return {"vision forward": lambda: run(vision, whole, batch["images"]),
          "rest forward": lambda: run(forward, trainable, frozen, inputs),
          "rest forward + backward": lambda: run(gradient, trainable, frozen, inputs),
          "rest forward + backward, resampler frozen": lambda: run(gradient, t2, f2, inputs)}


def reference_parts(ref, host: dict) -> dict:
  """open_flamingo's forward pieces without autograd: its vision encoder (the CLIP tower,
  as `_encode_vision_x` calls it) and the whole forward with labels."""
  import torch
  vision_x, ids, mask = torch_inputs(host)

  def vision():
    with torch.no_grad():
      return ref.vision_encoder(vision_x.flatten(0, 2))[1]

  def whole():
    with torch.no_grad():
      return ref(vision_x=vision_x, lang_x=ids, attention_mask=mask, labels=ids)[0]
  return {"vision forward": vision, "whole forward": whole}


# --- measurements ------------------------------------------------------------------------------

def compiled_numbers(program) -> dict:
  """memory_analysis() of the compiled step, and XLA's FLOP count of the step lowered
  with every scan unrolled (its cost model counts a loop body once)."""
  from flamingo_jax.layers.scan import unrolled
  from flamingo_jax.train import program as program_lib
  group, = program.groups
  mem = program.lower(group).compile().memory_analysis()
  with unrolled():  # a fresh build: the jitted step above caches its scanned trace
    shapes = {n: {k: (v.shape, v.dtype) for k, v in b.items()} for n, b in program.batch_shapes.items()}
    fresh = program_lib.build(program.config, program.model_config, program.mesh, shapes)
    cost = fresh.lower(group).cost_analysis()
  gib = lambda n: round(n / 2 ** 30, 4)
  return dict(xla_flops=float(cost["flops"]),
              memory_gib=dict(arguments=gib(mem.argument_size_in_bytes),
                              outputs=gib(mem.output_size_in_bytes),
                              temporaries=gib(mem.temp_size_in_bytes),
                              aliased=gib(mem.alias_size_in_bytes)))


def run(a) -> dict:
  import jax
  from flamingo_jax.train import flops
  start = time.perf_counter()
  ref = params = None
  if a.vs_openflamingo:
    import torch
    with tempfile.TemporaryDirectory(prefix="flamingo_train_bench_") as tmp:
      ref, clip_cfg, _, _ = build_reference(tmp, SHAPES[a.shape], a.seq_len)
      model, params, _ = load_ours(tmp, clip_cfg, SHAPES[a.shape]["every"], "float32")
    if a.dtype != "float32":
      raise SystemExit("--vs-openflamingo compares float32 steps on CPU (open_flamingo's "
                       "bf16 is CUDA autocast)")
    model_config = model.config
  elif a.shape == "flamingo_3b":
    from configs import flamingo_3b  # the repository root is on sys.path (benchmark_models)
    from flamingo_jax.config import FlamingoConfig
    model_config = FlamingoConfig.from_dict(
        dict(flamingo_3b.get_config().model, dtype=a.dtype, param_dtype=a.dtype))
  else:
    model_config, _ = jax_config(a.shape, a.seq_len, a.dtype)
  config = train_config(model_config, a)
  if params is None and a.shape != "flamingo_3b":
    _, params = init_ours(model_config)  # gates opened, as the reference's
  ours, host, program = our_side(config, params)
  parts = our_parts(program, params, host) if a.parts else {}
  del params
  log(f"{a.shape} ready in {time.perf_counter() - start:.1f} s")

  sides = {"flamingo_jax": ours}
  if ref is not None:
    torch.set_num_threads(a.threads_used)
    sides["open_flamingo"] = reference_side(ref, host, config)
  if a.parts:
    sides.update({f"flamingo_jax {k}": f for k, f in parts.items()})
    if ref is not None:
      sides.update({f"open_flamingo {k}": f for k, f in reference_parts(ref, host).items()})
  first, losses, times = {}, {}, {n: [] for n in sides}
  for name, fn in sides.items():
    first[name], losses[name] = timed(fn)
    if " " not in name:  # a whole step, not a part
      log(f"  {name}: first step {first[name]:.2f} s, loss {losses[name]:.6f}")
  if a.profile:
    with jax.profiler.trace(a.profile):
      ours(), ours()
  for _ in range(a.steps):
    for name, fn in sides.items():
      t, _ = timed(fn)
      times[name].append(t)

  group, = program.groups
  analytic = program.step_flops(group)
  device = jax.devices()[0]
  # On CPU the peak is a matmul measured now: the best of three (one is noisy).
  peak = max(flops.peak_flops_per_device(device) for _ in range(3 if device.platform == "cpu" else 1))
  tokens = a.batch * a.seq_len
  result = dict(batch=a.batch, seq_len=a.seq_len, images=a.images, steps=a.steps)
  if a.parts:
    result["parts_s"] = {n: round(float(np.median(times[n])), 4) for n in sides if " " in n}
  for name in [n for n in ("flamingo_jax", "open_flamingo") if n in sides]:
    med = float(np.median(times[name]))
    result[name] = dict(step_s=round(med, 4), times_s=[round(t, 4) for t in times[name]],
                        first_step_s=round(first[name], 3), first_loss=losses[name],
                        examples_per_s=round(a.batch / med, 3),
                        tokens_per_s=round(tokens / med, 1))
  o = result["flamingo_jax"]
  o.update(compiled_numbers(program))
  o.update(analytic_flops=analytic, xla_over_analytic=round(o["xla_flops"] / analytic, 4),
           mfu=round(analytic / o["step_s"] / (jax.device_count() * peak), 4),
           peak_flops_per_device=peak)
  if "open_flamingo" in result:
    t = result["open_flamingo"]
    t["mfu"] = round(analytic / t["step_s"] / (jax.device_count() * peak), 4)
    result["speedup"] = round(t["step_s"] / o["step_s"], 3)
    result["first_loss_rel_diff"] = abs(o["first_loss"] - t["first_loss"]) / abs(t["first_loss"])
  return result


def report(r: dict) -> None:
  o = r["flamingo_jax"]
  line = (f"batch {r['batch']} x {r['seq_len']} tokens x {r['images']} images: ours "
          f"{o['step_s']:.3f} s/step ({o['examples_per_s']:.2f} ex/s, {o['tokens_per_s']:.0f} "
          f"tok/s, MFU {100 * o['mfu']:.1f}%, XLA/analytic FLOPs {o['xla_over_analytic']:.3f})")
  if "open_flamingo" in r:
    t = r["open_flamingo"]
    line += (f" | open_flamingo {t['step_s']:.3f} s/step (MFU {100 * t['mfu']:.1f}%) | speedup "
             f"{r['speedup']:.2f}x | first-step loss rel. diff {r['first_loss_rel_diff']:.1e}")
  log(line)


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--vs-openflamingo", action="store_true",
                 help="time open_flamingo's step on the same weights and batch, alternating")
  p.add_argument("--shape", choices=[*SHAPES, "flamingo_3b"], default="small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--images", type=int, default=2)
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                 help="compute, parameter and frozen-weight dtype")
  p.add_argument("--remat", default="none", help="FlamingoConfig.remat_policy")
  p.add_argument("--unroll", action="store_true", help="the train config's unroll_layers")
  p.add_argument("--threads", type=int, default=None,
                 help="default: every CPU this process may use")
  p.add_argument("--profile", default="", help="write a jax.profiler trace here")
  p.add_argument("--parts", action="store_true",
                 help="also time the step's pieces (vision forward, the rest's forward, its "
                      "backward; open_flamingo's forwards), alternating with the steps")
  a = p.parse_args(argv)
  if a.vs_openflamingo and a.shape not in REFERENCE_SHAPES:
    p.error(f"--shape {a.shape} has no open_flamingo build here; choose {REFERENCE_SHAPES} or "
            "drop --vs-openflamingo")
  if a.steps < 1 or a.batch < 1 or a.images < 1:
    p.error("need --steps, --batch and --images >= 1")
  return a


def main(argv=None):
  a = parse(argv)
  a.threads_used = pin_threads(a.threads)
  if a.vs_openflamingo:
    import transformers
    transformers.logging.set_verbosity_error()
  start = time.perf_counter()
  from flamingo_jax.config import ConfigError
  try:
    result = run(a)
  except ConfigError as e:  # a flag the train config refuses: one line
    raise SystemExit(f"train_step.py: {e}") from None
  report(result)
  out = dict(benchmark="train_step", command=shlex.join([sys.executable, *sys.argv]),
             machine=machine(a.threads_used, a.vs_openflamingo), shape=a.shape, dtype=a.dtype,
             remat=a.remat, unroll_layers=a.unroll, **result,
             total_s=round(time.perf_counter() - start, 1))
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
