"""Converted weights restored straight into train.py's shardings and dtypes on 8 CPU
devices (`Program.restore_params`): the values of the host path (restore whole, then
`place_params`), each leaf in its own layout, new-token rows taken from the sharded table."""
import dataclasses

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from config_files import load_config
from flamingo_jax import load_model
from flamingo_jax.convert.openflamingo import save_converted
from flamingo_jax.lm import token_rows
from flamingo_jax.model import Flamingo
from flamingo_jax.train import program as program_lib


@pytest.fixture(scope="module")
def restored(tmp_path_factory, tokenizer_dir):
  config = load_config("tiny")
  config.mesh = dict(slice=1, data=2, fsdp=2, tensor=2)
  program = program_lib.from_config(config)
  model_config = program.model_config
  # Saved as the convert CLI may save it: without the new-token rows (a run-time choice).
  saved_config = dataclasses.replace(model_config, trainable_token_ids=())
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32),
                        load_model.abstract_params(saved_config))
  path = str(tmp_path_factory.mktemp("converted"))
  save_converted(path, Flamingo(saved_config), params,
                 AutoTokenizer.from_pretrained(tokenizer_dir))
  want = program.place_params(token_rows.with_rows(jax.tree.map(np.asarray, params), model_config))
  return program, program.restore_params(path), want


def flat(tree):
  return tu.flatten_dict(tree, sep="/")


def test_restored_values_equal_the_host_path(restored):
  program, got, want = restored
  for g, w in zip(got, want):
    assert flat(g).keys() == flat(w).keys()
    for k, x in flat(w).items():
      assert flat(g)[k].dtype == x.dtype, k
      if "new_tokens" not in k:
        np.testing.assert_array_equal(np.asarray(flat(g)[k]), np.asarray(x), err_msg=k)
  # The new-token rows the checkpoint lacks: the frozen table's rows as the model applies
  # them (bf16), the same up to that rounding as the host path's float32 rows.
  trainable, frozen = got
  ids = np.asarray(program.model_config.trainable_token_ids)
  rows, head = trainable["lm"]["new_tokens"]["embedding"], trainable["lm"]["new_tokens"]["head"]
  np.testing.assert_array_equal(rows, np.asarray(frozen["lm"]["embed"]["embedding"], np.float32)[ids])
  np.testing.assert_array_equal(head, np.asarray(frozen["lm"]["lm_head"]["kernel"], np.float32)[:, ids])
  np.testing.assert_allclose(rows, want[0]["lm"]["new_tokens"]["embedding"], rtol=1e-2, atol=1e-6)
  assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}


def test_every_leaf_arrives_in_its_own_sharding(restored):
  program, (trainable, frozen), _ = restored
  split = 0
  for tree, shardings in ((trainable, program.trainable_shardings),
                          (frozen, program.frozen_shardings)):
    for k, s in flat(shardings).items():
      x = flat(tree)[k]
      assert x.sharding.is_equivalent_to(s, x.ndim), (k, x.sharding, s)
      split += any(a is not None for a in s.spec)
  assert split > 10  # the check sees real splits (fsdp / tensor), not only replicas
  # A frozen kernel's device holds a shard, not the whole weight.
  kernel = frozen["lm"]["embed"]["embedding"]
  assert kernel.addressable_shards[0].data.size < kernel.size
