"""The evaluation grid, task × shots × seed, written to OUTPUT as it goes.

Each (task, shots, seed) is a *cell*. A process evaluates its share of a cell's test
examples (example k of the cell goes to process k mod P), appending each batch's
predictions to `predictions/{cell}.part{p}.jsonl`; then process 0 joins the shares,
checks that every example has exactly one prediction, computes the metric once on the
union, writes `predictions/{cell}.jsonl` and records the cell in `results.json`.
A killed run restarts where it stopped: finished cells are read back from results.json,
and a cell's predictions already in its part files are not recomputed. OUTPUT must be one
directory all processes see (as train.py's workdir for checkpoints).

What makes a number (the `Protocol`, the model's fingerprint) is recorded in results.json
and checked when a run resumes: an OUTPUT holding another evaluation is an error, never a
silent mix.
"""
import dataclasses
import functools
import glob
import json
import os
import time

import numpy as np

from flamingo_jax import multihost
from flamingo_jax.evaluation import demonstrations as demos_lib
from flamingo_jax.evaluation import prompts as prompts_lib
from flamingo_jax.evaluation.tasks import synthetic as synthetic_task
from flamingo_jax.evaluation.tasks.base import Task, TaskData, TaskDataError

RESULTS = "results.json"
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Everything besides the model that decides a score."""
  demonstrations: str = "random"  # 'random' | 'rices'
  prompt_style: str = "openflamingo"  # prompts.STYLES
  num_samples: int = 0  # test examples per cell (0: the whole test split)
  query_set_size: int = 2048
  prompt_ensembling: bool = False  # classification: average over demonstration orders
  num_beams: int = 3
  length_penalty: float = 0.0
  # Position ids of left-padded prompts as open_flamingo's generate gives them (pads
  # counted; decoding.md): what their published numbers used. Matters for rotary LMs.
  count_padding: bool = True
  vqa_normalisation: str = "official"  # vqa_accuracy's normalise_answers


@dataclasses.dataclass
class Context:
  model: object
  params: object
  tokenizer: object  # None when only the synthetic task runs
  preprocess: object  # load_model.ImagePreprocessing
  protocol: Protocol
  batch_size: int
  output: str
  train_config: object = None  # a workdir's train.py config (synthetic needs it)
  process_index: int = 0
  process_count: int = 1

  _vision_fingerprint: str | None = None

  @property
  def stop_id(self) -> int:
    return self.model.config.eoc_token_id

  def vision_fingerprint(self) -> str:
    """The vision tower's checksum (the RICES cache key), computed once per run."""
    if self._vision_fingerprint is None:
      from flamingo_jax.train.checkpoint import fingerprint
      self._vision_fingerprint = fingerprint(self.params["vision"])
    return self._vision_fingerprint


class EvaluationError(ValueError):
  """A run that cannot go on as asked; the message says why and what to do."""


def cell_name(task: str, shots: int, seed: int) -> str:
  return f"{task}_{shots}shot_seed{seed}"


def test_indices(num_test: int, num_samples: int) -> np.ndarray:
  """The test examples every cell of a task scores: all, or a fixed random subset (the
  same for every seed and shot count, so seeds vary only the demonstrations)."""
  if num_samples <= 0 or num_samples >= num_test:
    return np.arange(num_test)
  rng = np.random.default_rng(demos_lib.QUERY_SET_SEED + 1)
  return np.sort(rng.choice(num_test, num_samples, replace=False))


# --- results.json -------------------------------------------------------------------------

def read_results(output: str) -> dict | None:
  path = os.path.join(output, RESULTS)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)  # atomic: a kill leaves the previous file whole


def start_results(output: str, header: dict) -> dict:
  """results.json's contents: the existing file's (after checking it is the same
  evaluation) or a new one from `header` (model, protocol, versions)."""
  results = read_results(output)
  if results is None:
    return dict(format=FORMAT, **header, tasks={})
  for key in ("model", "protocol"):
    old, new = results.get(key), header[key]
    if key == "model":  # the same weights, wherever they are now
      old, new = (old or {}).get("fingerprint"), new.get("fingerprint")
    if old != new:
      diff = ([f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in {**new, **old}  # either's
               if old.get(k) != new.get(k)]
              if key == "protocol" and isinstance(old, dict) else [f"{old!r} → {new!r}"])
      raise EvaluationError(
          f"{os.path.join(output, RESULTS)} holds an evaluation with another {key} "
          f"({'; '.join(diff)}); give a new --output, or the same settings to resume it")
  results["versions"] = header["versions"]
  return results


def done(results: dict, task: str, shots: int, seed: int) -> bool:
  return str(seed) in results["tasks"].get(task, {}).get("cells", {}).get(str(shots), {})


