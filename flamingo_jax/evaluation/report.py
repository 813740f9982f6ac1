"""results.md (mean ± std over seeds, a row per task, a column per shot count) and
scores.png (score against shots, one panel per task), both from results.json."""
import os

import numpy as np


def cell_scores(task: dict) -> dict[int, list[float]]:
  """{shots: [score per finished seed]} of one task's results."""
  return {int(s): [c["score"] for _, c in sorted(seeds.items(), key=lambda kv: int(kv[0]))]
          for s, seeds in task.get("cells", {}).items()}


def _mean_std(scores: list[float]) -> str:
  if len(scores) == 1:
    return f"{scores[0]:.1f}"
  return f"{np.mean(scores):.1f} ± {np.std(scores, ddof=1):.1f}"


def markdown(results: dict) -> str:
  shots = sorted({s for t in results["tasks"].values() for s in cell_scores(t)})
  lines = [f"model: `{results['model'].get('path')}` (fingerprint "
           f"{results['model'].get('fingerprint')}); demonstrations: "
           f"{results['protocol']['demonstrations']}; prompts: "
           f"{results['protocol']['prompt_style']}; mean ± std over seeds (n)", "",
           "| task | metric | " + " | ".join(f"{s} shots" for s in shots) + " |",
           "|---|---|" + "---|" * len(shots)]
  for name, task in results["tasks"].items():
    scores = cell_scores(task)
    row = [f"{_mean_std(scores[s])} (n={len(scores[s])})" if scores.get(s) else "–" for s in shots]
    lines.append(f"| {name} | {task['metric']} | " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tasks = [(n, t) for n, t in results["tasks"].items() if t.get("cells")]
  if not tasks:
    return
  fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
  for ax, (name, task) in zip(axes[0], tasks):
    scores = cell_scores(task)
    xs = sorted(scores)
    mean = [np.mean(scores[s]) for s in xs]
    std = [np.std(scores[s], ddof=1) if len(scores[s]) > 1 else 0.0 for s in xs]
    ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3)
    ax.set_xticks(xs)
    ax.set_title(name), ax.set_xlabel("shots"), ax.set_ylabel(task["metric"])
    ax.grid(alpha=0.3)
  fig.tight_layout()
  tmp = f"{path}.tmp{os.getpid()}.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


def write(results: dict, output: str) -> None:
  with open(os.path.join(output, "results.md"), "w") as f:
    f.write(markdown(results))
  plot(results, os.path.join(output, "scores.png"))
