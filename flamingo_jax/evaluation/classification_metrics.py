"""Classification metrics ×100: ROC AUC (HatefulMemes, through scikit-learn as open_flamingo
computes it) and top-1 accuracy (exact match of predicted and true class names)."""
from typing import Hashable, Mapping, Sequence


class ClassificationMetricError(ValueError):
  """Labels, scores or predictions that cannot be scored; the message says which and why."""


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
  """ROC AUC ×100 of `scores` (higher = class 1) for binary `labels` (0 or 1)."""
  labels, scores = list(labels), list(scores)
  if len(labels) != len(scores):
    raise ClassificationMetricError(f"{len(labels)} labels but {len(scores)} scores")
  if not labels:
    raise ClassificationMetricError("no labels to score")
  classes = set(labels)
  if not classes <= {0, 1}:
    raise ClassificationMetricError(f"labels must be 0 or 1, got {sorted(classes - {0, 1})}")
  if len(classes) < 2:
    raise ClassificationMetricError(
        f"ROC AUC needs both classes, but every label is {labels[0]}: it is undefined "
        "on a set of one class (score more examples)")
  from sklearn.metrics import roc_auc_score
  return 100.0 * float(roc_auc_score(labels, scores))


def top1(predictions: Mapping[Hashable, str], labels: Mapping[Hashable, str]) -> float:
  """Share ×100 of ids whose prediction equals the label exactly; the ids must match.

  Normalise both sides first when case or punctuation should not count
  (vqa_accuracy.normalise_answer is the official VQA normalisation).
  """
  if not predictions:
    raise ClassificationMetricError("no predictions to score")
  unlabelled = [i for i in predictions if i not in labels]
  unpredicted = [i for i in labels if i not in predictions]
  if unlabelled or unpredicted:
    problems = []
    if unlabelled:
      problems.append(f"{len(unlabelled)} predicted id(s) have no label: {_some(unlabelled)}")
    if unpredicted:
      problems.append(f"{len(unpredicted)} labelled id(s) have no prediction: "
                      f"{_some(unpredicted)}")
    raise ClassificationMetricError("; ".join(problems))
  correct = sum(predictions[i] == labels[i] for i in predictions)
  return 100.0 * correct / len(predictions)


def _some(ids: list, shown: int = 5) -> str:
  more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
  return ", ".join(repr(i) for i in ids[:shown]) + more
