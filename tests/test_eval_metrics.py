"""The evaluation metrics and answer cuts against the official scorers on the same inputs.

CIDEr against pycocoevalcap's COCOEvalCap over pycocotools COCO objects (as open_flamingo's
compute_cider runs it), VQA accuracy against open_flamingo's compute_vqa_accuracy on the
question / annotation / result files it reads, the cuts against open_flamingo's
postprocess functions. open_flamingo's eval modules are loaded from their files: importing
the package would import its torch model code, and evaluate.py imports them by bare name.
"""
import importlib.util
import json
import pathlib
import sys
import types

import numpy as np
import pytest

from flamingo_jax.evaluation import classification_metrics, cider, postprocess, vqa_accuracy


def _open_flamingo_eval(module: str):
  root = pathlib.Path(importlib.util.find_spec("open_flamingo").origin).parent
  spec = importlib.util.spec_from_file_location(f"_open_flamingo_{module}",
                                                root / "eval" / f"{module}.py")
  loaded = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(loaded)
  return loaded


# ---- CIDEr -------------------------------------------------------------------------------

_REFERENCES = {
    391895: ["A man with a red helmet on a small moped on a dirt road.",
             "Man riding a motor bike on a dirt road on the countryside.",
             "A man riding on the back of a motorcycle.",
             "A dirt path with a young person on a motor bike rests to the foreground.",
             "A man in a red shirt and a red hat is on a motorcycle on a hill side."],
    522418: ["A woman wearing a net on her head cutting a cake.",
             "A woman cutting a large white sheet cake.",
             "A woman wearing a hair net cutting a large sheet cake.",
             "there is a woman that is cutting a white cake",
             "A woman marking a cake with the back of a chef's knife."],
    184613: ["A child holding a flowered umbrella and petting a yak.",
             "A young man holding an umbrella next to a herd of cattle.",
             "a young boy barefoot holding an umbrella touching the horn of a cow",
             "A young boy with an umbrella who is touching the horn of a cow.",
             "A boy holding an umbrella while standing next to livestock."],
    318219: ["A young boy standing in front of a computer keyboard.",
             "a little boy wearing headphones and looking at a computer monitor",
             "He is listening intently to the computer at school.",
             "A young boy stares up at the computer monitor.",
             "a young kid with head phones on using a computer"],
    554625: ["a boy wearing headphones using one computer in a long row of computers",
             "A little boy with earphones on listening to something.",
             "A group of people sitting at desk using computers.",
             "Children sitting at computer stations on a long table.",
             "A small child wearing headphones plays on the computer."],
    397133: ["A man is in a kitchen making pizzas.",
             "Man in apron standing on front of oven with pans and bakeware",
             "A baker is working in the kitchen rolling dough.",
             "A person standing by a stove in a kitchen.",
             "A table with pies being made and a person standing near a wall with pots and pans "
             "hanging on the wall."],
    # Not predicted: must not enter the IDF.
    999999: ["A man riding a horse on a beach.", "A man on a horse by the sea."],
}
# Case, punctuation, quotes, brackets, contractions, a repeat, an empty caption, a
# line break: what the PTB tokenizer and CIDEr-D's clipping and length penalty act on.
_CAPTIONS = {
    522418: "A WOMAN cutting a large, white sheet-cake!",
    391895: "a man riding a motorcycle on a dirt road.",
    184613: 'a boy "holding" an umbrella (next to a cow)',
    318219: "A young boy isn't looking at the computer monitor... at school?",
    554625: "computer computer computer computer",
    397133: "",
}


def _official_cider(tmp_path, monkeypatch, captions, references) -> float:
  """COCOEvalCap as open_flamingo's compute_cider runs it, ×100, with only its CIDEr scorer:
  SPICE would download Stanford CoreNLP, and the other scores are not compared."""
  import pycocoevalcap.eval as coco_eval_module
  from pycocotools.coco import COCO

  class NoScore:
    score = float("nan")

    def __init__(self, *args):
      pass

    def method(self):
      return "skipped"

    def compute_score(self, gts, res):
      return self.score, []

  class NoBleu(NoScore):
    score = []  # Bleu reports a list of four

  for name, stub in (("Bleu", NoBleu), ("Meteor", NoScore), ("Rouge", NoScore),
                     ("Spice", NoScore)):
    monkeypatch.setattr(coco_eval_module, name, stub)
  images = [{"id": i} for i in references]
  annotations = [{"image_id": i, "id": n, "caption": c}
                 for n, (i, c) in enumerate((i, c) for i, cs in references.items() for c in cs)]
  annotations_path, results_path = tmp_path / "captions.json", tmp_path / "results.json"
  annotations_path.write_text(json.dumps({"images": images, "annotations": annotations,
                                          "type": "captions", "info": {}, "licenses": []}))
  results_path.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in captions.items()]))
  coco = COCO(str(annotations_path))
  coco_result = coco.loadRes(str(results_path))
  coco_eval = coco_eval_module.COCOEvalCap(coco, coco_result)
  coco_eval.params["image_id"] = coco_result.getImgIds()
  coco_eval.evaluate()
  return coco_eval.eval["CIDEr"] * 100.0


