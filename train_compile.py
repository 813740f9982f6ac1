"""Compiles train.py's update step for a TPU pod on this machine, and says whether it fits.

  python train_compile.py --config configs/flamingo_80b.py --topology v4:8x8x24 [--config.FIELD=VALUE ...]
  python train_compile.py --config ... --topology v5e:16x16 --num_slices 4 --config.mesh.slice=4

The program is train.py's own (flamingo_jax/train/program.py: model, shardings, jitted
steps), built over the abstract devices of `--topology` (libtpu, no TPU needed; see
flamingo_jax/train/topology.py) and only lowered and compiled: parameters, train state
and batches are ShapeDtypeStructs with their shardings, the batch shapes come from the
config's data settings (sources.batch_shapes). Prints the mesh, each step's per-device
memory from XLA (arguments, outputs, aliases, temporaries, code; their total against
the chip's usable HBM) beside the arithmetic of the arguments (state + frozen weights +
batch shards), whether it fits, the bytes each device feeds to collectives in one step
(all-gather, reduce-scatter, all-reduce, ... from the compiled HLO: train/hlo.py), the
compile time, this process's peak host memory, the analytic FLOPs of one step
(frozen-aware, every scanned layer counted: flops.py) and the step time they imply at
50% MFU. The last stdout line is one JSON object:

  {"fits": bool, "compile_s": s, "host_peak_gib": GiB, "per_device_gib": GiB, ...}

Exit status 0 (fits or not: the answer is in the JSON), 2 on a config or topology
mistake (one line on stderr).
"""
import json
import os
import re
import resource
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile on the CPU; libtpu only describes the pod

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from flamingo_jax import cli, sharding  # noqa: E402
from flamingo_jax.config import ConfigError  # noqa: E402
from flamingo_jax.train import hlo, packing, program as program_lib, topology as topology_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v4:8x8x24, v5p:8x8x8, v5e:16x16.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of --topology (multi-slice over DCN); "
                                   "config.mesh.slice must equal it.")

MFU = 0.5
GIB = 2 ** 30


def memory(compiled) -> dict:
  """Per-device bytes from XLA's memory analysis; `total` = arguments + outputs − aliases
  + temporaries + code (what must be resident at once)."""
  m = compiled.memory_analysis()
  out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
             aliases=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
             code=m.generated_code_size_in_bytes)
  out["total"] = out["arguments"] + out["outputs"] - out["aliases"] + out["temporaries"] + out["code"]
  return out


def compile_group(program, group, usable: int) -> dict:
  """Lowers and compiles one step; its memory, or (when it cannot fit) the compiler's
  requirement from its out-of-memory error."""
  start = time.perf_counter()
  lowered = program.lower(group)
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 (XlaRuntimeError RESOURCE_EXHAUSTED)
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
      raise
    needed = [float(v) * (1024 if u == "T" else 1 if u == "G" else 1 / 1024)
              for v, u in re.findall(r"\(([\d.]+)([TGM])\)", text.split("\n")[0])]
    return dict(compile_s=time.perf_counter() - start, fits=False, memory=None,
                per_device_gib=max(needed) if needed else None, error=text.splitlines()[0][:300])
  mem = memory(compiled)
  return dict(compile_s=time.perf_counter() - start, fits=mem["total"] <= usable, memory=mem,
              per_device_gib=mem["total"] / GIB,
              collective_bytes=hlo.collective_bytes(compiled.as_text()))


