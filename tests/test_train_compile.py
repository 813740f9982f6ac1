"""train_compile.py: train.py's own step compiled for an abstract TPU pod with libtpu on
this CPU machine (libtpu is a test dependency), and its memory checked against the
arithmetic. Only one libtpu process may run at a time: these tests run one after another."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from config_files import ROOT

GIB = 2 ** 30

# configs/tiny.py with widths that are multiples of 128, so TPU tiling pads little and the
# compiled arguments can be held to the arithmetic.
WIDE_TINY = ["--config.model.lm.d_model=256", "--config.model.lm.mlp_dim=512",
             "--config.model.lm.vocab_size=1024", "--config.model.vision.width=128",
             "--config.model.vision.mlp_dim=256", "--config.model.xattn.head_dim=128",
             "--config.model.resampler.head_dim=128"]


def train_compile(*args, check=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # no simulated CPU devices: the devices are the topology's
  p = subprocess.run([sys.executable, os.path.join(ROOT, "train_compile.py"), *args],
                     capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  if check:
    assert p.returncode == 0, p.stderr[-3000:]
  return p


def test_compiles_a_small_config_for_a_v4_slice_and_memory_matches_the_arithmetic():
  p = train_compile("--config", "configs/tiny.py", "--topology", "v4:2x2x1",
                    "--config.mesh.data=2", "--config.mesh.fsdp=2", *WIDE_TINY)
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["devices"] == 4 and out["device_kind"] == "TPU v4"
  assert out["mesh"] == {"slice": 1, "data": 2, "fsdp": 2, "tensor": 1}
  assert out["fits"] is True and out["usable_hbm_gib"] == 30.75
  assert out["compile_s"] > 0 and 0.1 < out["host_peak_gib"] < 8
  (step,) = out["steps"]
  m, arith = step["memory"], step["arguments_arithmetic"]
  assert m["total"] == m["arguments"] + m["outputs"] - m["aliases"] + m["temporaries"] + m["code"]
  assert out["per_device_gib"] == pytest.approx(m["total"] / GIB, abs=1e-3)
  # Arguments: the state, frozen weights and batch shards one device holds (tiling pads a
  # few per cent); the state is donated, so its outputs alias it.
  assert sum(arith.values()) <= m["arguments"] <= 1.1 * sum(arith.values())
  assert arith["state"] <= m["aliases"] <= 1.1 * arith["state"]
  # The arithmetic itself: fsdp 2 splits the LM's weights (the vision tower stays
  # replicated), so a device holds between half and all of the bf16 frozen weights, and
  # between half and all of the fp32 trainable weights with their two Adam moments.
  counts = wide_tiny_counts()
  assert 0.5 * 2 * counts["frozen"] <= arith["frozen"] < 2 * counts["frozen"]
  assert 0.5 * 12 * counts["trainable"] <= arith["state"] < 12 * counts["trainable"] + 4096
  # The FLOP count and the step time it implies at 50% MFU on 4 chips of 275 TFLOP/s.
  assert step["step_flops"] > 0
  assert out["step_s_at_50_mfu"] == pytest.approx(step["step_flops"] / (0.5 * 275e12 * 4))
  assert "fits" in p.stdout and "arithmetic" in p.stdout
  assert step["collective_bytes"]["all-gather"] > 0  # fsdp gathers the weights
  # One dataset of 8 rows over 4 batch shards: the LM runs 2 rows of 15 tokens a shard.
  assert (step["lm_rows"], step["lm_length"], step["lm_fill"]) == (2, 15, 1.0)
  # benchmarks/compile_table.py's README row of it.
  row = compile_table().markdown_row("tiny", "--config configs/tiny.py", out)
  assert row.startswith("| tiny | `python train_compile.py --config configs/tiny.py` | 4 v4 | 2 × 2 × 1 | ")
  assert f"{out['per_device_gib']:.2f} GiB of 30.75: arguments {m['arguments'] / GIB:.2f}" in row
  assert f"| yes | {out['compile_s']:.0f} s |" in row


def compile_table():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import compile_table
  return compile_table


def wide_tiny_counts() -> dict:
  """summary.count of configs/tiny.py with WIDE_TINY's widths."""
  from config_files import load_config
  from flamingo_jax import summary
  from flamingo_jax.config import FlamingoConfig
  config = load_config("tiny")
  config.model.lm.update(d_model=256, mlp_dim=512, vocab_size=1024)
  config.model.vision.update(width=128, mlp_dim=256)
  config.model.xattn.head_dim = config.model.resampler.head_dim = 128
  return summary.count(FlamingoConfig.from_dict(config.model), tuple(config.trainable))


def test_zero1_splits_the_optimizer_state_and_reduce_scatters_the_gradients():
  """ZeRO-1 over data 4 on 4 v4 chips, in the compiled step's HLO: every gradient is
  reduce-scattered (not all-reduced) into quarters, the updated weights all-gathered from
  them; a device holds the fp32 weights and a quarter of their two Adam moments."""
  p = train_compile("--config", "configs/tiny.py", "--topology", "v4:2x2x1", "--config.mesh.data=4",
                    "--config.optimizer_sharding=zero1", *WIDE_TINY)
  (step,) = json.loads(p.stdout.strip().splitlines()[-1])["steps"]
  weights = 4 * wide_tiny_counts()["trainable"]  # fp32 bytes
  c = step["collective_bytes"]
  assert c["reduce-scatter"] == pytest.approx(weights, rel=0.02), c
  assert c["all-gather"] == pytest.approx(weights / 4, rel=0.02), c
  assert c["all-reduce"] < 0.01 * weights, c  # the loss, the norms, the few leaves that do not divide
  assert step["arguments_arithmetic"]["state"] == pytest.approx(weights * (1 + 2 / 4), rel=0.01)
  assert "reduce-scatter" in p.stdout


