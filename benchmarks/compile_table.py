"""The README's train_compile.py table, measured: every row's command run one at a time,
with this machine's speed read before and after (compile times on a shared 2-core VM vary
between days by 2-3x; the probe says which kind of day a table comes from).

    python benchmarks/compile_table.py [--rows 3b,80b] [--out benchmarks/results/compile_table.json]

Prints one markdown row per command (the README's columns) and writes every
train_compile.py JSON, the probe and the date to `--out`. Needs libtpu
(`pip install -e ".[tpu_compile]"`); about 10-25 minutes for all rows.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3

ROWS = {  # name: (label, train_compile.py arguments)
    "3b": ("flamingo_3b", "--config configs/flamingo_3b.py --topology v4:4x4x4"),
    "3b_fsdp": ("flamingo_3b", "--config configs/flamingo_3b.py --topology v4:4x4x4 "
                "--config.mesh.data=16 --config.mesh.fsdp=4"),
    "9b": ("flamingo_9b", "--config configs/flamingo_9b.py --topology v4:4x4x4"),
    "9b_fsdp": ("flamingo_9b", "--config configs/flamingo_9b.py --topology v4:4x4x4 "
                "--config.mesh.data=16 --config.mesh.fsdp=4"),
    "of3b": ("openflamingo_3b", "--config configs/openflamingo_3b.py --topology v5p:4x4x4"),
    "of9b": ("openflamingo_9b", "--config configs/openflamingo_9b.py --topology v5p:4x4x4"),
    "80b": ("flamingo_80b (the paper's layout: ZeRO-1 over data 96, tensor 16)",
            "--config configs/flamingo_80b.py --topology v4:8x8x24"),
    "80b_fsdp": ("flamingo_80b (fsdp 4, optimizer state with the weights)",
                 "--config configs/flamingo_80b.py --topology v4:8x8x24 "
                 "--config.optimizer_sharding=params --config.mesh.fsdp=4"),
    "80b_replicated": ("flamingo_80b (neither: the state replicated over data)",
                       "--config configs/flamingo_80b.py --topology v4:8x8x24 "
                       "--config.optimizer_sharding=params"),
}


def machine_speed() -> dict:
  """float32 2048² matmuls (numpy, both cores) and a 10M-iteration Python loop (one core)."""
  a = np.random.default_rng(0).random((2048, 2048), np.float32)
  a @ a
  start = time.perf_counter()
  for _ in range(5):
    a @ a
  gflops = 5 * 2 * 2048 ** 3 / (time.perf_counter() - start) / 1e9
  start, s = time.perf_counter(), 0
  for i in range(10_000_000):
    s += i
  return dict(matmul_gflops=round(gflops, 1), python_loop_s=round(time.perf_counter() - start, 3))


def markdown_row(label: str, args: str, r: dict) -> str:
  step = r["steps"][0]
  g = lambda b: f"{b / GIB:.2f}"
  a = step["arguments_arithmetic"]
  usable = r["usable_hbm_gib"]
  if step["memory"] is not None:
    m = step["memory"]
    memory = (f"{step['per_device_gib']:.2f} GiB of {usable}: arguments {g(m['arguments'])} "
              f"(state {g(a['state'])} + frozen {g(a['frozen'])} + batch {g(a['batch'])}), "
              f"temporaries {g(m['temporaries'])}, code {g(m['code'])}")
    compile_s = f"{r['compile_s']:.0f} s"
  else:
    need = "?" if step["per_device_gib"] is None else f"{step['per_device_gib']:.2f}"
    memory = (f"needs {need} GiB (the compiler's out-of-memory message) of "
              f"{usable}; arguments alone {g(a['state'] + a['frozen'])} (state {g(a['state'])} + "
              f"frozen {g(a['frozen'])})")
    compile_s = f"{r['compile_s']:.0f} s (to the out-of-memory error)"
  chips = f"{r['devices']} {r['topology'].split(':')[0]}"
  mesh = f"{r['mesh']['data']} × {r['mesh']['fsdp']} × {r['mesh']['tensor']}"
  return (f"| {label} | `python train_compile.py {args}` | {chips} | {mesh} | {memory} | "
          f"{'yes' if r['fits'] else 'no'} | {compile_s} | {r['host_peak_gib']:.2f} GiB | "
          f"{r['step_flops'] / 1e15:.2f} PFLOP | {r['step_s_at_50_mfu']:.3f} s |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/compile_table.json"))
  flags = parser.parse_args()
  names = flags.rows.split(",")
  unknown = sorted(set(names) - set(ROWS))
  if unknown:
    parser.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")

  report = dict(date=datetime.date.today().isoformat(), speed_before=machine_speed(), rows={})
  print("machine speed:", report["speed_before"], flush=True)
  for name in names:
    label, args = ROWS[name]
    proc = subprocess.run([sys.executable, "train_compile.py", *args.split()], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
      sys.exit(f"{name}: train_compile.py exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    report["rows"][name] = dict(command=f"python train_compile.py {args}", result=result)
    print(markdown_row(label, args, result), flush=True)
  report["speed_after"] = machine_speed()
  print("machine speed:", report["speed_after"])
  with open(flags.out, "w") as f:
    json.dump(report, f, indent=1)
  print(json.dumps(dict(out=flags.out, speed_before=report["speed_before"],
                        speed_after=report["speed_after"],
                        compile_s={n: r["result"]["compile_s"] for n, r in report["rows"].items()})))


if __name__ == "__main__":
  main()