def test_cider_equals_coco_eval_cap(tmp_path, monkeypatch):
  expected = _official_cider(tmp_path, monkeypatch, _CAPTIONS, _REFERENCES)
  got = cider.cider(_CAPTIONS, _REFERENCES)
  assert got == pytest.approx(expected, abs=1e-9, rel=0)
  assert 10 < got < 200  # a real score, not a degenerate one


def test_cider_line_breaks_stay_on_their_caption():
  # A '\r' in one caption would shift every later caption onto the wrong image.
  references = {1: ["a dog runs on grass"], 2: ["a cat sleeps on a sofa"]}
  broken = cider.cider({1: "a dog\rruns on grass", 2: "a cat sleeps on a sofa"}, references)
  clean = cider.cider({1: "a dog runs on grass", 2: "a cat sleeps on a sofa"}, references)
  assert broken == pytest.approx(clean, abs=1e-12)


def test_cider_errors(monkeypatch):
  with pytest.raises(cider.CiderError, match="no predictions"):
    cider.cider({}, _REFERENCES)
  with pytest.raises(cider.CiderError, match="no references: 7"):
    cider.cider({391895: "a man", 7: "a dog"}, _REFERENCES)
  with pytest.raises(cider.CiderError, match="empty reference list: 5"):
    cider.cider({5: "a dog"}, {5: []})
  with pytest.raises(cider.CiderError, match="not strings"):
    cider.cider({5: "a dog"}, {5: "a dog on grass"})
  monkeypatch.setenv("PATH", "/nonexistent")
  with pytest.raises(cider.JavaNotFoundError, match="apt-get install default-jre-headless") as e:
    cider.cider({391895: "a man"}, _REFERENCES)
  assert isinstance(e.value, RuntimeError) and "conda-forge openjdk" in str(e.value)


# ---- VQA accuracy ------------------------------------------------------------------------

def _ten(*groups: tuple[str, int]) -> list[str]:
  answers = [a for a, n in groups for _ in range(n)]
  assert len(answers) == 10
  return answers


# (prediction, the ten human answers): every normalisation rule, agreeing and disagreeing
# answers, partial credit.
_VQA_CASES = [
    ("Yes", _ten(("yes", 10))),                                # case, answers agree
    ("yes", _ten(("yes", 10))),
    ("  yes\n", _ten(("yes", 10))),                            # whitespace
    ("two", _ten(("2", 10))),                                  # number word, agree
    ("2", _ten(("Two", 10))),                                  # agree on an unnormalised form
    ("dont", _ten(("don't", 10))),                             # contraction, agree
    ("Two.", _ten(("2", 7), ("3", 3))),                        # trailing period, case, digit
    ("the dog", _ten(("dog", 5), ("a dog", 3), ("puppy", 2))),  # articles
    ("dont know", _ten(("don't know", 4), ("dont know", 2), ("no", 4))),
    ("1,000", _ten(("1000", 6), ("1,000", 2), ("999", 2))),    # comma inside a number
    ("black/white", _ten(("black and white", 5), ("black white", 3), ("gray", 2))),
    ("red, white", _ten(("red white", 3), ("red", 4), ("white", 3))),  # ", " is deleted
    ("3.5.", _ten(("3.5", 3), ("3", 7))),                      # a period before a digit stays
    ("none", _ten(("0", 3), ("zero", 3), ("1", 4))),
    ('"hot-dog"!', _ten(("hot dog", 4), ("hotdog", 3), ("sandwich", 3))),
    ("a (big) {red} [ball]", _ten(("big red ball", 2), ("ball", 8))),
    ("what's @home?", _ten(("what's home", 1), ("home", 9))),  # one match: partial credit
    ("yes" + "." * 40, _ten(("yes", 6), ("no", 4))),           # only 32 periods are removed
    ("YES", _ten(("Yes", 5), ("yes", 5))),                     # disagree only in case
    ("2", _ten(("2", 2), ("3", 8))),
    ("blue", _ten(("green", 10))),
    ("Isnt it", _ten(("isn't it", 5), ("isnt it", 5))),
    ("x=y+z\\w_v>u<t`s;r", _ten(("x y z w v u t s r", 5), ("no", 5))),
]


