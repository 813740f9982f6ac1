"""train.py on the tiny config: what trains, meshes, exact resumption, preemption, NaNs."""
import json
import os
import signal
import subprocess
import sys
import time

import flax.traverse_util as tu
import jax
import numpy as np
import pytest

from config_files import ROOT, load_config
from flamingo_jax.data import sources
from flamingo_jax.train import checkpoint

sys.path.insert(0, ROOT)
import train as train_lib  # noqa: E402


def tiny_config(**overrides):
  config = load_config("tiny")
  config.log_every = 1
  config.update_from_flattened_dict(overrides)
  return config


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def flat(tree):
  return tu.flatten_dict(jax.device_get(tree), sep="/")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """10 steps on an 8-way data mesh; the other tests compare against it."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = train_lib.train(tiny_config(total_steps=10), workdir)
  return workdir, result


def test_only_trainable_parameters_change(reference_run, tmp_path):
  _, result = reference_run
  config = tiny_config()
  # The initial parameters, from the same seed, before any update.
  init = train_lib.train(tiny_config(total_steps=1, **{"optimizer.lr": 1e-30}), str(tmp_path))
  trained, frozen = flat(result["state"]["params"]), flat(result["frozen"])
  initial_trainable, initial_frozen = flat(init["state"]["params"]), flat(init["frozen"])
  assert set(frozen) == set(initial_frozen)
  for k in frozen:  # bitwise unchanged
    np.testing.assert_array_equal(frozen[k], initial_frozen[k], err_msg=k)
  assert all(k.startswith(("resampler/", "lm/new_tokens/")) or "/xattn/" in k for k in trained)
  assert not any(k.startswith(("vision/", "lm/embed/")) for k in trained)
  # The <image> / <|endofchunk|> rows trained; the frozen embedding table did not.
  assert not np.allclose(trained["lm/new_tokens/embedding"], initial_trainable["lm/new_tokens/embedding"])
  assert frozen["lm/embed/embedding"].dtype == np.dtype(config.frozen_dtype)
  assert trained["lm/new_tokens/embedding"].dtype == np.float32


def frozen_kernels(config) -> dict:
  """Module path → kernel shape [in, out] of every frozen matmul weight of `config`."""
  import flax.linen as nn
  from flamingo_jax.train import partition
  _, frozen = partition.split(nn.unbox(program_for(config).abstract_params), tuple(config.trainable))
  return {k[:-len("/kernel")]: tuple(v.shape[-2:])
          for k, v in tu.flatten_dict(frozen, sep="/").items() if k.endswith("/kernel")}


def weight_gradient_matmuls(config, kernels: dict) -> list[str]:
  """The backward matmuls (`transpose(jvp(...))` in XLA's op names) of `config`'s compiled
  step that output the kernel shape of one of `kernels`' modules: its weight gradient."""
  import re
  program = program_for(config)
  hlo = program.lower(program.groups[0]).compile().as_text()
  found = set()
  for line in hlo.splitlines():
    m = re.search(r'= f32\[([\d,]+)\]\S* (?:dot|fusion)\(.*op_name="([^"]*transpose\(jvp[^"]*'
                  r'dot_general)"', line)
    if not m or "kind=kLoop" in line:  # elementwise (a weight's layout copy), not a matmul
      continue
    shape = tuple(int(x) for x in m.group(1).split(","))
    for module, kernel in kernels.items():
      path = module.split("/")
      tail = "/".join(path[-3:])  # op names drop the scanned stack's prefix
      if f"/{tail}/" in m.group(2) and shape[-2:] in (kernel, kernel[::-1]):
        found.add(module)
      # Kernels fused into one matmul (linear.dense_together): named by their parent
      # module, the gradient of n ≥ 2 stacked kernels [in, n·out] in some layout.
      fused = "/".join(path[-3:-1])
      stacked = lambda a, b: a == kernel[0] and np.prod(b) in (2 * kernel[1], 3 * kernel[1])
      if f"/{fused}/checkpoint/" in m.group(2) and (stacked(shape[0], shape[1:]) or stacked(shape[-1], shape[:-1])):
        found.add(module)
  return sorted(found)


def test_compiled_step_computes_no_frozen_weight_gradient():
  """No frozen weight gets a gradient matmul in the compiled step (activation gradients
  still flow through the frozen LM). The same search finds them once the LM's MLPs train."""
  config = tiny_config()
  kernels = frozen_kernels(config)
  assert any("/mlp/" in k for k in kernels) and any(k.startswith("vision/") for k in kernels)
  assert weight_gradient_matmuls(config, kernels) == []
  config.trainable = tuple(config.trainable) + (r"lm/groups/layers/mlp/.*",)
  found = weight_gradient_matmuls(config, kernels)
  assert found and all("/mlp/" in k for k in found), found
  assert {k.split("/")[-1] for k in found} >= {"up", "down"}, found  # fused with gate, and alone


def test_optimizer_state_has_no_frozen_leaf(reference_run):
  _, result = reference_run
  trainable_shapes = {tuple(np.shape(x)) for x in jax.tree.leaves(result["state"]["params"])}
  frozen_paths = set(flat(result["frozen"]))
  n_trainable = len(jax.tree.leaves(result["state"]["params"]))
  opt_leaves = jax.tree_util.tree_leaves_with_path(result["state"]["opt"])
  big = [(jax.tree_util.keystr(p), x) for p, x in opt_leaves if np.ndim(x) > 0]
  assert len(big) == 2 * n_trainable  # Adam's two moments, nothing else
  for path, x in big:
    assert tuple(np.shape(x)) in trainable_shapes
    assert not any(f.replace("/", "']['") in path for f in frozen_paths), path


def test_one_device_gives_the_same_losses(reference_run, tmp_path):
  """(fsdp × tensor: test_restore_onto_a_different_mesh trains its last 5 steps there.)"""
  workdir, _ = reference_run
  train_lib.train(tiny_config(total_steps=10, mesh=dict(slice=1, data=1, fsdp=1, tensor=1)),
                  str(tmp_path), devices=jax.devices()[:1])
  ours, ref = losses(str(tmp_path)), losses(workdir)
  np.testing.assert_allclose([ours[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)],
                             rtol=2e-3)


def test_input_made_in_the_loop_gives_the_same_losses(reference_run, tmp_path):
  """prefetch_steps 0 (each step's batches made before it) against the reference run's
  background thread 2 steps ahead: the same batches, bit for bit the same losses."""
  workdir, _ = reference_run
  train_lib.train(tiny_config(total_steps=10, prefetch_steps=0), str(tmp_path))
  assert losses(str(tmp_path)) == losses(workdir)


def test_unrolled_layers_give_the_same_losses(reference_run, tmp_path):
  """unroll_layers: no loop over any layer stack in the step (the one left is the
  micro-batches'), and the same training as the scanned reference run's."""
  from flamingo_jax.train import program as program_lib
  def loops(config):
    program = program_lib.from_config(config)
    return program.lower(*program.groups).as_text().count("stablehlo.while")
  assert loops(tiny_config(unroll_layers=True)) == 1 < loops(tiny_config())
  workdir, _ = reference_run
  train_lib.train(tiny_config(total_steps=10, unroll_layers=True), str(tmp_path))
  ours, ref = losses(str(tmp_path)), losses(workdir)
  np.testing.assert_allclose([ours[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=1e-5)


def test_restore_onto_a_different_mesh(reference_run, tmp_path):
  """Train 5 steps on 8-way data parallelism, resume on fsdp × tensor: the same losses."""
  workdir, _ = reference_run
  train_lib.train(tiny_config(total_steps=5, checkpoint_every=5), str(tmp_path))
  train_lib.train(tiny_config(total_steps=10, mesh=dict(slice=1, data=1, fsdp=2, tensor=4)),
                  str(tmp_path))
  ours, ref = losses(str(tmp_path)), losses(workdir)
  np.testing.assert_allclose([ours[s] for s in range(1, 11)], [ref[s] for s in range(1, 11)],
                             rtol=2e-3)


def _run_train(workdir, *overrides):
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
       "--workdir", workdir, "--config.log_every=1", *overrides],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})


