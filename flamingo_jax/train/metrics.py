"""Metrics to three places: a readable stdout line, WORKDIR/metrics.jsonl (one JSON object
per logged step) and TensorBoard event files in WORKDIR."""
import json
import os

import numpy as np


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool = True):
    """`enabled=False` on all but the first process of a multi-host run."""
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(workdir)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self.jsonl.flush()
    for k, v in values.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()
    print(f"step {step:>7d} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in sorted(values.items())),
          flush=True)

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def _fmt(v: float) -> str:
  return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
