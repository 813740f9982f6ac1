"""`FlamingoConfig.remat_policy` → what a trained stack recomputes in the backward.

'none' saves every residual (fastest, most memory); 'full' saves only each rematerialised
module's inputs and recomputes its forward in the backward; 'dots' saves matmul outputs.
"""
import flax.linen as nn
import jax

POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(module_cls: type, policy: str) -> type:
  """`module_cls` rematerialised under `policy` ('none': as it is)."""
  if policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=POLICIES[policy], prevent_cse=False)
