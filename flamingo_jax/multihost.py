"""Multi-process runs (train.py, eval.py): joining the cluster, and meeting points.

On a CPU cluster the collectives are gloo's, and the first collective over a set of
devices connects its peers with a fixed 30 s deadline (jaxlib's, no flag): processes
that reach it further apart than that (one still compiling or loading) fail with "Gloo
context initialization failed". Later collectives over the same devices wait as long as
needed. So processes meet at a `barrier` (the coordination service: no device work, a
long deadline) before a program's first run, e.g. between compiling and stepping.
"""
import jax
from orbax.checkpoint import multihost as ocp_multihost

BARRIER_TIMEOUT_S = 3600  # the slowest process may still be compiling an 80B step


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> None:
  """jax.distributed.initialize (None fields: auto-detected on TPU pods, SLURM, ...)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU clusters only
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
  """Every process waits here until all arrive (`name`: the same on all, once each)."""
  if jax.process_count() > 1:
    ocp_multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)