def test_a_step_too_big_for_the_chip_does_not_fit():
  """Everything trainable with a 2M-row vocabulary: ~2 GB of weights × (params, two
  moments, gradient) replicated on each 15.75 GiB v5e chip cannot fit."""
  p = train_compile("--config", "configs/tiny.py", "--topology", "v5e:2x2",
                    "--config.model.lm.vocab_size=2000000", "--config.model.lm.d_model=256",
                    "--config.trainable=('.*',)")
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["fits"] is False and out["usable_hbm_gib"] == 15.75
  assert out["per_device_gib"] is None or out["per_device_gib"] > 15.75
  row = compile_table().markdown_row("huge", "", out)
  assert "(the compiler's out-of-memory message) of 15.75" in row and "| no |" in row


@pytest.mark.parametrize("args,message", [
    (["--topology", "v4:8x8"], "--topology: 'v4:8x8'; a v4 topology has 3"),
    (["--topology", "v6:2x2"], "GENERATION:AxBxC"),
    (["--topology", "v4:2x2x1", "--config.mesh.tensor=3"], "mesh"),
    (["--topology", "v4:2x2x1", "--config.data.synthetic.batch_size=6"], "data.synthetic.batch_size"),
    (["--topology", "v4:2x2x1", "--config.model.lm.no_such_field=3"], "no_such_field"),
    (["--topology", "v4:2x2x1"], "nothere"),
])
def test_mistakes_are_one_line(args, message):
  config = "configs/nothere.py" if message == "nothere" else "configs/tiny.py"
  p = train_compile("--config", config, *args, check=False)
  assert p.returncode == 2, p.stderr[-2000:]
  lines = [line for line in p.stderr.splitlines() if line.startswith("train_compile: error:")]
  assert len(lines) == 1 and message in lines[0], p.stderr[-2000:]


def test_tpu_meshes_follow_the_topology():
  """On abstract v4 chips the mesh is mesh_utils' (physical axes split only where no exact
  fit exists, as for 8-way tensor on a 4x4x4 torus), not the device list reshaped."""
  code = """
import json
import numpy as np
from jax.experimental import mesh_utils
from flamingo_jax import sharding
from flamingo_jax.train import topology
devices = topology.devices("v4:4x4x4")
ids = np.vectorize(lambda d: d.id)
out = []
for sizes, split in ((dict(slice=1, data=4, fsdp=1, tensor=16), False),
                     (dict(slice=1, data=8, fsdp=1, tensor=8), True)):
  mesh = sharding.make_mesh(sizes, devices)
  want = mesh_utils.create_device_mesh(mesh.devices.shape, devices, allow_split_physical_axes=split)
  plain = np.asarray(devices).reshape(mesh.devices.shape)
  out.append([bool((ids(mesh.devices) == ids(want)).all()), bool((ids(mesh.devices) == ids(plain)).all())])
print(json.dumps(out))
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                     env=env, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert json.loads(p.stdout.strip().splitlines()[-1]) == [[True, False], [True, False]]


def test_compiles_for_two_slices_with_the_slice_axis_over_dcn():
  """--num_slices 2: the abstract devices of two v4:2x2x1 slices; the mesh's outer `slice`
  axis runs over the slices (each row of it one slice's chips), and the step compiles with
  the gradients reduced across them. A mesh.slice that is not the slice count is refused."""
  code = """
import json
import numpy as np
from flamingo_jax import sharding
from flamingo_jax.train import topology
devices = topology.devices("v4:2x2x1", num_slices=2)
mesh = sharding.make_mesh(dict(slice=2, data=4, fsdp=1, tensor=1), devices)
print(json.dumps(np.vectorize(lambda d: d.slice_index)(mesh.devices).tolist()))
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                     env=env, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  slices = np.asarray(json.loads(p.stdout.strip().splitlines()[-1]))
  assert slices.shape == (2, 4, 1, 1) and (slices[0] == 0).all() and (slices[1] == 1).all()

  p = train_compile("--config", "configs/tiny.py", "--topology", "v4:2x2x1", "--num_slices=2",
                    "--config.mesh.slice=2", "--config.mesh.data=4", *WIDE_TINY)
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8 and out["num_slices"] == 2 and out["fits"] is True
  assert out["mesh"] == {"slice": 2, "data": 4, "fsdp": 1, "tensor": 1}
  (step,) = out["steps"]
  assert step["collective_bytes"]["all-reduce"] + step["collective_bytes"]["reduce-scatter"] > 0
  assert "topology 2 × v4:2x2x1: 8 × TPU v4" in p.stdout

  p = train_compile("--config", "configs/tiny.py", "--topology", "v4:2x2x1", "--num_slices=2",
                    check=False)
  assert p.returncode == 2 and "--config.mesh.slice=2" in p.stderr, p.stderr[-2000:]
  assert "Traceback" not in p.stderr


def test_compile_breakdown_sums_the_emission_log_by_model_part():
  """benchmarks/compile_breakdown.py: libtpu's per-instruction emission stats, mapped to
  the model's parts through the HLO's op names: the frozen vision tower only forward, the
  trained parts forward and backward."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_breakdown.py"),
                      "--config", "configs/tiny.py", "--topology", "v4:2x2x1", "--config.mesh.data=4",
                      *WIDE_TINY], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  parts = out["emission"]
  for part in ("resampler", "xattn", "lm"):
    assert parts[f"{part}/forward"]["bundles"] > 0 and parts[f"{part}/backward"]["bundles"] > 0, parts
  assert parts["vision/forward"]["bundles"] > 0 and "vision/backward" not in parts
  assert sum(v["s"] for v in parts.values()) > 0 and out["compile_s"] > 0
