"""The evaluation protocol without a model: prompts, demonstrations, the runner's files and
metric dispatch, the report, and eval.py's argument checks.

Prompts are compared with hand-written strings in OpenFlamingo's wording (open_flamingo's
evaluate.py: caption `<image>Output:{caption}<|endofchunk|>`, VQA `<image>Question:{q}
Short answer:{a}<|endofchunk|>`, generation demonstrations joined by "\\n", classification
ones by "") and the paper's. The runner's model calls are stubbed (`runner.predict`); the
end-to-end run with a model is another test's.
"""
import dataclasses
import importlib
import json
import math
import os
import random
import sys

import numpy as np
import pytest

from config_files import ROOT
from flamingo_jax.evaluation import demonstrations as demos
from flamingo_jax.evaluation import prompts, report, runner
from flamingo_jax.evaluation.cider import cider
from flamingo_jax.evaluation.tasks.base import Example, Task, TaskData, TaskDataError
from flamingo_jax.evaluation.vqa_accuracy import vqa_accuracy

sys.path.insert(0, ROOT)
eval_cli = importlib.import_module("eval")

_no_files = lambda data_dir: None  # noqa: E731
COCO = Task(name="coco", family="captioning", metric="cider", max_new_tokens=20,
            load=_no_files, postprocess="caption")
VQAV2 = Task(name="vqav2", family="vqa", metric="vqa_accuracy", max_new_tokens=5,
             load=_no_files)
MEMES = Task(name="hateful_memes", family="classification", metric="roc_auc",
             max_new_tokens=0, load=_no_files)
IMAGENET = Task(name="imagenet", family="classification", metric="top1", max_new_tokens=0,
                load=_no_files)
MSVD = Task(name="msvd_qa", family="vqa", metric="top1", max_new_tokens=5, load=_no_files,
            media="video")
SYNTHETIC = Task(name="synthetic", family="episodes", metric="accuracy", max_new_tokens=0,
                 load=_no_files, postprocess="none")


def ex(id, *targets, question=None, text=None) -> Example:
  return Example(id=id, media=None, targets=tuple(targets), question=question, text=text)


# ---- prompts ------------------------------------------------------------------------------

CAPTION_DEMOS = [ex(1, "  A dog runs on the grass. \n", "A brown dog."), ex(2, "A cat sleeps.")]
CAPTION_QUERY = ex(3, "unused")
VQA_DEMOS = [ex(1, "blue", "red", "red", question="What colour is the bus?"),
             ex(2, "2", "two", question="How many dogs are there?")]
VQA_QUERY = ex(3, "no", question="Is it raining?")
MEMES_DEMOS = [ex(1, "no", text="love the way you smile"), ex(2, "yes", text="go back home")]
MEMES_QUERY = ex(3, "no", text="have a nice day")
IMAGENET_DEMOS = [ex(1, "goldfish"), ex(2, "tench")]
IMAGENET_QUERY = ex(3, "goldfish")

