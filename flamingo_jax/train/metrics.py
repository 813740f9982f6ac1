"""Metrics to three places: a readable stdout line, WORKDIR/metrics.jsonl (one JSON object
per logged step) and TensorBoard event files in WORKDIR. WORKDIR may be a bucket
(gs://...): paths go through etils epath."""
import json

from etils import epath
import numpy as np


class MetricWriter:
  def __init__(self, workdir, enabled: bool = True, start_step: int = 0):
    """`enabled=False` on all but the first process of a multi-host run. `start_step`: the
    step training starts (or resumes) from; rows a killed run logged after it are dropped,
    so every step is logged once."""
    self.enabled = enabled
    if not enabled:
      return
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self.path = workdir / "metrics.jsonl"
    old = self.path.read_text().splitlines() if self.path.exists() else []
    self.lines = [line for line in old if _step(line) is not None and _step(line) <= start_step]
    if self.lines != old:
      self._save()
    from tensorboardX import SummaryWriter
    # purge_step: TensorBoard hides the earlier event files' points from this step on.
    self.tb = SummaryWriter(str(workdir), purge_step=start_step + 1)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self.lines.append(json.dumps({"step": step, **values}))
    self._save()
    for k, v in values.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()
    print(f"step {step:>7d} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in sorted(values.items())),
          flush=True)

  def _save(self) -> None:
    # The whole file, then a rename: a bucket cannot append, and a kill leaves no half line.
    tmp = self.path.with_name(self.path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in self.lines))
    tmp.replace(self.path)

  def close(self) -> None:
    if self.enabled:
      self.tb.close()


def _step(line: str) -> int | None:
  """A row's step; None for a line a killed run left unfinished."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def _fmt(v: float) -> str:
  return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