def _wait_for(condition, proc, timeout=300):
  start = time.time()
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"train.py exited early:\n{proc.stdout.read()}")
    if time.time() - start > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.005)


def test_crash_and_resume_is_bitwise_exact(reference_run, tmp_path):
  """kill -9 after the step-5 checkpoint, resume: parameters equal the straight run's."""
  _, straight = reference_run
  workdir = str(tmp_path)
  proc = _run_train(workdir, "--config.total_steps=100000", "--config.checkpoint_every=5")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  _wait_for(lambda: checkpoint.Checkpointer(ckpt_dir).latest_step() is not None, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  latest = checkpoint.Checkpointer(ckpt_dir).latest_step()
  assert latest is not None and latest < 10, latest
  resumed = train_lib.train(tiny_config(total_steps=10, checkpoint_every=5), workdir)
  for k, v in flat(straight["state"]["params"]).items():
    np.testing.assert_array_equal(flat(resumed["state"]["params"])[k], v, err_msg=k)
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed["state"]["opt"])),
                  jax.tree.leaves(jax.device_get(straight["state"]["opt"]))):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_exits_zero(tmp_path):
  workdir = str(tmp_path)
  proc = _run_train(workdir, "--config.total_steps=100000", "--config.checkpoint_every=100000")
  _wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl"))
            and len(losses(workdir)) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  latest = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step()
  assert latest is not None and latest >= 3


