"""The repository's `configs/NAME.py` files, loaded as train.py's --config flag does."""
import os

from flamingo_jax.train.config import from_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg=None):
  """`configs/{name}.py`'s get_config(arg) (`--config configs/NAME.py:arg`)."""
  return from_file(os.path.join(ROOT, "configs", f"{name}.py"), arg)
