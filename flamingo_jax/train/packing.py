"""Packing: the rows of several datasets, of any text lengths, laid as segments into rows
of one length, so that the train step runs one LM over every dataset (the program holds
one LM, not one per text length).

Each batch shard packs its own rows (the layout is static and the same on every shard),
so packing is a gather local to each device. A segment sees only its own tokens
(`segments`), its positions restart at 0, and its media index points at its own media
slots, so a packed row's logits are exactly each segment's alone. Rows are placed
first-fit, longest first; whatever a packed row does not fill is padding (attention mask
0, loss mask 0, segment 0).
"""
import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Token fields and the value their padding takes.
TOKEN_FILL = dict(input_ids=0, targets=0, loss_mask=0, attention_mask=0, media_index=-1)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each dataset's rows go in one batch shard's packed rows [rows, length].

  names: the datasets, in the order of their token and media streams (a shard's rows of
  each dataset, flattened and concatenated). token_source [rows · length], slot_source
  [rows · slots]: the stream index each packed token / media slot takes (the stream's
  length: padding). slot_offset: dataset → [its rows] the packed slot of each row's first
  medium. positions, segments (1, 2, ... in a row; 0 padding), dataset (index into names;
  -1 padding): [rows, length].
  """
  names: tuple
  length: int
  rows: int
  slots: int
  token_source: np.ndarray
  slot_source: np.ndarray
  slot_offset: dict
  positions: np.ndarray
  segments: np.ndarray
  dataset: np.ndarray

  @property
  def one_segment_a_row(self) -> bool:
    return bool((self.segments <= 1).all())

  @property
  def fill(self) -> float:
    """The fraction of packed token slots that hold a dataset's token (the rest: padding)."""
    return float((self.dataset >= 0).mean())


def plan(shapes: Mapping[str, tuple[int, int, int]]) -> Layout:
  """shapes: dataset → (rows in a shard, text length, media slots a row)."""
  names = tuple(sorted(shapes))
  length = max(t for _, t, _ in shapes.values())
  token_base, slot_base, tokens, slots = {}, {}, 0, 0
  for n in names:
    r, t, m = shapes[n]
    token_base[n], slot_base[n] = tokens, slots
    tokens, slots = tokens + r * t, slots + r * m
  order = sorted(((n, j) for n in names for j in range(shapes[n][0])),
                 key=lambda s: -shapes[s[0]][1])  # stable: by name, then row
  packed = []  # per packed row: [tokens used, [(dataset, row)]]
  for n, j in order:
    t = shapes[n][1]
    row = next((p for p in packed if p[0] + t <= length), None)
    if row is None:
      row = [0, []]
      packed.append(row)
    row[0] += t
    row[1].append((n, j))
  num_slots = max([sum(shapes[n][2] for n, _ in p[1]) for p in packed] + [0])
  token_source = np.full((len(packed), length), tokens, np.int32)
  slot_source = np.full((len(packed), num_slots), slots, np.int32)
  positions = np.zeros((len(packed), length), np.int32)
  segments = np.zeros((len(packed), length), np.int32)
  dataset = np.full((len(packed), length), -1, np.int32)
  slot_offset = {n: np.zeros((shapes[n][0],), np.int32) for n in names}
  for i, (_, members) in enumerate(packed):
    at, slot = 0, 0
    for s, (n, j) in enumerate(members):
      _, t, m = shapes[n]
      token_source[i, at:at + t] = token_base[n] + j * t + np.arange(t)
      slot_source[i, slot:slot + m] = slot_base[n] + j * m + np.arange(m)
      positions[i, at:at + t] = np.arange(t)
      segments[i, at:at + t] = s + 1
      dataset[i, at:at + t] = names.index(n)
      slot_offset[n][j] = slot
      at, slot = at + t, slot + m
  return Layout(names, length, len(packed), num_slots, token_source.reshape(-1),
                slot_source.reshape(-1), slot_offset, positions, segments, dataset)


def plan_batches(batches: Mapping[str, Mapping], shards: int) -> Layout:
  """`plan` for datasets' batches (arrays or shapes: input_ids [B, t], images [B, M, ...]
  where they have media), B split over `shards`."""
  def slots(batch):
    images = batch.get("images")
    return 0 if images is None else images.shape[1]
  return plan({n: (b["input_ids"].shape[0] // shards, b["input_ids"].shape[1], slots(b))
               for n, b in batches.items()})


def _gather(streams: list, source: np.ndarray, fill, shards: int, row_shape: tuple) -> jax.Array:
  """Each shard's `streams` [shards, n_i, ...] concatenated, a `fill` element appended,
  then taken at `source` → [shards · rows, *row_shape, ...]."""
  rest = streams[0].shape[2:]
  pad = jnp.full((shards, 1) + rest, fill, streams[0].dtype)
  x = jnp.take(jnp.concatenate(streams + [pad], axis=1), source, axis=1)
  return x.reshape((-1,) + row_shape + rest)


def pack(inputs: Mapping[str, Mapping[str, jax.Array]], media: Mapping[str, jax.Array],
         shards: int) -> tuple[dict, Layout]:
  """Datasets' LM inputs (TOKEN_FILL's fields [B, t]; media_mask [B, M]) and resampled
  `media` (dataset → [B, M, L, D]; absent: text only) → one set of LM inputs of rows
  [shards · rows, length] with `positions` and (where a row holds several) `segments`,
  each batch shard's packed rows from its own rows. B must split over `shards`."""
  names = sorted(inputs)
  layout = plan_batches({n: dict(input_ids=inputs[n]["input_ids"], images=media.get(n))
                         for n in names}, shards)

  def tokens(key, n):
    x = inputs[n][key]
    if key == "media_index":  # each row's media sit at its slot offset in the packed row
      offset = jnp.asarray(layout.slot_offset[n])[None, :, None]
      x = x.reshape(shards, -1, x.shape[1])
      x = jnp.where(x >= 0, x + offset, x)
    return x.reshape(shards, -1)

  out = {key: _gather([tokens(key, n) for n in names], layout.token_source, fill, shards,
                      (layout.length,)).astype(inputs[names[0]][key].dtype)
         for key, fill in TOKEN_FILL.items()}
  tile = lambda a: jnp.broadcast_to(jnp.asarray(a)[None], (shards,) + a.shape).reshape(-1, a.shape[1])
  out["positions"] = tile(layout.positions)
  if not layout.one_segment_a_row:
    out["segments"] = tile(layout.segments)
  with_media = [n for n in names if n in media and media[n].shape[1]]
  if with_media:
    per_shard = lambda x: x.reshape((shards, -1) + x.shape[2:])
    out["media"] = _gather([per_shard(media[n]) for n in with_media], layout.slot_source, 0,
                           shards, (layout.slots,))
    out["media_mask"] = _gather([per_shard(inputs[n]["media_mask"]) for n in with_media],
                                layout.slot_source, False, shards, (layout.slots,))
  return out, layout


def sums_by_dataset(values: jax.Array, layout: Layout, shards: int) -> dict:
  """Packed per-token values [shards · rows, length] → dataset → their sum."""
  values = values.reshape(shards, layout.rows, layout.length)
  return {n: jnp.sum(jnp.where(jnp.asarray(layout.dataset == i)[None], values, 0))
          for i, n in enumerate(layout.names)}
