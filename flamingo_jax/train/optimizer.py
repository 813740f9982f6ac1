"""The paper's optimizer: AdamW, weight decay on trainable parameters except the
resampler, linear warm-up then constant learning rate, global-norm clipping."""
from typing import Sequence

import optax

from flamingo_jax import trainable


def learning_rate(lr: float, warmup_steps: int, decay: str = "constant", total_steps: int = 0):
  """Linear 0 → lr over `warmup_steps`, then constant (paper) or cosine to 0 by `total_steps`."""
  warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
  if decay == "constant":
    after = optax.constant_schedule(lr)
  elif decay == "cosine":
    after = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1))
  else:
    raise ValueError(f"optimizer.decay={decay!r}: choose 'constant' or 'cosine'")
  return optax.join_schedules([warmup, after], [warmup_steps])


def build(*, lr: float, warmup_steps: int, weight_decay: float, no_weight_decay: Sequence[str],
          grad_clip: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          decay: str = "constant", total_steps: int = 0) -> optax.GradientTransformation:
  """Built over the trainable subtree only, so frozen leaves have no optimizer state."""
  compiled = trainable.compile_patterns(no_weight_decay)

  def decay_mask(params):
    return trainable.tree_map_paths(lambda path, _: not trainable.matches(compiled, path), params)

  schedule = learning_rate(lr, warmup_steps, decay, total_steps)
  return optax.chain(
      optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask),
  )
