"""`synthetic`: the demo's few-shot task (data/synthetic.py), so a demo workdir can be
evaluated by eval.py exactly as train.py evaluates it.

Its demonstrations are not drawn from a query set: an episode's shots carry its hidden
rule (name the colour, or the shape), so each test example comes with its own context.
Episode i at k shots under seed s is `synthetic.episode(task, base_seed + s, EVAL, i,
shots=k)`, base_seed being the workdir's `config.seed`: seed 0 gives the episodes
train.py scored. The prompt is the episode up to the query's `<image>`; the 8 answer
words are ranked by log-likelihood through `flamingo_jax.score`; ties share the credit.
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
