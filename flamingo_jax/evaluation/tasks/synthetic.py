"""`synthetic`: the demo's few-shot task (data/synthetic.py), so a demo workdir can be
evaluated by eval.py exactly as train.py evaluates it.

Its demonstrations are not drawn from a query set: an episode's shots carry its hidden
rule (name the colour, or the shape), so each test example comes with its own context.
Episode i at k shots under seed s is `synthetic.episode(task, base_seed + s, EVAL, i,
shots=k)`, base_seed being the workdir's `config.seed`: seed 0 gives the episodes
train.py scored. The prompt is the episode up to the query's `<image>`; the 8 answer
words are ranked by log-likelihood through `flamingo_jax.score`; ties share the credit.
train.py's held-out evaluation is `accuracy` below: one implementation for both.
"""
import numpy as np

from flamingo_jax.data import synthetic
from flamingo_jax.evaluation.tasks.base import Task, TaskData, TaskDataError

LAYOUT = "a train.py workdir trained on the synthetic few-shot task (configs/demo.py)"


def _no_files(data_dir: str) -> TaskData:
  raise TaskDataError("synthetic: its episodes are generated, not read; eval.py builds "
                      "them from the workdir's config")


TASK = Task(name="synthetic", family="episodes", metric="accuracy", max_new_tokens=0,
            load=_no_files, postprocess="none", layout=LAYOUT)


def task_config(train_config) -> tuple[synthetic.TaskConfig, int]:
  """(the episodes' TaskConfig, base seed) from the workdir's train config."""
  if train_config is None:
    raise TaskDataError(f"synthetic: --model must be {LAYOUT}; a converted model has no "
                        "synthetic task")
  names = [n for n, d in train_config.data.items() if d.get("source") == "synthetic"]
  if not names:
    raise TaskDataError(f"synthetic: the workdir's config has no synthetic dataset; "
                        f"expected {LAYOUT}")
  task = synthetic.TaskConfig(**dict(train_config.data[names[0]].get("task", {})))
  return task, int(train_config.seed)


def episodes(task: synthetic.TaskConfig, seed: int, shots: int, indices) -> dict:
  """The score() inputs for `indices`: images [B, shots + 1, 1, H, W, 3], input_ids and
  attention_mask [B, 3 * shots + 1] (every prompt has the same length: no padding), and
  per row the answer's position among ANSWER_IDS and the rule."""
  if not 0 <= shots <= task.max_shots:
    raise TaskDataError(f"synthetic: {shots} shots asked; the workdir's task has at most "
                        f"max_shots={task.max_shots}; pass --shots within 0..{task.max_shots}")
  rows = [synthetic.episode(task, seed, synthetic.EVAL, int(i), shots=shots, loss_on="query")
          for i in indices]
  length = rows[0]["meta"]["answer_pos"]  # the query's <image> is the last prompt token
  ids = np.stack([r["input_ids"][:length] for r in rows])
  return dict(images=np.stack([r["images"][:shots + 1] for r in rows]), input_ids=ids,
              attention_mask=np.ones_like(ids),
              answer=np.array([synthetic.ANSWER_IDS.index(r["meta"]["answer"]) for r in rows]),
              rule=np.array([r["meta"]["rule"] for r in rows]))


def candidates() -> np.ndarray:
  return np.array(synthetic.ANSWER_IDS, np.int32)[:, None]  # [8, 1]: one token each


def model_scores(model, params, rows: int):
  """`scores(batch) -> [B, 8]` log-likelihoods of the answer words through
  `flamingo_jax.score`, every call padded to `rows` rows (one compiled shape)."""
  from flamingo_jax.decoding import score
  from flamingo_jax.decoding.prompts import pad_rows

  def scores(b: dict) -> np.ndarray:
    n = b["input_ids"].shape[0]
    inputs = {k: b[k] for k in ("images", "input_ids", "attention_mask")}
    inputs["media_mask"] = np.ones(b["images"].shape[:2], bool)
    sums = score(model, params, **pad_rows(inputs, rows), candidates=candidates())["sum"]
    return np.asarray(sums, np.float64)[:n]
  return scores


def score_episodes(scores, task: synthetic.TaskConfig, seed: int, shots: int, indices) -> dict:
  """Per episode: `credit` (tie-shared credit of the right answer), `predicted` and
  `answer` (positions in ANSWER_IDS), `rule`, `right_kind` (credit on answers naming the
  rule's attribute: ≈ 1/2 when the rule is unknown)."""
  b = episodes(task, seed, shots, indices)
  credit = synthetic.tie_credit(scores(b))  # [B, 8]
  rows = np.arange(len(indices))
  is_colour = np.isin(synthetic.ANSWER_IDS, synthetic.COLOUR_IDS)
  rule_is_colour = np.array(synthetic.RULES)[b["rule"]] == "colour"
  right_kind = (credit * (is_colour[None, :] == rule_is_colour[:, None])).sum(axis=1)
  return dict(credit=credit[rows, b["answer"]], predicted=np.argmax(credit, axis=1),
              answer=b["answer"], rule=b["rule"], right_kind=right_kind)


def accuracy(scores, task: synthetic.TaskConfig, seed: int, shots: int, num_episodes: int,
             batch_size: int = 64) -> dict:
  """Held-out accuracy over episodes 0..num_episodes-1 (chance: 1/8), the attribute
  accuracy, and the accuracy per rule."""
  parts = [score_episodes(scores, task, seed, shots, range(i, min(i + batch_size, num_episodes)))
           for i in range(0, num_episodes, batch_size)]
  r = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  out = dict(shots=shots, num_episodes=num_episodes, accuracy=float(r["credit"].mean()),
             chance=1.0 / len(synthetic.ANSWER_IDS),
             attribute_accuracy=float(r["right_kind"].mean()))
  for k, name in enumerate(synthetic.RULES):
    picked = r["rule"] == k
    out[f"accuracy_{name}"] = float(r["credit"][picked].mean()) if picked.any() else float("nan")
  return out