def _vqa_files(tmp_path, cases) -> tuple[str, str, str, dict, dict]:
  """open_flamingo's three files (VQAv2 layout) for `cases`; also the dicts we score."""
  predictions = {1000 + k: p for k, (p, _) in enumerate(cases)}
  answers = {1000 + k: a for k, (_, a) in enumerate(cases)}
  questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
               "data_subtype": "val2014", "license": {},
               "questions": [{"question_id": q, "image_id": q // 10, "question": "?"}
                             for q in predictions]}
  annotations = {"annotations": [
      {"question_id": q, "image_id": q // 10, "question_type": "what", "answer_type": "other",
       "multiple_choice_answer": a[0],
       "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": n + 1}
                   for n, x in enumerate(a)]}
      for q, a in answers.items()]}
  results = [{"question_id": q, "answer": p} for q, p in predictions.items()]
  paths = []
  for name, content in (("results", results), ("questions", questions),
                        ("annotations", annotations)):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(content))
    paths.append(str(path))
  return (*paths, predictions, answers)


def test_vqa_accuracy_equals_open_flamingo(tmp_path):
  metric = _open_flamingo_eval("vqa_metric")
  results, questions, annotations, predictions, answers = _vqa_files(tmp_path, _VQA_CASES)
  got = vqa_accuracy.vqa_accuracy(predictions, answers, normalise_answers="open_flamingo")
  assert round(got, 2) == metric.compute_vqa_accuracy(results, questions, annotations)
  # Unrounded (n=30 keeps every digit of a float near 1-100): the same floats exactly.
  vqa = metric.VQA(annotations, questions)
  evaluator = metric.VQAEval(vqa, vqa.loadRes(results, questions), n=30)
  evaluator.evaluate()
  assert got == evaluator.accuracy["overall"]
  for q in predictions:
    assert 100 * vqa_accuracy.question_accuracy(
        predictions[q], answers[q], normalise_answers="open_flamingo") == evaluator.evalQA[q], q
  assert 0 < got < 100


def test_normalise_answer_equals_open_flamingo():
  evaluator = _open_flamingo_eval("vqa_metric").VQAEval(None, None)
  # The same tables: the official data open_flamingo ports.
  assert vqa_accuracy._CONTRACTIONS == evaluator.contractions
  assert vqa_accuracy._NUMBER_WORDS == evaluator.manualMap
  assert set(vqa_accuracy._ARTICLES) == set(evaluator.articles)
  assert list(vqa_accuracy._PUNCTUATION) == evaluator.punct
  texts = [p for p, _ in _VQA_CASES] + [a for _, answers in _VQA_CASES for a in answers] + [
      "", " ", ".", "...", "a.b", "1.5", "U.S.A.", "e.g. 3,4", "10, 000", "it's 5 o'clock",
      "oclock", "youll", "Im", "I'm", "ten dollars", "an apple", "The End.", "co-op", "co - op",
      "what?!", "yes.no", "1,2,3", "(1, 2)", "a\tb\nc", "ONE two THREE", "shouldnt've",
      # A mark is judged on the input: ";" going must not make "-" look spaced ("a b").
      "a-b ;-"]
  for text in texts:
    clean = text.replace("\n", " ").replace("\t", " ").strip()
    assert vqa_accuracy.normalise_answer(text) == evaluator.processDigitArticle(
        evaluator.processPunctuation(clean)), text


