"""What a compiled step sends between devices, read from its optimized HLO text
(`compiled.as_text()`): the operand bytes of each collective, per device, per step.

A collective inside a loop (the micro-batch scan, a scanned layer stack) counts once per
iteration (the loop's known trip count), unlike XLA's cost analysis, which counts a loop
body once. Asynchronous pairs count at their `-start`.
"""
import collections
import re

import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
             "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
             "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][\w-]*)\((.*)$")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _bytes(shape: str) -> int:
  """Bytes of an HLO shape, e.g. `f32[4,8]{1,0}` or a tuple `(bf16[2], s32[])`."""
  return sum(_ITEMSIZE.get(dtype, 0) * int(np.prod([int(d) for d in dims.split(",") if d]))
             for dtype, dims in re.findall(r"\b(\w+)\[([\d,]*)\]", shape))


def collective_bytes(hlo_text: str) -> dict:
  """Operand bytes one device feeds to each kind of collective in one run of the module's
  entry computation: {kind: bytes} over COLLECTIVES, plus `total`."""
  shapes, own, calls, entry, name = {}, collections.defaultdict(collections.Counter), {}, None, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      name = m.group(1)
      entry = name if line.startswith("ENTRY") else entry
      calls[name] = []
      continue
    m = _INSTRUCTION.match(line)
    if not m or name is None:
      continue
    result, shape, op, rest = m.groups()
    shapes[result] = shape
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind in COLLECTIVES:
      operands = rest.split(")", 1)[0]
      own[name][kind] += sum(_bytes(shapes.get(o, "")) for o in re.findall(r"%([\w.-]+)", operands))
    if op == "while":
      trip = _TRIP_COUNT.search(rest)
      calls[name].append((re.search(r"body=%([\w.-]+)", rest).group(1), int(trip.group(1)) if trip else 1))
    else:  # fusions, calls, async wrappers: once each (reductions' to_apply hold no collectives)
      calls[name] += [(c, 1) for c in re.findall(r"calls=%([\w.-]+)", rest)]

  def total(computation, seen=()):
    out = collections.Counter(own[computation])
    for callee, times in calls.get(computation, ()):
      if callee not in seen:
        for k, v in total(callee, seen + (computation,)).items():
          out[k] += times * v
    return out
  out = total(entry) if entry else collections.Counter()
  result = {k: int(out[k]) for k in COLLECTIVES}
  result["total"] = sum(result.values())
  return result
