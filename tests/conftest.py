"""Test setup that must happen before jax, torch or transformers are imported."""
import os
import sys
import types

# Eight simulated CPU devices for the sharding tests; must precede the first jax import.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite runs on the CPU. libtpu (a test dependency: train_compile's abstract TPU
# topologies) would otherwise make every jax process, subprocesses included, try to start
# a TPU backend and print its failure to stderr before falling back to the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No hub on these machines: fail fast instead of a ~46 s lookup.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The only torchvision wheel here is a CUDA build whose operator registrations fail on a
# CPU-only torch; the parity references (open_clip, timm, open_flamingo) never need them.
for _name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
  sys.modules.setdefault(_name, types.ModuleType(_name))

# Many tests build the same programs (train.py runs, subprocesses included): a persistent
# compilation cache turns repeated XLA compiles into lookups. Results are unaffected.
# Every compile is cached, the small ones too: a train.py run compiles ~50 eager ops
# (orbax's per-shard slices when saving) of 0.05-0.1 s each, ~4 s a run here.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/flamingo_jax_test_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

# Parity tests compare float32 against PyTorch: no reduced-precision matmul passes.
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  """A tiny byte-level BPE (eos, no pad) saved as a Hugging Face tokenizer directory."""
  from data_files import make_tokenizer
  return make_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: a long run whose code a faster test covers too; the README's test "
                 "command (and CI) deselects it with -m 'not slow'; `-m slow` runs it")