def test_vqa_accuracy_official_normalises_only_when_answers_disagree():
  # Hand-computed (GT-Vision-Lab vqaEval.py): with ten agreeing answers the trimmed raw
  # strings are compared; open_flamingo normalises and matches.
  differ = [("Yes", ["yes"] * 10, 0.0, 1.0), ("two", ["2"] * 10, 0.0, 1.0),
            ("dont", ["don't"] * 10, 0.0, 1.0), ("2", ["Two"] * 10, 0.0, 1.0),
            ("the cat", ["cat"] * 10, 0.0, 1.0)]
  same = [("  yes\n", ["yes"] * 10, 1.0), ("Two", ["Two"] * 10, 1.0),
          ("Two.", _ten(("2", 7), ("3", 3)), 1.0),
          # Left-out "2": one other "2" (1/3); left-out "3": two (2/3) -> (2/3 + 16/3) / 10.
          ("2", _ten(("2", 2), ("3", 8)), 0.6),
          ("YES", _ten(("Yes", 5), ("yes", 5)), 1.0)]
  for prediction, answers, official, open_flamingo in differ:
    assert vqa_accuracy.question_accuracy(prediction, answers) == official, prediction
    assert vqa_accuracy.question_accuracy(
        prediction, answers, normalise_answers="open_flamingo") == open_flamingo, prediction
  for prediction, answers, expected in same:
    for mode in ("official", "open_flamingo"):
      assert vqa_accuracy.question_accuracy(
          prediction, answers, normalise_answers=mode) == pytest.approx(expected), prediction
  predictions = {k: p for k, (p, *_) in enumerate(differ + same)}
  answers = {k: a for k, (_, a, *_) in enumerate(differ + same)}
  expected = 100 * (0 * 5 + 1 + 1 + 1 + 0.6 + 1) / 10
  assert vqa_accuracy.vqa_accuracy(predictions, answers) == pytest.approx(expected)
  assert vqa_accuracy.vqa_accuracy(
      predictions, answers, normalise_answers="open_flamingo") == pytest.approx(
          100 * (5 + 4.6) / 10)


def test_vqa_accuracy_errors():
  with pytest.raises(vqa_accuracy.VqaAccuracyError, match="no predictions"):
    vqa_accuracy.vqa_accuracy({}, {1: ["yes"]})
  with pytest.raises(vqa_accuracy.VqaAccuracyError, match="have no answers: 2"):
    vqa_accuracy.vqa_accuracy({1: "yes", 2: "no"}, {1: ["yes"] * 10})
  with pytest.raises(vqa_accuracy.VqaAccuracyError, match="question 1: empty"):
    vqa_accuracy.vqa_accuracy({1: "yes"}, {1: []})
  with pytest.raises(vqa_accuracy.VqaAccuracyError, match="not a string"):
    vqa_accuracy.vqa_accuracy({1: "yes"}, {1: "yes"})
  with pytest.raises(ValueError, match="normalise_answers"):
    vqa_accuracy.vqa_accuracy({1: "yes"}, {1: ["yes"]}, normalise_answers="always")


# ---- OK-VQA stemming ---------------------------------------------------------------------

def _stand_in_nltk(monkeypatch):
  """Stand-ins for NLTK's data-backed steps and `inflection` (the data is not on these
  machines); the stemming rules around them are compared against open_flamingo's."""
  import nltk
  inflection = types.ModuleType("inflection")
  inflection.singularize = lambda w: f"{w[:-1]}<sg>"
  monkeypatch.setitem(sys.modules, "inflection", inflection)

  def pos_tag(words):
    return [(w, ("NNPS" if w[:1].isupper() else "NNS") if w.endswith("s") else
             "VBG" if w.endswith("ing") else "NN") for w in words]

  monkeypatch.setattr(nltk.tokenize, "word_tokenize", lambda text: text.split())
  monkeypatch.setattr(nltk, "pos_tag", pos_tag)
  monkeypatch.setattr(nltk.stem.WordNetLemmatizer, "lemmatize",
                      lambda self, w, pos="n": f"{w[:-3]}<{pos}>")
  monkeypatch.setattr(vqa_accuracy, "require_stemming_data", lambda: None)


def test_ok_vqa_stemming_rules_equal_open_flamingo(monkeypatch):
  _stand_in_nltk(monkeypatch)
  theirs = _open_flamingo_eval("ok_vqa_utils")
  assert vqa_accuracy._OK_VQA_STEMS == theirs._MANUAL_MATCHES
  # Every manual word (the table wins over "-ing" and plural rules), then the rules.
  texts = [" ".join(theirs._MANUAL_MATCHES),
           "running dogs Texans thing things kings sing cat", "Riding riding", ""]
  for text in texts:
    assert vqa_accuracy.stem_ok_vqa(text) == theirs.stemmer.stem(text), text
  assert vqa_accuracy.stem_ok_vqa("clothes riding dogs") == "cloth ride dog<sg>"
  for generation in ["riding horses, dogs\nQuestion: what", "Answer: kites", "police cars"]:
    assert postprocess.ok_vqa_answer(generation) == theirs.postprocess_ok_vqa_generation(
        generation), generation
  assert vqa_accuracy.vqa_accuracy({1: "riding"}, {1: ["ride"] * 10}, stem=True) == 100.0


