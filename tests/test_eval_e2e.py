"""eval.py end to end on every file task: a tiny converted OpenFlamingo model, tiny
datasets in each official layout (eval_fixtures.py, video_fixtures.py).

What is checked: every task's files are read, its prompts are built as specified (one
hand-written expected prompt per family), predictions and scores are written, each score
equals its official metric recomputed from the predictions file and the fixture's own
references, and a re-run resumes without recomputing finished cells.
"""
import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("open_flamingo")

import eval_fixtures as ef  # noqa: E402
import video_fixtures as vf  # noqa: E402
from config_files import ROOT  # noqa: E402
from flamingo_jax.evaluation import demonstrations  # noqa: E402
from flamingo_jax.evaluation.cider import cider  # noqa: E402
from flamingo_jax.evaluation.classification_metrics import roc_auc, top1  # noqa: E402
from flamingo_jax.evaluation.vqa_accuracy import normalise_answer, vqa_accuracy  # noqa: E402
from tests import tiny_openflamingo as tiny  # noqa: E402

sys.path.insert(0, ROOT)
import eval as eval_cli  # noqa: E402

TASKS = ("coco", "coco_tfds", "flickr30k", "vqav2", "textvqa", "vizwiz", "hateful_memes",
         "imagenet", "msvd_qa", "msrvtt_qa", "vatex")
EOC = "<|endofchunk|>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  _, _, out = tiny.convert(str(tmp_path_factory.mktemp("openflamingo")), "mpt")
  # ALiBi has no position table: room for 2-shot prompts of byte-level fixture text.
  path = os.path.join(out, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["lm"]["max_seq_len"] = 512
  with open(path, "w") as f:
    json.dump(config, f)
  return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("data"))
  expected = {"coco": ef.write_coco(root), "coco_tfds": ef.write_coco_tfds(root),
              "flickr30k": ef.write_flickr30k(root), "vqav2": ef.write_vqav2(root),
              "textvqa": ef.write_textvqa(root), "vizwiz": ef.write_vizwiz(root),
              "hateful_memes": ef.write_hateful_memes(root), "imagenet": ef.write_imagenet(root)}
  vf.make_msvd_qa(root), vf.make_msrvtt_qa(root), vf.make_vatex(root)
  return root, expected


ZERO_SHOT = ("coco", "imagenet")  # zero-shot cells for one generation and one ranking task


def run_eval(model_dir, data_dir, output, *extra, tasks=TASKS, shots="2"):
  return eval_cli.main(["--model", model_dir, "--tasks", ",".join(tasks), "--shots", shots,
                        "--seeds", "1", "--data-dir", data_dir, "--output", output,
                        "--batch-size", "2", "--positions", "hf", *extra])


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def evaluated(model_dir, data, tmp_path_factory):
  output = str(tmp_path_factory.mktemp("eval"))
  assert run_eval(model_dir, data[0], output) == 0
  assert run_eval(model_dir, data[0], output, tasks=ZERO_SHOT, shots="0") == 0  # a resume too
  with open(os.path.join(output, "results.json")) as f:
    return output, json.load(f)


def test_every_task_scored_by_its_metric(evaluated, data):
  output, results = evaluated
  _, expected = data
  assert set(results["tasks"]) == set(TASKS)
  for name in TASKS:
    task = results["tasks"][name]
    assert set(task["cells"]) == ({"0", "2"} if name in ZERO_SHOT else {"2"})
    for shots in task["cells"]:
      cell = task["cells"][shots]["0"]
      records = read_jsonl(os.path.join(output, cell["predictions"]))
      assert cell["num_examples"] == len(records) == task["num_test"] > 0
      preds = {r["id"]: r["prediction"] for r in records}
      if name in expected:  # the fixture's own references, not the reader's
        test = expected[name]["test"]  # coco_tfds: keyed by id (TFDS keeps no order)
        test = test.values() if isinstance(test, dict) else test
        targets = {e["id"]: list(e["targets"]) for e in test}
        assert set(preds) == set(targets), name
      else:
        targets = {r["id"]: None for r in records}
      want = _recompute(task["metric"], name, records, preds, targets, output)
      assert cell["score"] == pytest.approx(want, abs=1e-9), (name, shots)
  assert os.path.getsize(os.path.join(output, "scores.png")) > 0
  table = open(os.path.join(output, "results.md")).read()
  assert all(f"| {name} |" in table for name in TASKS)