def test_resume_refuses_other_frozen_weights(tmp_path):
  train_lib.train(tiny_config(total_steps=2), str(tmp_path))
  with pytest.raises(checkpoint.FrozenWeightsMismatch, match="frozen weights"):
    train_lib.train(tiny_config(total_steps=4, seed=1), str(tmp_path))


def poison(nan_steps):
  """sources.build, with NaN images in the global batches `nan_steps(step)` selects."""
  build = sources.build

  def poisoned(*args, **kwargs):
    it = build(*args, **kwargs)
    example_at = it.example_at

    def with_nan(position):
      example = example_at(position)
      if nan_steps(position // it.global_batch_size):
        example["images"] = np.full_like(example["images"], np.nan)
      return example
    it.example_at = with_nan
    return it
  return poisoned


def test_nan_batch_is_skipped_and_counted(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "build", poison(lambda step: step == 2))
  result = train_lib.train(tiny_config(total_steps=6), str(tmp_path))
  metrics = [json.loads(l) for l in open(os.path.join(str(tmp_path), "metrics.jsonl"))]
  assert [m["skipped"] for m in metrics] == [0, 0, 1, 0, 0, 0]
  assert metrics[-1]["nonfinite_total"] == 1
  # The logged rate is the one each update applied: warm-up 1e-3 * n / 5 at optax's count
  # n (updates applied so far), which the skipped update does not advance.
  np.testing.assert_allclose([m["lr"] for m in metrics],
                             [1e-3 * n / 5 for n in (0, 1, 2, 2, 3, 4)], rtol=1e-6)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(result["state"]["params"]))
  assert np.isfinite(metrics[-1]["loss"])


def test_many_nonfinite_updates_in_a_row_stop_the_run(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "build", poison(lambda step: True))
  with pytest.raises(train_lib.NonFiniteLossError, match="3 updates in a row"):
    train_lib.train(tiny_config(total_steps=10, max_nonfinite_in_row=3), str(tmp_path))


def test_config_mistakes_are_reported_before_compiling(tmp_path):
  from flamingo_jax.config import ConfigError
  for overrides, field in [({"optimizer.lr": -1.0}, "optimizer.lr"),
                           ({"accumulation": "sometimes"}, "accumulation"),
                           ({"model.xattn.every": 9}, "xattn.every"),
                           ({"data.synthetic.batch_size": 0}, "data.synthetic.batch_size"),
                           ({"prefetch_steps": -1}, "prefetch_steps")]:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
      train_lib.train(tiny_config(**overrides), str(tmp_path))
  with pytest.raises(ValueError, match="config.mesh"):
    train_lib.train(tiny_config(mesh=dict(slice=1, data=3, fsdp=1, tensor=1)), str(tmp_path))
  with pytest.raises(ConfigError, match=r"data\.synthetic\.batch_size: 4 does not split"):
    train_lib.train(tiny_config(**{"data.synthetic.batch_size": 4}), str(tmp_path))


def test_microbatches_give_the_same_update(reference_run, tmp_path):
  workdir, _ = reference_run
  # 4 devices: each micro-batch of 4 must split over the batch shards (checked).
  train_lib.train(tiny_config(total_steps=10, microbatches=2), str(tmp_path),
                  devices=jax.devices()[:4])
  ours, ref = losses(str(tmp_path)), losses(workdir)
  np.testing.assert_allclose([ours[s] for s in range(1, 11)], [ref[s] for s in range(1, 11)],
                             rtol=1e-4)


