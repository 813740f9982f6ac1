"""Frozen-aware FLOP accounting: XLA's counts agree with the analytic formula."""
import jax
import jax.numpy as jnp
import pytest

from config_files import load_config as load
from flamingo_jax.config import FlamingoConfig
from flamingo_jax.model import Flamingo
from flamingo_jax.train import flops

def test_lm_forward_flops_match_the_analytic_count():
  config = FlamingoConfig.from_dict(load("tiny").model)
  ids = jax.ShapeDtypeStruct((4, 64), jnp.int32)
  counted = flops.forward_flops(Flamingo(config), dict(input_ids=ids))
  # Scanned layers must be counted once per layer (layers/scan.py unrolls for the count).
  assert counted["lm"] == pytest.approx(flops.analytic_lm_forward_flops(config, 4, 64), rel=0.05)
  assert counted["vision"] == counted["resampler"] == 0  # text only


def test_multipliers_follow_what_trains():
  tiny, demo = load("tiny"), load("demo")
  assert flops.multipliers(FlamingoConfig.from_dict(tiny.model), tuple(tiny.trainable)) == dict(
      vision=1, resampler=3, xattn=3, lm=2)
  assert flops.multipliers(FlamingoConfig.from_dict(demo.model), tuple(demo.trainable))["lm"] == 3