def _recompute(metric, name, records, preds, targets, output):
  if metric == "cider":
    if targets[next(iter(targets))] is None:  # vatex: the release file's captions
      from video_fixtures import VATEX_TEST
      targets = {c["videoID"]: c["enCap"] for c in VATEX_TEST}
    return cider(preds, targets)
  if metric == "vqa_accuracy":
    return vqa_accuracy(preds, targets)
  if metric == "roc_auc":
    return roc_auc([int(targets[r["id"]][0] == "yes") for r in records],
                   [r["p_yes"] for r in records])
  if name == "imagenet":
    return top1(preds, {k: v[0] for k, v in targets.items()})
  from video_fixtures import MSRVTT_TEST, MSVD_TEST
  answers = {q["id"]: q["answer"] for q in (MSVD_TEST if name == "msvd_qa" else MSRVTT_TEST)}
  return top1({k: normalise_answer(v) for k, v in preds.items()},
              {k: normalise_answer(answers[k]) for k in preds})


def _demos(name, seed, index, shots, expected):
  """The demonstrations the protocol draws (the fixture's train split is smaller than the
  query set: the query set is all of it, in order)."""
  train = expected[name]["train"]
  positions = demonstrations.random_demonstrations(len(train), shots or 2, seed, index)
  return [train[p] for p in positions]


def test_prompts_as_specified(evaluated, data):
  """One hand-written expected prompt per family, both shot counts."""
  output, results = evaluated
  _, expected = data
  for name, shots in (("coco", 2), ("coco", 0), ("vqav2", 2), ("hateful_memes", 2),
                      ("imagenet", 0)):
    cell = results["tasks"][name]["cells"][str(shots)]["0"]
    records = read_jsonl(os.path.join(output, cell["predictions"]))
    test_ids = [e["id"] for e in expected[name]["test"]]
    r = records[0]
    index = test_ids.index(r["id"])
    demos = _demos(name, 0, index, shots, expected)
    query = expected[name]["test"][index]
    img = "<image>" if shots else ""
    if name == "coco":
      want = "".join(f"{img}Output:{d['targets'][0].strip()}{EOC}\n" for d in demos) + "<image>Output:"
    elif name == "vqav2":
      want = "".join(f"<image>Question:{d['question']} Short answer:{d['targets'][0]}{EOC}\n"
                     for d in demos) + f"<image>Question:{query['question']} Short answer:"
    elif name == "hateful_memes":
      memes = lambda t, label: (f"<image>is an image with: '{t}' written on it. Is it hateful? "
                                f"Answer:{label}")
      want = "".join(memes(d["text"], d["targets"][0]) + EOC for d in demos) + memes(query["text"], "")
    else:
      want = "".join(f"Output:{d['targets'][0]}{EOC}" for d in demos) + "<image>Output:"
    assert r["prompt"] == want, (name, shots)
    assert r["demonstrations"] == [d["id"] for d in demos]


