"""Which train examples a test example sees as demonstrations.

The query set is fixed: `query_set_size` (2048) train examples drawn once per task, the
same for every seed and shot count (so RICES features are computed once). Demonstrations
are drawn from it for each (seed, test example) by a generator keyed on exactly those two
(`np.random.default_rng([seed, index])`), so they do not depend on the batch size, the
number of processes, or which other examples are evaluated.

  random  `shots` distinct query-set examples (OpenFlamingo's `random.sample`)
  rices   the `shots` most similar by image features (cosine), the most similar LAST
          (OpenFlamingo's RICES); `rices.py` computes and caches the features

Prompt ensembling (classification) averages the scores of several orders of the same
demonstrations: `permutations` gives them, the first the drawn order.
"""
import math

import numpy as np

QUERY_SET_SEED = 20482048  # fixed: the query set never changes with --seeds
MAX_PERMUTATIONS = 6  # OpenFlamingo's prompt ensembling: min(6, shots!) orders


def query_set(train_size: int, size: int) -> np.ndarray:
  """Indices of the query set in the train split (all of it when it is smaller)."""
  if train_size == 0:
    raise ValueError("the train split is empty: demonstrations need train examples")
  if train_size <= size:
    return np.arange(train_size)
  return np.sort(np.random.default_rng(QUERY_SET_SEED).choice(train_size, size, replace=False))


def random_demonstrations(num_candidates: int, shots: int, seed: int, index: int) -> list[int]:
  """`shots` distinct positions in the query set for test example `index` under `seed`."""
  if shots > num_candidates:
    raise ValueError(f"{shots} demonstrations asked from a query set of {num_candidates}")
  rng = np.random.default_rng([seed, index])
  return rng.choice(num_candidates, shots, replace=False).tolist()


def rices_demonstrations(similarity: np.ndarray, shots: int) -> list[int]:
  """The `shots` query-set positions most similar to one test example ([Q] cosine
  similarities), least similar first, so the most similar sits next to the query."""
  top = np.argsort(-similarity, kind="stable")[:shots]
  return top[::-1].tolist()


def permutations(positions: list[int], seed: int, index: int, count: int) -> list[list[int]]:
  """`count` orders of `positions` (capped at len! and MAX_PERMUTATIONS): the drawn order,
  then distinct random shuffles keyed on (seed, index)."""
  count = min(count, MAX_PERMUTATIONS, math.factorial(len(positions)))
  orders, seen = [list(positions)], {tuple(positions)}
  rng = np.random.default_rng([seed, index, 1])
  while len(orders) < count:
    order = rng.permutation(positions).tolist()
    if tuple(order) not in seen:
      seen.add(tuple(order))
      orders.append(order)
  return orders