PROMPTS = {
    # (task, demonstrations, query, style): (2 shots, zero-shot)
    (COCO, "openflamingo"): (
        "<image>Output:A dog runs on the grass.<|endofchunk|>\n"
        "<image>Output:A cat sleeps.<|endofchunk|>\n<image>Output:",
        "Output:A dog runs on the grass.<|endofchunk|>\n"
        "Output:A cat sleeps.<|endofchunk|>\n<image>Output:"),
    (COCO, "paper"): (
        "<image>Output: A dog runs on the grass.<|endofchunk|>"
        "<image>Output: A cat sleeps.<|endofchunk|><image>Output:",
        "Output: A dog runs on the grass.<|endofchunk|>"
        "Output: A cat sleeps.<|endofchunk|><image>Output:"),
    (VQAV2, "openflamingo"): (
        "<image>Question:What colour is the bus? Short answer:blue<|endofchunk|>\n"
        "<image>Question:How many dogs are there? Short answer:2<|endofchunk|>\n"
        "<image>Question:Is it raining? Short answer:",
        "Question:What colour is the bus? Short answer:blue<|endofchunk|>\n"
        "Question:How many dogs are there? Short answer:2<|endofchunk|>\n"
        "<image>Question:Is it raining? Short answer:"),
    (VQAV2, "paper"): (
        "<image>Question: What colour is the bus? Answer: blue<|endofchunk|>"
        "<image>Question: How many dogs are there? Answer: 2<|endofchunk|>"
        "<image>Question: Is it raining? Answer:",
        "Question: What colour is the bus? Answer: blue<|endofchunk|>"
        "Question: How many dogs are there? Answer: 2<|endofchunk|>"
        "<image>Question: Is it raining? Answer:"),
    (MEMES, "openflamingo"): (
        "<image>is an image with: 'love the way you smile' written on it. Is it hateful? "
        "Answer:no<|endofchunk|>"
        "<image>is an image with: 'go back home' written on it. Is it hateful? "
        "Answer:yes<|endofchunk|>"
        "<image>is an image with: 'have a nice day' written on it. Is it hateful? Answer:",
        "is an image with: 'love the way you smile' written on it. Is it hateful? "
        "Answer:no<|endofchunk|>"
        "is an image with: 'go back home' written on it. Is it hateful? "
        "Answer:yes<|endofchunk|>"
        "<image>is an image with: 'have a nice day' written on it. Is it hateful? Answer:"),
    (MEMES, "paper"): (
        "<image>is an image with: 'love the way you smile' written on it. Is it hateful? "
        "Answer: no<|endofchunk|>"
        "<image>is an image with: 'go back home' written on it. Is it hateful? "
        "Answer: yes<|endofchunk|>"
        "<image>is an image with: 'have a nice day' written on it. Is it hateful? Answer:",
        "is an image with: 'love the way you smile' written on it. Is it hateful? "
        "Answer: no<|endofchunk|>"
        "is an image with: 'go back home' written on it. Is it hateful? "
        "Answer: yes<|endofchunk|>"
        "<image>is an image with: 'have a nice day' written on it. Is it hateful? Answer:"),
    (IMAGENET, "openflamingo"): (
        "<image>Output:goldfish<|endofchunk|><image>Output:tench<|endofchunk|><image>Output:",
        "Output:goldfish<|endofchunk|>Output:tench<|endofchunk|><image>Output:"),
    (IMAGENET, "paper"): (
        "<image>Output: goldfish<|endofchunk|><image>Output: tench<|endofchunk|><image>Output:",
        "Output: goldfish<|endofchunk|>Output: tench<|endofchunk|><image>Output:"),
}
EXAMPLES = {COCO.name: (CAPTION_DEMOS, CAPTION_QUERY), VQAV2.name: (VQA_DEMOS, VQA_QUERY),
            MEMES.name: (MEMES_DEMOS, MEMES_QUERY),
            IMAGENET.name: (IMAGENET_DEMOS, IMAGENET_QUERY)}


@pytest.mark.parametrize("task,style", list(PROMPTS), ids=lambda v: getattr(v, "name", v))
def test_prompt_matches_the_hand_written_one(task, style):
  demonstrations, query = EXAMPLES[task.name]
  few, zero = PROMPTS[task, style]
  assert prompts.build(task, demonstrations, query, style, zero_shot=False) == few
  assert prompts.build(task, demonstrations, query, style, zero_shot=True) == zero


def test_prompt_without_demonstrations_is_the_query():
  assert prompts.build(VQAV2, [], VQA_QUERY, "openflamingo", zero_shot=False) == (
      "<image>Question:Is it raining? Short answer:")


def test_demonstration_answers():
  assert prompts.demonstration_answer(COCO, CAPTION_DEMOS[0]) == "A dog runs on the grass."
  # The first human answer, not the most common ("red").
  assert prompts.demonstration_answer(VQAV2, VQA_DEMOS[0]) == "blue"
  assert prompts.demonstration_answer(IMAGENET, IMAGENET_DEMOS[1]) == "tench"