def test_rerun_resumes_finished_cells(evaluated, model_dir, data, monkeypatch):
  """A second seed (for one generation and one classification task): the first seed's
  cells are kept as they are, only the new ones run."""
  from flamingo_jax.evaluation import runner
  output, before = evaluated
  calls = []
  predict = runner.predict
  monkeypatch.setattr(runner, "predict", lambda ctx, task, *a: calls.append(task.name) or predict(ctx, task, *a))
  rerun = ZERO_SHOT
  assert run_eval(model_dir, data[0], output, "--seeds", "2", tasks=rerun, shots="0,2") == 0
  after = json.load(open(os.path.join(output, "results.json")))
  assert after["tasks"].keys() == before["tasks"].keys()
  for name in TASKS:
    for shots in before["tasks"][name]["cells"]:
      assert after["tasks"][name]["cells"][shots]["0"] == before["tasks"][name]["cells"][shots]["0"]
      assert ("1" in after["tasks"][name]["cells"][shots]) == (name in rerun)
  # The seed-1 cells only: ceil(num_test / batch size 2) calls per shot count.
  assert len(calls) == sum(2 * -(-before["tasks"][n]["num_test"] // 2) for n in rerun)


def test_okvqa_without_stemming_data_names_the_download(model_dir, data, tmp_path, capsys):
  ef.write_okvqa(data[0])
  from flamingo_jax.evaluation import vqa_accuracy as vqa_lib
  try:
    vqa_lib.require_stemming_data()
    pytest.skip("NLTK's stemming data is installed here")
  except vqa_lib.StemmingDataError:
    pass
  code = eval_cli.main(["--model", model_dir, "--tasks", "okvqa", "--shots", "0",
                        "--seeds", "1", "--data-dir", data[0], "--output", str(tmp_path)])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "nltk" in err[0].lower(), err


def test_rices_picks_the_most_similar_last_and_caches_features(model_dir, data, tmp_path,
                                                                monkeypatch):
  import jax.numpy as jnp

  from flamingo_jax.evaluation import rices
  from flamingo_jax.load_model import load_model
  from PIL import Image
  root, expected = data
  output = str(tmp_path)
  args = ["--model", model_dir, "--tasks", "coco", "--shots", "2", "--data-dir", root,
          "--output", output, "--batch-size", "2", "--positions", "hf",
          "--demonstrations", "rices"]
  assert eval_cli.main(args + ["--seeds", "1"]) == 0
  # Features re-derived here: the vision tower's tokens, averaged, unit norm.
  model, params, _, preprocess = load_model(model_dir)

  def feature(example, split):
    folder = "train2014" if split == "train" else "val2014"
    pixels = preprocess(np.asarray(Image.open(os.path.join(
        root, "coco", folder, f"COCO_{folder}_{example['id']:012d}.jpg")).convert("RGB")))
    tokens = model.apply({"params": params}, jnp.asarray(pixels)[None],
                         method=lambda m, x: m.vision(x))
    x = np.asarray(tokens, np.float64).mean(axis=1)[0]
    return x / np.linalg.norm(x)

  train = expected["coco"]["train"]
  q = np.stack([feature(e, "train") for e in train])
  for r in read_jsonl(os.path.join(output, "predictions", "coco_2shot_seed0.jsonl")):
    query = next(e for e in expected["coco"]["test"] if e["id"] == r["id"])
    order = np.argsort(-(q @ feature(query, "test")))[:2]
    assert r["demonstrations"] == [train[i]["id"] for i in order[::-1]]  # most similar last
  # A second seed reads the query set's features from the cache.
  monkeypatch.setattr(rices, "features", lambda *a, **k: pytest.fail("features recomputed"))
  assert eval_cli.main(args + ["--seeds", "2"]) == 0


def test_prompt_ensembling_averages_over_orders(model_dir, data, tmp_path):
  root, _ = data
  common = ["--model", model_dir, "--tasks", "hateful_memes", "--shots", "2", "--seeds", "1",
            "--data-dir", root, "--batch-size", "2", "--positions", "hf"]
  plain, ensembled = str(tmp_path / "plain"), str(tmp_path / "ensembled")
  assert eval_cli.main(common + ["--output", plain]) == 0
  assert eval_cli.main(common + ["--output", ensembled, "--prompt-ensembling"]) == 0
  one = read_jsonl(os.path.join(plain, "predictions", "hateful_memes_2shot_seed0.jsonl"))
  two = read_jsonl(os.path.join(ensembled, "predictions", "hateful_memes_2shot_seed0.jsonl"))
  assert [r["permutations"] for r in one] == [1] * len(one)
  assert [r["permutations"] for r in two] == [2] * len(two)  # 2 shots: 2! orders
  # Same demonstrations, first order the same; averaging the reversed order moves P(yes).
  assert [r["demonstrations"] for r in one] == [r["demonstrations"] for r in two]
  assert any(abs(a["p_yes"] - b["p_yes"]) > 1e-6 for a, b in zip(one, two))


def test_paper_prompt_style(model_dir, data, tmp_path):
  root, expected = data
  assert eval_cli.main(["--model", model_dir, "--tasks", "vqav2", "--shots", "2", "--seeds", "1",
                        "--data-dir", root, "--output", str(tmp_path), "--batch-size", "2",
                        "--positions", "hf", "--prompt-style", "paper"]) == 0
  r = read_jsonl(os.path.join(str(tmp_path), "predictions", "vqav2_2shot_seed0.jsonl"))[0]
  test_ids = [e["id"] for e in expected["vqav2"]["test"]]
  index = test_ids.index(r["id"])
  demos = _demos("vqav2", 0, index, 2, expected)
  query = expected["vqav2"]["test"][index]
  want = "".join(f"<image>Question: {d['question']} Answer: {d['targets'][0]}{EOC}"
                 for d in demos) + f"<image>Question: {query['question']} Answer:"
  assert r["prompt"] == want


def test_okvqa_end_to_end_without_the_stemmer(model_dir, data, tmp_path, monkeypatch):
  """OK-VQA's files, prompts and scoring; its NLTK stemming (tested on its own in
  test_eval_metrics.py) is replaced by the identity, as its data is not installed here."""
  from flamingo_jax.evaluation import postprocess, vqa_accuracy as vqa_lib
  root, _ = data
  expected = ef.write_okvqa(root)
  monkeypatch.setattr(vqa_lib, "require_stemming_data", lambda: None)
  monkeypatch.setattr(postprocess, "ok_vqa_answer", lambda text: postprocess.vqa_answer(text))
  output = str(tmp_path)
  assert eval_cli.main(["--model", model_dir, "--tasks", "okvqa", "--shots", "2", "--seeds", "1",
                        "--data-dir", root, "--output", output, "--batch-size", "2",
                        "--positions", "hf"]) == 0
  cell = json.load(open(os.path.join(output, "results.json")))["tasks"]["okvqa"]["cells"]["2"]["0"]
  records = read_jsonl(os.path.join(output, cell["predictions"]))
  targets = {e["id"]: list(e["targets"]) for e in expected["test"]}
  assert {r["id"] for r in records} == set(targets)
  assert cell["score"] == pytest.approx(vqa_accuracy({r["id"]: r["prediction"] for r in records},
                                                     targets), abs=1e-9)
