"""Activation functions by the names configs use."""
import jax
import jax.numpy as jnp


def squared_relu(x: jax.Array) -> jax.Array:
  """The paper's choice for trainable layers (Primer): relu(x)^2."""
  return jnp.square(jax.nn.relu(x))


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x·Φ(x) (torch nn.GELU()). Its derivative Φ(x) + x·φ(x) is one array
  computed in the forward, so a backward pass keeps one residual per activation, not the
  three (x, erf, exp) that differentiating `jax.nn.gelu` saves, and only multiplies."""
  return jax.nn.gelu(x, approximate=False)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
  x, = primals
  t, = tangents
  cdf = 0.5 * (1.0 + jax.lax.erf(x * (2.0 ** -0.5)))
  pdf = jnp.exp(-0.5 * jnp.square(x)) * (2.0 * jnp.pi) ** -0.5
  return gelu(x), (cdf + x * pdf).astype(x.dtype) * t


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's sigmoid approximation of GELU."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": gelu,  # torch nn.GELU()
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
