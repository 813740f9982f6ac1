"""Where a TPU compile of train.py's step spends its time: libtpu's per-instruction code
emission, summed by what the instruction computes.

    python benchmarks/compile_breakdown.py --config configs/flamingo_3b.py --topology v4:4x4x4 \
        [--part step|vision] [--top 15] [--config.FIELD=VALUE ...]

Builds the program as train_compile.py does (flamingo_jax/train/program.py over the
abstract devices of `--topology`), compiles it with libtpu's lowering statistics on
(`--xla_tpu_impure_dump_lowering_stats`: one `LLO-STATS` line a fused instruction, with
its emission start / end in µs and its bundle count) and maps each instruction to its
JAX source through the op_name metadata of `compiled.as_text()`. Prints wall and CPU time
of lower and compile, then emission seconds and bundles by part (vision tower,
resampler, LM, gated xattn, the LM's unscanned tail group, optimizer, other) and pass (forward, backward = transpose /
remat recompute), then the `--top` costliest instructions. The code generator runs on
several threads: summed emission seconds can exceed the wall time.

`--part vision`: the frozen vision tower's forward alone, on the step's images.
The last stdout line is one JSON object with every total.
"""
import collections
import json
import os
import re
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # uninstalled
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "")
                                  + " --xla_tpu_impure_dump_lowering_stats=true").strip()
os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "0")
os.environ.setdefault("TPU_MIN_LOG_LEVEL", "0")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v4:4x4x4.")
_PART = flags.DEFINE_enum("part", "step", ["step", "vision"], "What to compile.")
_TOP = flags.DEFINE_integer("top", 15, "Costliest instructions to list.")

STATS = re.compile(r"LLO-STATS:.*?START\((\d+)\).*?END\((\d+)\).*?HLO\(([^)]*)\).*?NUM_BUNDLES\((\d+)\)")
PARTS = (("lm tail", r"/tail/"), ("vision", r"vision_(?:features|tower|encoder)|/vision/"), ("resampler", r"resampler"),
         ("xattn", r"xattn|gated_cross"), ("lm", r"lm_logits|/lm/|decoder|layers_\d|embed"),
         ("optimizer", r"optax|adam|clip|apply_updates|scale_by"))


def cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def op_names(hlo_text: str) -> dict:
  """Instruction name → op_name of its metadata (a fusion's: its root's, else its first
  fused instruction's)."""
  names, fused_first = {}, {}
  current = None
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
    if not m:
      c = re.match(r"\s*%?([\w.\-]+)\s*[({]", line)
      if c and "{" in line and "=" not in line.split("{")[0]:
        current = c.group(1)
      continue
    name = m.group(1)
    op = re.search(r'op_name="([^"]*)"', line)
    if op:
      names.setdefault(name, op.group(1))
      if current:
        fused_first.setdefault(current, op.group(1))
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if called and name not in names and called.group(1) in fused_first:
      names[name] = fused_first[called.group(1)]
  return names


def classify(op_name: str) -> tuple[str, str]:
  part = next((p for p, pattern in PARTS if re.search(pattern, op_name)), "other")
  backward = "transpose(" in op_name or "rematted_computation" in op_name
  return part, "backward" if backward else "forward"


def compile_with_stats(lowered):
  """(compiled, [(hlo name, seconds, bundles)]) with libtpu's stderr captured."""
  with tempfile.TemporaryFile(mode="w+b") as log:
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
      compiled = lowered.compile()
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    log.seek(0)
    text = log.read().decode(errors="replace")
  stats = [(m.group(3), (int(m.group(2)) - int(m.group(1))) / 1e6, int(m.group(4)))
           for m in STATS.finditer(text)]
  if not stats:
    raise SystemExit("no LLO-STATS lines: this libtpu does not print them; stderr ended with:\n"
                     + text[-2000:])
  return compiled, stats


def main(argv):
  del argv
  import flax.linen as nn
  import jax
  from flamingo_jax.train import partition, program as program_lib, step as step_lib, topology

  program = program_lib.from_config(_CONFIG.value, topology.devices(_TOPOLOGY.value))
  group = program.groups[0]
  t0, c0 = time.perf_counter(), cpu_s()
  if _PART.value == "vision":
    state, frozen, batches = program.abstract_inputs(group)
    images = {n: {"images": b["images"]} for n, b in batches.items() if "images" in b}

    def vision(trainable, frozen, images):
      with nn.logical_axis_rules(program.rules):
        return step_lib.vision_features(program.model, partition.merge(trainable, frozen), images)
    with jax.set_mesh(program.mesh):
      lowered = jax.jit(vision).lower(state["params"], frozen, images)
  else:
    lowered = program.lower(group)
  lower_s, lower_cpu = time.perf_counter() - t0, cpu_s() - c0
  compiled, stats = compile_with_stats(lowered)
  compile_s, compile_cpu = time.perf_counter() - t0 - lower_s, cpu_s() - c0 - lower_cpu

  names = op_names(compiled.as_text())
  seconds, bundles = collections.Counter(), collections.Counter()
  for hlo, s, b in stats:
    key = classify(names.get(hlo, ""))
    seconds[key] += s
    bundles[key] += b
  print(f"lower {lower_s:.1f} s (CPU {lower_cpu:.1f}); compile {compile_s:.1f} s (CPU {compile_cpu:.1f})")
  print(f"emission: {sum(seconds.values()):.1f} s summed over threads, "
        f"{sum(bundles.values())} bundles, {len(stats)} instructions")
  for key, s in seconds.most_common():
    print(f"  {key[0]:>10} {key[1]:>8}: {s:7.1f} s  {bundles[key]:>8} bundles")
  print(f"costliest {_TOP.value}:")
  for hlo, s, b in sorted(stats, key=lambda x: -x[1])[:_TOP.value]:
    print(f"  {s:6.2f} s {b:>7} bundles  {hlo}: {names.get(hlo, '?')[:160]}")
  print(json.dumps(dict(config=sys.argv, lower_s=lower_s, lower_cpu_s=lower_cpu, compile_s=compile_s,
                        compile_cpu_s=compile_cpu,
                        emission={f"{p}/{d}": dict(s=round(seconds[(p, d)], 2), bundles=bundles[(p, d)])
                                  for p, d in seconds})))


if __name__ == "__main__":
  app.run(main)
