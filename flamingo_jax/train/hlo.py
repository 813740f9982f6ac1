"""What a compiled step sends between devices, read from its optimized HLO text
(`compiled.as_text()`): the operand bytes of each collective, per device, per step.

A collective inside a loop (the micro-batch scan, a scanned layer stack) counts once per
iteration, unlike XLA's cost analysis, which counts a loop body once: the trip count is
the loop's `known_trip_count`, else the bound its condition compares the counter with
(`i < N`, as scans lower). Asynchronous pairs count at their `-start`; TPU's reduce-scatter (an
`all-reduce-scatter` fusion of an all-reduce and a slice) counts as one.
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
_BOUND = re.compile(r"%[\w.-]+, %([\w.-]+)\), direction=LT")  # a compare's operands


def _bytes(shape: str) -> int:
  """Bytes of an HLO shape, e.g. `f32[4,8]{1,0}` or a tuple `(bf16[2], s32[])`."""
  return sum(_ITEMSIZE.get(dtype, 0) * int(np.prod([int(d) for d in dims.split(",") if d]))
             for dtype, dims in re.findall(r"\b(\w+)\[([\d,]*)\]", shape))


def collective_bytes(hlo_text: str) -> dict:
  """Operand bytes one device feeds to each kind of collective in one run of the module's
  entry computation: {kind: bytes} over COLLECTIVES, plus `total`."""
  shapes, own, calls, entry, name = {}, collections.defaultdict(collections.Counter), {}, None, None
  constants, bounds = {}, {}  # integer constants; loop condition → its `i < N` bound
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
    if op == "constant" and re.fullmatch(r"s32\[\]\S*", shape):
      constants[result] = int(rest.split(")", 1)[0])
    bound = _BOUND.match(rest) if op == "compare" and line.lstrip().startswith("ROOT") else None
    if bound and bound.group(1) in constants:
      bounds[name] = constants[bound.group(1)]
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
      kind = "reduce-scatter"  # TPU's reduce-scatter: a fused all-reduce + dynamic-slice
    if kind in COLLECTIVES:
      operands = rest.split(")", 1)[0]
      own[name][kind] += sum(_bytes(shapes.get(o, "")) for o in re.findall(r"%([\w.-]+)", operands))
    if op == "while":
      trip = _TRIP_COUNT.search(rest)
      condition = re.search(r"condition=%([\w.-]+)", rest).group(1)
      calls[name].append((re.search(r"body=%([\w.-]+)", rest).group(1),
                          int(trip.group(1)) if trip else condition))
    else:  # fusions, calls, async wrappers: once each (reductions' to_apply hold no collectives)
      calls[name] += [(c, 1) for c in re.findall(r"calls=%([\w.-]+)", rest)]

  def total(computation, seen=()):
    out = collections.Counter(own[computation])
    for callee, times in calls.get(computation, ()):
      times = bounds.get(times, 1) if isinstance(times, str) else times
      if callee not in seen:
        for k, v in total(callee, seen + (computation,)).items():
          out[k] += times * v
    return out
  out = total(entry) if entry else collections.Counter()
  result = {k: int(out[k]) for k in COLLECTIVES}
  result["total"] = sum(result.values())
  return result