def run(config, topology_name: str, num_slices: int = 1) -> dict:
  chip, dims = topology_lib.parse(topology_name)
  slice_size = int(dict(config.mesh).get("slice", 1))
  if slice_size != num_slices:
    raise ConfigError(f"mesh.slice: {slice_size}, but --num_slices {num_slices}: the mesh's "
                      f"slice axis runs over the slices; set --config.mesh.slice={num_slices}")
  devices = topology_lib.devices(topology_name, num_slices)
  program = program_lib.from_config(config, devices)
  mesh, shapes = program.mesh, program.batch_shapes
  usable = int(chip.usable_hbm_gib * GIB)
  slices = f"{num_slices} × " if num_slices > 1 else ""
  print(f"topology {slices}{topology_name}: {len(devices)} × {chip.device_kind} "
        f"({chip.usable_hbm_gib} GiB usable HBM, {chip.peak_flops / 1e12:.0f} TFLOP/s bf16 each)")
  print(f"mesh {dict(mesh.shape)}; batch shards {sharding.batch_shards(mesh)}")
  per_step = {n: int(shapes[n]["input_ids"].shape[0]) for n in shapes}
  print("batch per dataset:", ", ".join(f"{n} {b}" for n, b in sorted(per_step.items())))

  results = []
  for group in program.groups:
    arithmetic = program.argument_bytes(group)
    r = compile_group(program, group, usable)
    r.update(group=list(group), arguments_arithmetic=arithmetic)
    # The LM's rows, packed per batch shard and micro-batch (train/packing.py).
    lm = packing.plan_batches({n: shapes[n] for n in group},
                              sharding.batch_shards(mesh) * config.microbatches)
    r.update(lm_rows=lm.rows, lm_length=lm.length, lm_media_slots=lm.slots, lm_fill=lm.fill)
    flops = program.step_flops(group)
    r.update(step_flops=flops, step_s_at_50_mfu=flops / (MFU * chip.peak_flops * len(devices)))
    results.append(r)
    print(f"step over {', '.join(group)}: compiled in {r['compile_s']:.1f} s")
    print(f"  LM: {lm.rows} rows of {lm.length} tokens and {lm.slots} media slots a batch "
          f"shard and micro-batch, packed; {lm.fill:.1%} of their tokens are data, the rest padding")
    gib = lambda b: f"{b / GIB:.2f}"
    if r["memory"] is not None:
      m = r["memory"]
      print(f"  per device: arguments {gib(m['arguments'])} GiB (arithmetic: state "
            f"{gib(arithmetic['state'])} + frozen {gib(arithmetic['frozen'])} + batch "
            f"{gib(arithmetic['batch'])}), outputs {gib(m['outputs'])}, aliases "
            f"{gib(m['aliases'])}, temporaries {gib(m['temporaries'])}, code {gib(m['code'])}")
    need = "?" if r["per_device_gib"] is None else f"{r['per_device_gib']:.2f}"
    print(f"  total {need} GiB of {chip.usable_hbm_gib} usable: "
          f"{'fits' if r['fits'] else 'does NOT fit'}" + (f" ({r['error']})" if "error" in r else ""))
    if "collective_bytes" in r:
      c = r["collective_bytes"]
      print("  collectives per device per step (operand bytes, every loop iteration): "
            + ", ".join(f"{k} {gib(v)} GiB" for k, v in c.items() if v and k != "total")
            + f"; total {gib(c['total'])} GiB")
    print(f"  {flops / 1e15:.2f} PFLOP a step (analytic, frozen-aware): "
          f"{r['step_s_at_50_mfu']:.3f} s a step at {MFU:.0%} MFU")

  host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
  sizes = [r["per_device_gib"] for r in results]
  summary = dict(
      topology=topology_name, num_slices=num_slices, devices=len(devices), device_kind=chip.device_kind,
      mesh=dict(mesh.shape), fits=all(r["fits"] for r in results),
      compile_s=round(sum(r["compile_s"] for r in results), 1),
      host_peak_gib=round(host_peak, 2),
      per_device_gib=None if None in sizes else round(max(sizes), 3),
      usable_hbm_gib=chip.usable_hbm_gib,
      step_flops=sum(r["step_flops"] for r in results),
      step_s_at_50_mfu=sum(r["step_s_at_50_mfu"] for r in results) / len(results),
      batch=per_step, steps=results)
  print(f"host peak memory {host_peak:.2f} GiB")
  return summary


def main(argv):
  del argv
  if _CONFIG.value is None or not _TOPOLOGY.value:
    raise ConfigError("--config and --topology are required, e.g. --config "
                      "configs/flamingo_3b.py --topology v4:4x4x4")
  print(json.dumps(run(_CONFIG.value, _TOPOLOGY.value, _NUM_SLICES.value)), flush=True)


if __name__ == "__main__":
  # Ours name the field; absl's parse errors are one line too (cli.run_absl).
  cli.run_absl("train_compile", main, (ConfigError, topology_lib.TopologyError, ValueError, OSError))
