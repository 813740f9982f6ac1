"""Comparison helpers for the *_vs_* parity tests against PyTorch references."""
import numpy as np

# The bar for float32 parity: max relative error on logits / features.
RTOL = 1e-4


def relative_error(ours, reference, where=None) -> float:
  """max |ours - reference| / max |reference|, over the positions `where` is True."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  if ours.shape != reference.shape:
    raise AssertionError(f"shape {ours.shape} != reference shape {reference.shape}")
  if where is not None:
    where = np.broadcast_to(np.asarray(where, bool)[(...,) + (None,) * (ours.ndim - np.ndim(where))], ours.shape)
    ours, reference = ours[where], reference[where]
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def assert_parity(ours, reference, where=None, rtol: float = RTOL) -> None:
  err = relative_error(ours, reference, where)
  assert err <= rtol, f"max relative error {err:.3g} > {rtol:g}"