def test_ok_vqa_stemming_without_nltk_data_says_how_to_get_it(monkeypatch, tmp_path):
  import nltk
  monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
  monkeypatch.setattr(vqa_accuracy, "_stemming_ready", False)
  with pytest.raises(vqa_accuracy.StemmingDataError) as e:
    vqa_accuracy.vqa_accuracy({1: "riding"}, {1: ["ride"] * 10}, stem=True)
  message = str(e.value)
  for needed in ("punkt_tab", "averaged_perceptron_tagger_eng", "wordnet",
                 "python -m nltk.downloader", "NLTK_DATA"):
    assert needed in message
  with pytest.raises(vqa_accuracy.StemmingDataError):
    postprocess.ok_vqa_answer("riding")
  monkeypatch.setitem(sys.modules, "inflection", None)
  with pytest.raises(vqa_accuracy.StemmingDataError, match="pip install inflection"):
    vqa_accuracy.stem_ok_vqa("riding")


# ---- Answer cuts -------------------------------------------------------------------------

_GENERATIONS = [
    "", " A dog on a bench.\nOutput: A cat", "Output:", " no cut here", 'He said "hi"',
    ' "quoted" caption Output: "x"', " Outputs are many", "A man<|endofchunk|><image>Output:x",
    " yes\nQuestion: what is it?", "Answer: yes", " red, white, and blue", " Short answer: two",
    " 2, 3 Question", "QuestionAnswer", " yes,no", " the answer is 3 ,4", "Questions?",
    " Shortly after", " blue Answer: red Question: green", " one,  two", "output: lowercase",
    " a, b\nShort answer: c", "\n, leading comma", " Short",
]


def test_postprocess_equals_open_flamingo():
  coco_metric = _open_flamingo_eval("coco_metric")
  vqa_metric = _open_flamingo_eval("vqa_metric")
  for text in _GENERATIONS:
    # evaluate.py: postprocess_captioning_generation(out).replace('"', "")
    assert postprocess.caption(text) == coco_metric.postprocess_captioning_generation(
        text).replace('"', ""), text
    assert postprocess.vqa_answer(text) == vqa_metric.postprocess_vqa_generation(text), text
    assert postprocess.ok_vqa_answer(text, stem=False) == postprocess.vqa_answer(text)
  assert postprocess.caption(' A "big" dog.\nOutput: a cat') == " A big dog.\n"
  assert postprocess.vqa_answer(" red, white\nQuestion: x") == " red"


# ---- Classification ----------------------------------------------------------------------

def test_roc_auc_equals_sklearn_and_hand_computed():
  from sklearn.metrics import roc_auc_score
  # Pairs (positive, negative) ranked right: 3 of 4 -> 75.
  assert classification_metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 75.0
  assert classification_metrics.roc_auc([0, 1], [0.5, 0.5]) == 50.0  # a tie counts half
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 200).tolist()
  scores = rng.random(200).tolist()
  assert classification_metrics.roc_auc(labels, scores) == 100 * roc_auc_score(labels, scores)


def test_top1():
  predictions = {"a": "cat", "b": "dog", "c": "Dog", "d": "bird"}
  labels = {"a": "cat", "b": "dog", "c": "dog", "d": "fish"}
  assert classification_metrics.top1(predictions, labels) == 50.0


def test_classification_errors():
  error = classification_metrics.ClassificationMetricError
  with pytest.raises(error, match="needs both classes"):
    classification_metrics.roc_auc([1, 1, 1], [0.2, 0.5, 0.9])
  with pytest.raises(error, match="3 labels but 2 scores"):
    classification_metrics.roc_auc([0, 1, 1], [0.2, 0.5])
  with pytest.raises(error, match="0 or 1"):
    classification_metrics.roc_auc([0, 2], [0.2, 0.5])
  with pytest.raises(error, match="no labels"):
    classification_metrics.roc_auc([], [])
  with pytest.raises(error, match="no predictions"):
    classification_metrics.top1({}, {"a": "cat"})
  with pytest.raises(error, match=r"predicted id\(s\) have no label: 'x'.*"
                                  r"labelled id\(s\) have no prediction: 'b'"):
    classification_metrics.top1({"a": "cat", "x": "dog"}, {"a": "cat", "b": "dog"})