# --- one cell --------------------------------------------------------------------------------

def run_cell(ctx: Context, task: Task, data: TaskData, prepared: dict, shots: int, seed: int,
             progress=None) -> dict | None:
  """Evaluates this process's share of a cell, then (process 0) joins and scores it.
  Returns the cell's entry {score, num_examples, predictions, seconds} on process 0."""
  start = time.perf_counter()
  name = cell_name(task.name, shots, seed)
  folder = os.path.join(ctx.output, "predictions")
  os.makedirs(folder, exist_ok=True)
  indices = prepared["test_indices"]
  mine = [int(i) for k, i in enumerate(indices) if k % ctx.process_count == ctx.process_index]
  have = {r["index"] for r in _read_parts(folder, name)}
  todo = [i for i in mine if i not in have]
  if progress is not None:
    progress.update(len(mine) - len(todo))
  part = os.path.join(folder, f"{name}.part{ctx.process_index}.jsonl")
  _end_cut_line(part)
  with open(part, "a") as f:
    for b in range(0, len(todo), ctx.batch_size):
      chunk = todo[b:b + ctx.batch_size]
      for record in predict(ctx, task, data, prepared, shots, seed, chunk):
        f.write(json.dumps(record) + "\n")
      f.flush()
      if progress is not None:
        progress.update(len(chunk))
  multihost.barrier(f"{name}-predicted")
  if ctx.process_index != 0:
    return None
  records = _join(folder, name, indices)
  score = metric(task, data, records, ctx.protocol)
  final = os.path.join(folder, f"{name}.jsonl")
  tmp = f"{final}.tmp"
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, final)
  for p in glob.glob(os.path.join(folder, f"{name}.part*.jsonl")):
    os.remove(p)
  return dict(score=score, num_examples=len(records),
              predictions=os.path.relpath(final, ctx.output),
              seconds=round(time.perf_counter() - start, 2))


def _end_cut_line(path: str) -> None:
  """Ends a part file's last line when a kill cut it, so the next record appended starts
  a line of its own (else it would be glued to the cut one and dropped with it)."""
  if os.path.isfile(path) and os.path.getsize(path):
    with open(path, "rb+") as f:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        f.write(b"\n")


def _read_parts(folder: str, name: str) -> list[dict]:
  """Every whole line of the cell's part files (a line cut by a kill is dropped)."""
  out = []
  for path in sorted(glob.glob(os.path.join(folder, f"{name}.part*.jsonl"))):
    with open(path) as f:
      for line in f:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  return out


def _join(folder: str, name: str, indices) -> list[dict]:
  by_index = {}
  for r in _read_parts(folder, name):
    by_index.setdefault(r["index"], r)  # a resumed batch may repeat a line: keep one
  missing = [int(i) for i in indices if int(i) not in by_index]
  if missing:
    raise EvaluationError(f"{name}: no prediction for {len(missing)} test examples (first: "
                          f"index {missing[0]}); a process stopped early? re-run to finish")
  return [by_index[int(i)] for i in indices]


# --- task preparation (once per task, shared by its cells) -----------------------------------

def prepare(ctx: Context, task: Task, data: TaskData, num_samples: int) -> dict:
  """Test subset, query set, RICES features, candidate tokens: what every cell reuses."""
  if task.family == "episodes":
    config, seed = synthetic_task.task_config(ctx.train_config)
    count = num_samples or int(ctx.train_config.get("eval", {}).get("episodes", 512))
    return dict(test_indices=np.arange(count), synthetic=(config, seed))
  out = dict(test_indices=test_indices(len(data.test), num_samples))
  if ctx.tokenizer is None:
    raise EvaluationError(f"{task.name}: needs the model's tokenizer; pass --tokenizer DIR")
  if task.postprocess == "ok_vqa":  # fail now, not after the first cell's generations
    from flamingo_jax.evaluation.vqa_accuracy import require_stemming_data
    require_stemming_data()
  query = demos_lib.query_set(len(data.train), ctx.protocol.query_set_size)
  out["query_set"] = query
  if ctx.protocol.demonstrations == "rices":
    from flamingo_jax.evaluation import rices
    kw = dict(cache_dir=os.path.join(ctx.output, "rices_cache"), task=task.name,
              vision_fingerprint=ctx.vision_fingerprint())
    q = rices.cached_features(ctx.model, ctx.params, [data.train[i] for i in query],
                              ctx.preprocess, ctx.batch_size, **kw)
    t = rices.cached_features(ctx.model, ctx.params, [data.test[i] for i in out["test_indices"]],
                              ctx.preprocess, ctx.batch_size, **kw)
    out["similarity"] = dict(zip(out["test_indices"].tolist(), t @ q.T))
  if task.family == "classification":
    texts = [prompts_lib.candidate_text(c, ctx.protocol.prompt_style) for c in data.class_names]
    enc = ctx.tokenizer(texts, add_special_tokens=False)["input_ids"]
    length = max(map(len, enc))
    out["candidates"] = np.array([e + [0] * (length - len(e)) for e in enc], np.int32)
    out["candidate_mask"] = np.array([[1] * len(e) + [0] * (length - len(e)) for e in enc], bool)
  return out


