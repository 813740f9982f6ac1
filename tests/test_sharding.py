"""Every parameter is named for sharding, and the sharded model equals the unsharded one."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from config_files import load_config
from flamingo_jax import sharding
from flamingo_jax.config import FlamingoConfig
from flamingo_jax.model import Flamingo
from flamingo_jax.summary import abstract_params

def load_model_config(name):
  return FlamingoConfig.from_dict(load_config(name).model)


@pytest.mark.parametrize("name", ["tiny", "flamingo_3b", "openflamingo_4b"])
def test_every_parameter_has_logical_axis_names_with_a_rule(name):
  params = abstract_params(load_model_config(name))
  ruled = {logical for logical, _ in sharding.DEFAULT_RULES}
  leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.Partitioned), f"{where} has no logical axis names"
    assert len(leaf.names) == leaf.value.ndim, f"{where}: names {leaf.names} vs shape {leaf.value.shape}"
    assert set(leaf.names) <= ruled, f"{where}: {set(leaf.names) - ruled} have no sharding rule"


def test_mesh_that_does_not_fit_names_the_fix():
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.make_mesh(dict(data=3, fsdp=1, tensor=2))


def test_mesh_fills_the_minus_one_axis():
  mesh = sharding.make_mesh(dict(data=-1, fsdp=2, tensor=2))
  assert dict(mesh.shape) == dict(slice=1, data=2, fsdp=2, tensor=2)


def test_sharded_forward_equals_single_device():
  config = load_model_config("tiny")
  model = Flamingo(config)
  ids = jnp.array([[5, 255, 6, 7, 254, 255, 8, 9]] * 4)
  images = jax.random.normal(jax.random.key(0), (4, 2, 1, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images, ids)
  params = nn.unbox(variables)
  params = jax.tree_util.tree_map_with_path(  # non-zero gates so the xattn blocks act
      lambda p, x: x + 0.5 if "gate" in jax.tree_util.keystr(p) else x, params)
  expected = jax.jit(model.apply)(params, images, ids)

  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  abstract = jax.eval_shape(model.init, jax.random.key(1), images, ids)
  shardings = nn.unbox(sharding.param_shardings(abstract, mesh))
  sharded = jax.device_put(params, shardings)
  kernel = sharded["params"]["lm"]["groups"]["layers"]["mlp"]["up"]["kernel"]  # [group, layer, in, out]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp", "tensor")
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    got = jax.jit(model.apply)(sharded, images, ids)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