@pytest.mark.parametrize("accumulation", ["all", "round_robin"])
def test_several_datasets_with_weights(tmp_path, accumulation):
  config = tiny_config(total_steps=4, accumulation=accumulation)
  config.data.paired = dict(source="synthetic", batch_size=16, weight=0.2, seed=7)
  train_lib.train(config, str(tmp_path))
  metrics = [json.loads(l) for l in open(os.path.join(str(tmp_path), "metrics.jsonl"))]
  if accumulation == "all":  # every update sees both, loss = Σ λ · loss
    for m in metrics:
      assert m["loss"] == pytest.approx(m["loss/synthetic"] + 0.2 * m["loss/paired"], rel=1e-5)
  else:  # alternate, in name order
    assert ["loss/paired" in m for m in metrics] == [True, False, True, False]
    assert ["loss/synthetic" in m for m in metrics] == [False, True, False, True]


def test_two_processes_train_like_one(reference_run, tmp_path):
  """Multi-host: 2 processes × 4 CPU devices, each loading its half of every batch,
  reproduce the single-process 8-device losses."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path)
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
       "--workdir", workdir, "--config.total_steps=10", "--config.log_every=1",
       "--config.distributed.enabled=True", f"--config.distributed.coordinator_address=localhost:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  ours, ref = losses(workdir), losses(reference_run[0])
  np.testing.assert_allclose([ours[s] for s in range(1, 11)], [ref[s] for s in range(1, 11)],
                             rtol=2e-3)


def test_prepared_dataset_skip_counts_are_logged_and_survive_resume(tmp_path, tokenizer_dir):
  """train.py on a prepared pairs dataset holding undecodable images: the skips of every
  process are counted on device, logged, and carried through a checkpoint."""
  from data_files import caption, jpeg
  from flamingo_jax.data import loader, prepare, prepared
  from flamingo_jax.data.tokenizer import load_tokenizer
  records = [{"id": f"r:{i}", "image": jpeg(i), "caption": caption(i)} for i in range(12)]
  for i in (3, 8):
    records[i] = dict(records[i], image=b"not an image")
  prepare.BUILDERS["pairs"](records=iter(records), data_dir=str(tmp_path / "data"),
                            metadata={"tokenizer": prepare.tokenizer_metadata(tokenizer_dir)}
                            ).download_and_prepare()
  _, specials = load_tokenizer(tokenizer_dir)
  config = tiny_config(total_steps=3, checkpoint_every=3, **{
      "model.lm.vocab_size": 320, "model.media_token_id": specials.media_token_id,
      "model.eoc_token_id": specials.eoc_token_id,
      "model.trainable_token_ids": (specials.media_token_id, specials.eoc_token_id)})
  config.data = {"pairs": dict(source="prepared", path=str(tmp_path / "data"), batch_size=8,
                               seq_len=16, image_size=32, weight=1.0)}
  workdir = str(tmp_path / "run")
  train_lib.train(config, workdir)
  config.total_steps = 6
  result = train_lib.train(config, workdir)  # resumes at step 3
  want = sum(prepared.build_iterator(str(tmp_path / "data"), 8, seq_len=16, image_size=32)
             .batch_at(s)["skipped"].sum(0) for s in range(6))
  assert want[loader.SKIP_REASONS.index("image_decode")] >= 2  # 48 positions, 4 epochs
  np.testing.assert_array_equal(result["state"]["skipped_records"]["pairs"], want)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = [json.loads(line) for line in f][-1]
  assert last["step"] == 6
  assert last["skipped_records/pairs/image_decode"] == want[loader.SKIP_REASONS.index("image_decode")]


def program_for(config):
  """train.py's program for `config` on all devices, shapes from the config's data."""
  from flamingo_jax.train import program as program_lib
  return program_lib.from_config(config)


def test_init_needs_no_media_token_id():
  """The paper configs have no `<image>` id: init passes its own media index, and the
  values do not depend on it (the same params as with the tiny config's id)."""
  def init(media_token_id):
    config = tiny_config()
    config.model.media_token_id = media_token_id
    trainable, frozen = program_for(config).init_params(config.seed)
    return {**flat(trainable), **flat(frozen)}

  with_id, without = init(load_config("tiny").model.media_token_id), init(-1)
  assert with_id.keys() == without.keys()
  for k in with_id:
    np.testing.assert_array_equal(with_id[k], without[k], err_msg=k)


def test_init_creates_frozen_weights_in_frozen_dtype():
  """Random init returns the frozen subtree in frozen_dtype and the trainable one in
  float32, from one jit whose outputs are already those dtypes."""
  config = tiny_config()
  trainable, frozen = program_for(config).init_params(config.seed)
  assert {x.dtype for x in jax.tree.leaves(frozen)} == {np.dtype(jax.numpy.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(trainable)} == {np.dtype(np.float32)}


def test_microbatches_stay_sharded():
  """Splitting a data-sharded batch into micro-batches, and packing two datasets' rows of
  other lengths into one LM call, move no rows between devices: the compiled step has no
  all-gather (it had 21 when micro-batch j was rows j·B/n ...)."""
  config = tiny_config(microbatches=2, **{"data.synthetic.batch_size": 16})  # 2 rows a device
  config.data.short = dict(source="random", batch_size=48, weight=0.5, seq_len=5, max_images=1)
  program = program_for(config)
  assert {s["input_ids"].shape[1] for s in program.batch_shapes.values()} == {5, 15}  # 3 rows of 5 a packed row
  hlo = program.lower(program.groups[0]).compile().as_text()
  assert program.mesh.shape["data"] == 8 and "all-gather" not in hlo


def shrunk_paper_config(name):
  """configs/{name}.py (its data: random batches of the paper's shapes, 256 tokens and 5
  images for M3W, 8-frame clips for VTP; its tokenizer's ids) with a tiny model and
  32-pixel images, so that a CPU can run it."""
  config = load_config(name)
  config.model.vision = dict(kind="nfnet", variant="F0", image_size=32, depths=(1, 1, 1, 1),
                             widths=(32, 64, 64, 64), stem_width=16, group_width=16)
  config.model.resampler.update(dim=64, depth=1, num_heads=2, head_dim=16, num_latents=4)
  config.model.lm.update(d_model=64, num_layers=2, num_heads=2, mlp_dim=128)
  config.model.xattn.update(num_heads=2, head_dim=16, ff_dim=128, every=1)
  config.model.remat_policy = "none"
  for d in config.data.values():
    d.batch_size, d.image_size = 2, 32
  config.mesh = dict(slice=1, data=1, fsdp=1, tensor=1)
  config.update(total_steps=1, log_every=1)
  return config


def test_paper_config_starts_on_random_batches_of_its_shapes(tmp_path):
  """train.py on configs/flamingo_3b.py as shipped but for the model's size: the four
  datasets of the paper's mixture, its special ids, one update with finite losses."""
  from flamingo_jax import presets
  config = shrunk_paper_config("flamingo_3b")
  assert config.model.media_token_id == presets.PAPER_MEDIA_TOKEN_ID == 32001
  assert config.model.lm.vocab_size == presets.PAPER_VOCAB
  result = train_lib.train(config, str(tmp_path), devices=jax.devices()[:1])
  assert result["step"] == 1
  with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
    (row,) = [json.loads(line) for line in f]
  for name in ("m3w", "align", "ltip", "vtp"):
    assert np.isfinite(row[f"loss/{name}"]) and row[f"loss/{name}"] > 0
  assert row["loss_tokens/m3w"] == 2 * 255 - 2 * 4  # 5 chunks: 4 `<image>` targets masked


def test_paper_configs_split_their_batches_over_their_pods():
  """flamingo_80b is the paper's 1536-chip run (16-way tensor, ZeRO-1): 96 batch shards, and
  every per-dataset batch splits over them; 3B and 9B over a 64-chip v4 slice."""
  from flamingo_jax.train.config import check
  c80 = load_config("flamingo_80b")
  check(c80)
  assert c80.mesh.tensor == 16 and c80.mesh.fsdp == 1 and c80.optimizer_sharding == "zero1"
  shards = 1536 // c80.mesh.tensor
  assert {n: d.batch_size % shards for n, d in c80.data.items()} == dict.fromkeys(c80.data, 0)
  assert {n: d.batch_size for n, d in c80.data.items()} == dict(m3w=288, align=576, ltip=576, vtp=96)
  for name in ("flamingo_3b", "flamingo_9b"):
    c = load_config(name)
    check(c)
    assert {n: d.batch_size for n, d in c.data.items()} == dict(m3w=256, align=512, ltip=512, vtp=64)
    assert all(d.batch_size % 64 == 0 for d in c.data.values())
  prepared = load_config("flamingo_3b", "prepared")
  assert {d.source for d in prepared.data.values()} == {"prepared"}
