"""Activation functions by the names configs use."""
import jax
import jax.numpy as jnp


def squared_relu(x: jax.Array) -> jax.Array:
  """The paper's choice for trainable layers (Primer): relu(x)^2."""
  return jnp.square(jax.nn.relu(x))


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's sigmoid approximation of GELU."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU()
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # HF gelu_new / gelu_pytorch_tanh
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "squared_relu": squared_relu,
}


def get(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]