def demonstration_positions(ctx: Context, prepared: dict, shots: int, seed: int, index: int):
  """Positions in the query set of test example `index`'s demonstrations."""
  count = shots or prompts_lib.ZERO_SHOT_DEMONSTRATIONS
  if ctx.protocol.demonstrations == "rices" and shots:
    return demos_lib.rices_demonstrations(prepared["similarity"][index], count)
  return demos_lib.random_demonstrations(len(prepared["query_set"]), count, seed, index)


# --- predictions -----------------------------------------------------------------------------

def predict(ctx, task, data, prepared, shots, seed, indices) -> list[dict]:
  if task.family == "episodes":
    return _predict_episodes(ctx, prepared, shots, seed, indices)
  if task.family == "classification":
    return _predict_classes(ctx, task, data, prepared, shots, seed, indices)
  return _predict_generations(ctx, task, data, prepared, shots, seed, indices)


def _prompt_batch(ctx, task, data, prepared, shots, index_orders):
  """(texts, score/generate inputs) for [(test index, demonstration positions)]."""
  from flamingo_jax.decoding import prompts as decoding_prompts
  texts, media = [], []
  for index, positions in index_orders:
    demos = [data.train[prepared["query_set"][p]] for p in positions]
    query = data.test[index]
    texts.append(prompts_lib.build(task, demos, query, ctx.protocol.prompt_style,
                                   zero_shot=shots == 0))
    media.append(([d.media for d in demos] if shots else []) + [query.media])
  budget = ctx.model.config.lm.max_seq_len - task.max_new_tokens
  ids, mask = decoding_prompts.encode_prompts(
      ctx.tokenizer, texts, budget, why=f"lm.max_seq_len={ctx.model.config.lm.max_seq_len} "
      f"minus {task.max_new_tokens} new tokens; use fewer --shots")
  counts = decoding_prompts.media_counts(ids, ctx.model.config.media_token_id)
  for (index, _), n, m, text in zip(index_orders, counts, media, texts):
    if n != len(m):  # a dataset text that spells <image>, or a tokenizer that splits it
      raise TaskDataError(f"{task.name}: the prompt of test example {data.test[index].id!r} "
                          f"has {n} <image> tokens for {len(m)} images: {text!r}")
  images = np.stack([np.stack([_load(x, ctx.preprocess) for x in m]) for m in media])
  if not ctx.protocol.count_padding:  # positions ignore pads: pad to fewer shapes
    ids, mask = _pad_left(ids, mask, -(-ids.shape[1] // 64) * 64)
  return texts, dict(images=images, input_ids=ids, attention_mask=mask,
                     media_mask=np.ones(images.shape[:2], bool))


@functools.lru_cache(maxsize=512)
def _load(media, preprocess):
  """A media item's pixels; demonstrations recur across a cell's examples."""
  return media.load(preprocess)


def _pad_left(ids, mask, length):
  pad = length - ids.shape[1]
  return (np.pad(ids, ((0, 0), (pad, 0))), np.pad(mask, ((0, 0), (pad, 0))))


def _predict_generations(ctx, task, data, prepared, shots, seed, indices):
  from flamingo_jax.decoding import generate
  from flamingo_jax.decoding.prompts import continuations, pad_rows
  from flamingo_jax.evaluation import postprocess
  orders = [(i, demonstration_positions(ctx, prepared, shots, seed, i)) for i in indices]
  texts, batch = _prompt_batch(ctx, task, data, prepared, shots, orders)
  p = ctx.protocol
  new = generate(ctx.model, ctx.params, **pad_rows(batch, ctx.batch_size),
                 max_new_tokens=task.max_new_tokens, num_beams=p.num_beams,
                 length_penalty=p.length_penalty, count_padding=p.count_padding,
                 pad_token_id=ctx.stop_id)
  outputs = continuations(ctx.tokenizer, np.asarray(new)[:len(indices)], ctx.stop_id)
  clean = {"caption": postprocess.caption, "vqa": postprocess.vqa_answer,
           "ok_vqa": postprocess.ok_vqa_answer}[task.postprocess]
  return [dict(index=i, id=data.test[i].id, prediction=clean(out), output=out, prompt=text,
               demonstrations=[data.train[prepared["query_set"][q]].id for q in pos])
          for (i, pos), out, text in zip(orders, outputs, texts)]


def _predict_classes(ctx, task, data, prepared, shots, seed, indices):
  from flamingo_jax.decoding import score
  from flamingo_jax.decoding.prompts import pad_rows
  p = ctx.protocol
  drawn = [demonstration_positions(ctx, prepared, shots, seed, i) for i in indices]
  count = demos_lib.MAX_PERMUTATIONS if p.prompt_ensembling else 1
  orders = [demos_lib.permutations(pos, seed, i, count) for i, pos in zip(indices, drawn)]
  total, first_texts = 0.0, None
  for k in range(max(map(len, orders))):
    # Rows with fewer distinct orders (few shots) repeat their last one.
    texts, batch = _prompt_batch(ctx, task, data, prepared, shots,
                                 [(i, o[min(k, len(o) - 1)]) for i, o in zip(indices, orders)])
    first_texts = first_texts or texts
    s = score(ctx.model, ctx.params, **pad_rows(batch, ctx.batch_size),
              candidates=prepared["candidates"], candidate_mask=prepared["candidate_mask"],
              count_padding=p.count_padding)["mean"]
    total = total + np.asarray(s, np.float64)[:len(indices)]
  scores = total / max(map(len, orders))  # mean length-normalised log-likelihood
  names = data.class_names
  records = []
  for row, (i, pos) in enumerate(zip(indices, drawn)):
    top = np.argsort(-scores[row], kind="stable")[:5]
    probs = np.exp(scores[row] - np.logaddexp.reduce(scores[row]))
    r = dict(index=i, id=data.test[i].id, prediction=names[top[0]],
             top5=[names[t] for t in top], prompt=first_texts[row],
             demonstrations=[data.train[prepared["query_set"][q]].id for q in pos],
             permutations=len(orders[row]))
    if task.metric == "roc_auc":
      r["p_yes"] = float(probs[names.index("yes")])
    records.append(r)
  return records


def _predict_episodes(ctx, prepared, shots, seed, indices):
  from flamingo_jax.data import synthetic
  task_config, base_seed = prepared["synthetic"]
  scores = synthetic_task.model_scores(ctx.model, ctx.params, ctx.batch_size)
  r = synthetic_task.score_episodes(scores, task_config, base_seed + seed, shots, indices)
  words = [synthetic.VOCAB[t] for t in synthetic.ANSWER_IDS]
  return [dict(index=int(i), id=int(i), prediction=words[r["predicted"][row]],
               answer=words[r["answer"][row]], rule=synthetic.RULES[r["rule"][row]],
               credit=float(r["credit"][row]))
          for row, i in enumerate(indices)]


# --- metrics ---------------------------------------------------------------------------------

def metric(task: Task, data: TaskData, records: list[dict], protocol: Protocol) -> float:
  """The task's official metric (×100) on the joined predictions."""
  if task.metric == "accuracy":  # synthetic: ties share the credit, as train.py scores
    return 100.0 * float(np.mean([r["credit"] for r in records]))
  predictions = {r["id"]: r["prediction"] for r in records}
  targets = {r["id"]: list(data.test[r["index"]].targets) for r in records}
  if len(predictions) != len(records):
    raise TaskDataError(f"{task.name}: test example ids are not unique; the metric keys on them")
  if task.metric == "cider":
    from flamingo_jax.evaluation.cider import cider
    return cider(predictions, targets)
  if task.metric == "vqa_accuracy":
    from flamingo_jax.evaluation.vqa_accuracy import vqa_accuracy
    return vqa_accuracy(predictions, targets, normalise_answers=protocol.vqa_normalisation)
  if task.metric == "roc_auc":
    from flamingo_jax.evaluation.classification_metrics import roc_auc
    return roc_auc([int(targets[r["id"]][0] == "yes") for r in records],
                   [r["p_yes"] for r in records])
  if task.metric == "top1":
    from flamingo_jax.evaluation.classification_metrics import top1
    if task.family == "vqa":  # open-ended video QA: exact match after VQA normalisation
      from flamingo_jax.evaluation.vqa_accuracy import normalise_answer
      return top1({k: normalise_answer(v) for k, v in predictions.items()},
                  {k: normalise_answer(v[0]) for k, v in targets.items()})
    return top1(predictions, {k: v[0] for k, v in targets.items()})
  raise ValueError(f"task {task.name}: unknown metric {task.metric!r}")