def test_candidate_text_and_styles():
  assert prompts.candidate_text("yes", "openflamingo") == "yes"
  assert prompts.candidate_text("yes", "paper") == " yes"
  assert prompts.candidate_text("great white shark", "paper") == " great white shark"
  with pytest.raises(ValueError, match="'flamingo'"):
    prompts.candidate_text("yes", "flamingo")
  with pytest.raises(ValueError, match="'flamingo'"):
    prompts.build(COCO, CAPTION_DEMOS, CAPTION_QUERY, "flamingo", zero_shot=False)
  with pytest.raises(ValueError, match="episodes"):
    prompts.build(SYNTHETIC, [], ex(0, "red"), "openflamingo", zero_shot=False)


# ---- demonstrations -----------------------------------------------------------------------

def test_query_set_is_fixed_sorted_and_sized():
  first = demos.query_set(10_000, 2048)
  np.random.seed(7), random.seed(7)  # no global random state is used
  again = demos.query_set(10_000, 2048)
  np.testing.assert_array_equal(first, again)
  assert len(first) == 2048 and len(set(first.tolist())) == 2048
  assert np.all(np.diff(first) > 0) and first[0] >= 0 and first[-1] < 10_000
  assert not np.array_equal(first, np.arange(2048))  # drawn, not the first 2048
  small = demos.query_set(5, 3)
  assert len(small) == 3 and list(small) == sorted(small)


def test_query_set_is_the_whole_split_when_it_is_smaller():
  np.testing.assert_array_equal(demos.query_set(100, 2048), np.arange(100))
  np.testing.assert_array_equal(demos.query_set(2048, 2048), np.arange(2048))
  with pytest.raises(ValueError, match="empty"):
    demos.query_set(0, 2048)


def test_random_demonstrations():
  draw = demos.random_demonstrations(50, 8, seed=0, index=3)
  assert len(draw) == 8 and len(set(draw)) == 8 and all(0 <= p < 50 for p in draw)
  # Deterministic per (seed, index), whatever else ran before.
  for other in range(10):
    demos.random_demonstrations(50, 8, seed=other, index=other + 1)
  np.random.seed(123), random.seed(123)
  assert demos.random_demonstrations(50, 8, seed=0, index=3) == draw
  assert demos.random_demonstrations(50, 8, seed=1, index=3) != draw
  assert demos.random_demonstrations(50, 8, seed=0, index=4) != draw
  # Each test example's draw under a seed differs from the next one's.
  draws = {tuple(demos.random_demonstrations(50, 4, 2, i)) for i in range(20)}
  assert len(draws) == 20
  everything = demos.random_demonstrations(6, 6, seed=0, index=0)
  assert sorted(everything) == list(range(6))
  with pytest.raises(ValueError, match="7 demonstrations .* 6"):
    demos.random_demonstrations(6, 7, seed=0, index=0)


def test_rices_puts_the_most_similar_last():
  similarity = np.array([0.1, 0.9, 0.3, 0.7, 0.5, -0.2])
  assert demos.rices_demonstrations(similarity, 3) == [4, 3, 1]
  assert demos.rices_demonstrations(similarity, 1) == [1]
  assert demos.rices_demonstrations(similarity, 6) == [5, 0, 2, 4, 3, 1]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_permutations(k):
  positions = [17, 3, 11, 8, 0, 5, 2, 9][:k]
  orders = demos.permutations(positions, seed=1, index=5, count=6)
  assert len(orders) == min(6, math.factorial(k))
  assert orders[0] == positions
  assert len({tuple(o) for o in orders}) == len(orders)
  assert all(sorted(o) == sorted(positions) for o in orders)
  assert demos.permutations(positions, seed=1, index=5, count=6) == orders
  assert len(demos.permutations(positions, seed=1, index=5, count=100)) == len(orders)
  assert demos.permutations(positions, seed=1, index=5, count=1) == [positions]
  if k >= 4:  # 24 orders or more: the shuffles depend on the seed and the example
    assert demos.permutations(positions, seed=2, index=5, count=6) != orders
    assert demos.permutations(positions, seed=1, index=6, count=6) != orders


