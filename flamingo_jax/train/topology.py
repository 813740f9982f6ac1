"""Abstract TPU topologies: the devices of a pod described by libtpu on any machine (no
TPU needed), so a jitted step can be compiled for that pod ahead of time and its
memory read (train_compile.py; maxtext's train_compile does the same).

    devices("v4:8x8x24")   1536 abstract v4 chips (megacore: one device per chip)
    devices("v5p:8x8x8")   512 v5p chips (megacore)
    devices("v5e:16x16")   256 v5e chips (one TensorCore each)
    devices("v5e:16x16", num_slices=4)   4 such slices (multi-slice, over DCN)

Needs the libtpu that jax[tpu] pins (jax 0.10.2: libtpu 0.0.42.*); only one process
may hold libtpu at a time (it takes /tmp/libtpu_lockfile).
"""
import dataclasses
import re


class TopologyError(ValueError):
  """A topology name or a libtpu that cannot give its devices; the message says why."""


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str        # the name's prefix: v4, v5p, v5e
  device_kind: str       # jax's device_kind of its devices
  chip_config: str       # get_topology_desc's chip_config_name
  dims: int              # torus dimensions of the topology name
  usable_hbm_gib: float  # per device, as libtpu 0.0.42.1's compiler states it ("available HBM")
  peak_flops: float      # dense bf16 FLOP/s per chip (= per device here)


# Usable HBM: the compiler's "exceeds available HBM (X G)" on a program too big, measured
# with libtpu 0.0.42.1 (v4 32 GiB chips: 30.75; v5p 95 GiB: 95.74; v5e 16 GiB: 15.75).
CHIPS = {
    "v4": Chip("v4", "TPU v4", "megacore", 3, 30.75, 275e12),
    "v5p": Chip("v5p", "TPU v5", "megacore", 3, 95.74, 459e12),
    "v5e": Chip("v5e", "TPU v5 lite", "default", 2, 15.75, 197e12),
}

LIBTPU_HINT = "pip install -e '.[tpu_compile]' (libtpu 0.0.42.*, the version jax[tpu]==0.10.2 pins)"


def parse(name: str) -> tuple[Chip, tuple[int, ...]]:
  """'v4:8x8x24' → (its Chip, (8, 8, 24))."""
  m = re.fullmatch(r"(v4|v5p|v5e):(\d+(?:x\d+)*)", name or "")
  if not m:
    raise TopologyError(f"--topology: {name!r}; give GENERATION:AxBxC with GENERATION one of "
                        f"{sorted(CHIPS)}, e.g. v4:8x8x24 (1536 chips), v5p:8x8x8, v5e:16x16")
  chip = CHIPS[m.group(1)]
  dims = tuple(int(d) for d in m.group(2).split("x"))
  if len(dims) != chip.dims or min(dims) < 1:
    raise TopologyError(f"--topology: {name!r}; a {chip.generation} topology has {chip.dims} "
                        f"positive dimensions (e.g. {'x'.join(['2'] * chip.dims)})")
  return chip, dims


def devices(name: str, num_slices: int = 1) -> list:
  """The abstract devices of `num_slices` slices of topology `name` (one per chip; each
  device's `slice_index` says its slice: the slices talk over DCN)."""
  chip, _ = parse(name)
  if num_slices < 1:
    raise TopologyError(f"--num_slices {num_slices}: give 1 or more slices")
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:
    raise TopologyError(f"libtpu is not installed: {LIBTPU_HINT}")
  from jax.experimental import topologies
  try:
    kw = dict(num_slices=num_slices) if num_slices > 1 else {}
    topology = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                            chip_config_name=chip.chip_config, **kw)
  except Exception as e:  # noqa: BLE001 (libtpu raises JaxRuntimeError / RuntimeError)
    message = str(e)
    if "lockfile" in message:
      raise TopologyError("libtpu is in use by another process (/tmp/libtpu_lockfile): run "
                          "one compile at a time") from None
    raise TopologyError(f"--topology {name}: libtpu refused it: {message.splitlines()[0]}") from None
  out = list(topology.devices)
  if not out or out[0].device_kind != chip.device_kind:
    raise TopologyError(f"--topology {name}: libtpu gave devices of kind "
                        f"{out[0].device_kind if out else None!r}, expected {chip.device_kind!r}")
  return out