# ---- runner: test subsets, results.json, part files -----------------------------------------

def test_test_indices():
  for n in (0, 10, 11):
    np.testing.assert_array_equal(runner.test_indices(10, n), np.arange(10))
  subset = runner.test_indices(1000, 50)
  assert len(subset) == 50 and len(set(subset.tolist())) == 50
  assert np.all(np.diff(subset) > 0) and subset[0] >= 0 and subset[-1] < 1000
  assert not np.array_equal(subset, np.arange(50))
  np.random.seed(1)
  np.testing.assert_array_equal(runner.test_indices(1000, 50), subset)


def header(**protocol) -> dict:
  return dict(model=dict(path="/models/a", fingerprint="f00d"),
              protocol=dataclasses.asdict(runner.Protocol(**protocol)),
              versions=dict(flamingo_jax="0.1"))


def test_start_results_new_and_resumed(tmp_path):
  out = str(tmp_path)
  results = runner.start_results(out, header())
  assert results == dict(format=runner.FORMAT, **header(), tasks={})
  results["tasks"]["coco"] = dict(metric="cider", cells={"4": {"0": dict(score=81.5)}})
  runner.write_json(os.path.join(out, runner.RESULTS), results)
  # The same weights moved elsewhere, newer packages: the same evaluation, resumed.
  later = header()
  later["model"]["path"] = "/elsewhere/a"
  later["versions"] = dict(flamingo_jax="0.2")
  resumed = runner.start_results(out, later)
  assert resumed["tasks"] == {"coco": dict(metric="cider", cells={"4": {"0": dict(score=81.5)}})}
  assert resumed["versions"] == dict(flamingo_jax="0.2")
  assert runner.done(resumed, "coco", 4, 0)
  assert not runner.done(resumed, "coco", 4, 1)
  assert not runner.done(resumed, "coco", 0, 0)
  assert not runner.done(resumed, "vqav2", 4, 0)


def test_start_results_refuses_another_protocol(tmp_path):
  out = str(tmp_path)
  runner.write_json(os.path.join(out, runner.RESULTS), runner.start_results(out, header()))
  with pytest.raises(runner.EvaluationError) as e:
    runner.start_results(out, header(prompt_style="paper"))
  assert "prompt_style: 'openflamingo' → 'paper'" in str(e.value)
  assert "demonstrations" not in str(e.value)  # only the fields that differ
  with pytest.raises(runner.EvaluationError, match="num_samples: 0 → 100"):
    runner.start_results(out, header(num_samples=100))
  other = header()
  other["model"]["fingerprint"] = "beef"
  with pytest.raises(runner.EvaluationError, match="model .*'f00d' → 'beef'"):
    runner.start_results(out, other)


def test_start_results_names_a_field_the_new_protocol_lacks(tmp_path):
  out = str(tmp_path)
  old = header()
  old["protocol"]["retired_option"] = 1
  runner.write_json(os.path.join(out, runner.RESULTS), runner.start_results(out, old))
  with pytest.raises(runner.EvaluationError, match="retired_option: 1 → None"):
    runner.start_results(out, header())


def test_write_json_goes_through_a_temporary_file(tmp_path, monkeypatch):
  path = str(tmp_path / "results.json")
  replaced = []
  real_replace = os.replace

  def recording_replace(src, dst):
    replaced.append((src, dst))
    assert os.path.isfile(src) and json.load(open(src)) == {"a": [1, 2]}
    real_replace(src, dst)

  monkeypatch.setattr(os, "replace", recording_replace)
  runner.write_json(path, {"a": [1, 2]})
  assert len(replaced) == 1 and replaced[0][1] == path and replaced[0][0] != path
  assert os.path.dirname(replaced[0][0]) == str(tmp_path)  # same file system
  assert os.listdir(tmp_path) == ["results.json"]
  with open(path) as f:
    assert json.load(f) == {"a": [1, 2]}
  monkeypatch.undo()
  with pytest.raises(TypeError):  # a write that fails leaves the previous file whole
    runner.write_json(path, {"a": object()})
  with open(path) as f:
    assert json.load(f) == {"a": [1, 2]}


def write_part(folder, name, process, records, tail=""):
  with open(os.path.join(folder, f"{name}.part{process}.jsonl"), "a") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    f.write(tail)


def rec(i):
  return dict(index=i, id=f"ex{i}", prediction=f"p{i}")


def test_join_and_read_parts(tmp_path):
  folder, name = str(tmp_path), "coco_4shot_seed0"
  write_part(folder, name, 0, [rec(0), rec(2)])
  write_part(folder, name, 1, [rec(1), rec(3)])
  assert runner._join(folder, name, np.array([0, 1, 2, 3])) == [rec(0), rec(1), rec(2), rec(3)]
  assert runner._join(folder, name, [3, 1]) == [rec(3), rec(1)]
  with pytest.raises(runner.EvaluationError, match="index 4"):
    runner._join(folder, name, [0, 1, 2, 3, 4, 5])
  # A resumed batch repeats a line: one record kept.
  write_part(folder, name, 0, [rec(2)])
  assert runner._join(folder, name, [0, 1, 2, 3]) == [rec(0), rec(1), rec(2), rec(3)]
  # A kill mid-write leaves half a line: it is dropped, the whole ones are read.
  write_part(folder, name, 1, [], tail=json.dumps(rec(5))[:17])
  assert sorted(r["index"] for r in runner._read_parts(folder, name)) == [0, 1, 2, 2, 3]
  # Other cells' part files are not this cell's.
  write_part(folder, "coco_4shot_seed1", 0, [rec(7)])
  assert 7 not in {r["index"] for r in runner._read_parts(folder, name)}


def test_run_cell_resumes_after_a_kill_mid_write(tmp_path, monkeypatch):
  """A cell whose part file ends in half a record: the missing examples are predicted
  (and only they), and the cell scores all of them."""
  data = TaskData(train=[], test=[ex(f"im{i}", name) for i, name in
                                  enumerate(["goldfish", "tench", "goldfish", "tench", "tench"])],
                  class_names=("goldfish", "tench"))
  asked = []

  def fake_predict(ctx, task, data, prepared, shots, seed, indices):
    asked.append(list(indices))
    return [dict(index=i, id=data.test[i].id, prediction=data.test[i].targets[0])
            for i in indices]

  monkeypatch.setattr(runner, "predict", fake_predict)
  ctx = runner.Context(model=None, params=None, tokenizer=None, preprocess=None,
                       protocol=runner.Protocol(), batch_size=2, output=str(tmp_path))
  name = runner.cell_name("imagenet", 4, 0)
  folder = tmp_path / "predictions"
  folder.mkdir()
  done = [dict(index=i, id=data.test[i].id, prediction=data.test[i].targets[0]) for i in (0, 1)]
  write_part(str(folder), name, 0, done, tail=json.dumps(dict(index=2, id="im2"))[:12])
  entry = runner.run_cell(ctx, IMAGENET, data, dict(test_indices=np.arange(5)), 4, 0)
  assert asked == [[2, 3], [4]]
  assert entry["score"] == 100.0 and entry["num_examples"] == 5
  assert entry["predictions"] == os.path.join("predictions", f"{name}.jsonl")
  with open(tmp_path / entry["predictions"]) as f:
    assert [json.loads(line)["index"] for line in f] == [0, 1, 2, 3, 4]
  assert sorted(os.listdir(folder)) == [f"{name}.jsonl"]  # part files removed


# ---- runner: metric dispatch ----------------------------------------------------------------

def records_for(predictions: list[str], **extra) -> list[dict]:
  out = [dict(index=i, id=f"q{i}", prediction=p) for i, p in enumerate(predictions)]
  for key, values in extra.items():
    for r, v in zip(out, values):
      r[key] = v
  return out


def test_metric_cider():
  captions = [("A man riding a motorcycle on a dirt road.", "A man on a motor bike."),
              ("A woman cutting a large sheet cake.", "A woman with a cake.")]
  data = TaskData(train=[], test=[ex(f"q{i}", *c) for i, c in enumerate(captions)])
  records = records_for(["a man riding a motorbike on a road", "a woman cutting a cake"])
  score = runner.metric(COCO, data, records, runner.Protocol())
  expected = cider({"q0": records[0]["prediction"], "q1": records[1]["prediction"]},
                   {"q0": list(captions[0]), "q1": list(captions[1])})
  assert score == expected and score > 0


def test_metric_vqa_accuracy_follows_the_protocols_normalisation():
  answers = [("Yes",) * 10, ("no",) * 10, ("2", "2", "two", "3", "2", "2", "2", "2", "2", "2")]
  data = TaskData(train=[], test=[ex(f"q{i}", *a) for i, a in enumerate(answers)])
  records = records_for(["yes", "no", "two"])
  scores = {}
  for mode in ("official", "open_flamingo"):
    scores[mode] = runner.metric(VQAV2, data, records, runner.Protocol(vqa_normalisation=mode))
    assert scores[mode] == vqa_accuracy({"q0": "yes", "q1": "no", "q2": "two"},
                                        {f"q{i}": list(a) for i, a in enumerate(answers)},
                                        normalise_answers=mode)
  assert scores["official"] == pytest.approx(200 / 3)  # raw "yes" ≠ ten raw "Yes"
  assert scores["open_flamingo"] == pytest.approx(100.0)


def test_metric_top1_video_qa_normalises_both_sides():
  data = TaskData(train=[], test=[ex("q0", "2"), ex("q1", "cat"), ex("q2", "the dog")])
  assert runner.metric(MSVD, data, records_for(["Two.", "dog", "Dog"]),
                       runner.Protocol()) == pytest.approx(200 / 3)


def test_metric_top1_classification_is_plain_equality():
  data = TaskData(train=[], test=[ex("q0", "goldfish"), ex("q1", "tench"), ex("q2", "tench"),
                                  ex("q3", "goldfish")], class_names=("goldfish", "tench"))
  assert runner.metric(IMAGENET, data, records_for(["goldfish", "Tench", "tench", "tench"]),
                       runner.Protocol()) == 50.0


def test_metric_roc_auc_from_p_yes():
  data = TaskData(train=[], test=[ex("q0", "yes"), ex("q1", "no"), ex("q2", "yes"),
                                  ex("q3", "no")], class_names=("no", "yes"))
  records = records_for(["yes", "no", "no", "yes"], p_yes=[0.9, 0.2, 0.4, 0.6])
  # Positive/negative pairs ranked right: (.9, .2), (.9, .6), (.4, .2); not (.4, .6).
  assert runner.metric(MEMES, data, records, runner.Protocol()) == pytest.approx(75.0)


def test_metric_accuracy_is_the_mean_credit():
  records = records_for(["red"] * 4, credit=[1.0, 0.0, 0.5, 0.25])
  assert runner.metric(SYNTHETIC, TaskData(train=[], test=[]), records,
                       runner.Protocol()) == pytest.approx(43.75)


def test_metric_refuses_duplicate_ids_and_unknown_metrics():
  data = TaskData(train=[], test=[ex("q0", "tench"), ex("q0", "tench")])
  records = [dict(index=0, id="q0", prediction="tench"), dict(index=1, id="q0",
                                                              prediction="goldfish")]
  with pytest.raises(TaskDataError, match="not unique"):
    runner.metric(IMAGENET, data, records, runner.Protocol())
  with pytest.raises(ValueError, match="bleu"):
    runner.metric(dataclasses.replace(IMAGENET, metric="bleu"), data, records[:1],
                  runner.Protocol())


# ---- report -------------------------------------------------------------------------------

RESULTS = dict(
    model=dict(path="/models/of3b", fingerprint="ab12"),
    protocol=dict(demonstrations="random", prompt_style="openflamingo"),
    tasks=dict(
        coco=dict(metric="cider", cells={
            "4": {"1": dict(score=81.0), "0": dict(score=80.0), "2": dict(score=85.0)},
            "0": {"0": dict(score=70.0), "1": dict(score=72.0), "2": dict(score=77.0)}}),
        vqav2=dict(metric="vqa_accuracy", cells={"0": {"0": dict(score=45.3)}})))

# coco 0 shots: mean 73, deviations -3, -1, 4: sample std sqrt(26 / 2) = 3.61 (population
# std would be 2.94); 4 shots: mean 82, sqrt(14 / 2) = 2.65.
MARKDOWN = """\
model: `/models/of3b` (fingerprint ab12); demonstrations: random; prompts: openflamingo; \
mean ± std over seeds (n)

| task | metric | 0 shots | 4 shots |
|---|---|---|---|
| coco | cider | 73.0 ± 3.6 (n=3) | 82.0 ± 2.6 (n=3) |
| vqav2 | vqa_accuracy | 45.3 (n=1) | – |
"""


def test_report_markdown():
  assert report.markdown(RESULTS) == MARKDOWN
  assert report.cell_scores(RESULTS["tasks"]["coco"]) == {4: [80.0, 81.0, 85.0],
                                                          0: [70.0, 72.0, 77.0]}


def test_report_plot_and_write(tmp_path):
  path = str(tmp_path / "scores.png")
  report.plot(RESULTS, path)
  with open(path, "rb") as f:
    png = f.read()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
  report.write(RESULTS, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["results.md", "scores.png"]
  with open(tmp_path / "results.md") as f:
    assert f.read() == MARKDOWN


# ---- eval.py's arguments ------------------------------------------------------------------

@pytest.mark.parametrize("args,flag,says", [
    (["--tasks", "coco,nope"], "--tasks", "nope"),
    (["--tasks", "synthetic", "--shots", "0,-4"], "--shots", ">= 0"),
    (["--tasks", "synthetic", "--shots=-1"], "--shots", ">= 0"),
    (["--tasks", "synthetic", "--shots", "0,four"], "--shots", "four"),
    (["--tasks", "synthetic", "--shots", "1.5"], "--shots", "1.5"),
    (["--tasks", "synthetic", "--seeds", "0"], "--seeds", ">= 1"),
    (["--tasks", "synthetic", "--seeds", "two"], "--seeds", "two"),
    (["--tasks", "synthetic,coco"], "--data-dir", "coco"),
    (["--tasks", "synthetic", "--data-dir", "/no/such/dir"], "--data-dir", "/no/such/dir"),
    (["--tasks", "synthetic", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["--tasks", "synthetic", "--num-samples", "-1"], "--num-samples", ">= 0"),
    (["--tasks", "synthetic", "--demonstrations", "nearest"], "--demonstrations", "nearest"),
    (["--tasks", "synthetic", "--no-model"], "--model", "required"),
    (["--no-model", "--output", "x"], "--model", "required"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_eval_usage_errors(args, flag, says, tmp_path, capsys):
  argv = ["--output", str(tmp_path / "out")] + args
  if "--no-model" in argv:
    argv.remove("--no-model")
  else:
    argv = ["--model", str(tmp_path)] + argv
  assert eval_cli.main(argv) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  lines = captured.err.splitlines()
  assert len(lines) == 1 and captured.err.endswith("\n"), captured.err
  assert lines[0].startswith("eval: error: ") and flag in lines[0] and says in lines[0], lines[0]
  assert not os.path.exists(tmp_path / "out")  # nothing written before the checks pass


def test_eval_list_tasks(capsys):
  from flamingo_jax.evaluation.tasks.registry import TASKS
  assert eval_cli.main(["--list-tasks"]) == 0
  out = capsys.readouterr().out
  names = [line.split()[0] for line in out.splitlines()]
  assert names == list(TASKS)
  assert {"coco", "vqav2", "okvqa", "textvqa", "vizwiz", "hateful_memes", "imagenet",
          "flickr30k", "msvd_qa", "msrvtt_qa", "vatex", "synthetic"} <= set(names)
