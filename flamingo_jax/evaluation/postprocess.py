"""Generated text → the answer that is scored, cut as open_flamingo's evaluate.py cuts it.

A few-shot model keeps writing after its answer: the next demonstration's "Output:" for
captioning (open_flamingo's prompt; the paper's style uses "Output:" too), or "Question:"
/ "Answer:" / "Short answer:" for VQA. Each function cuts at the first such word, exactly
as open_flamingo does (no trimming: the metrics trim), so scores are comparable.
"""
import re

from flamingo_jax.evaluation.vqa_accuracy import stem_ok_vqa

_VQA_STOP = re.compile("Question|Answer|Short")


def caption(text: str) -> str:
  """The text before the first "Output", without double quotes (evaluate.py drops them)."""
  return text.split("Output", 1)[0].replace('"', "")


def vqa_answer(text: str) -> str:
  """The text before the first "Question", "Answer" or "Short", then before the first ", "."""
  answer = _VQA_STOP.split(text, maxsplit=1)[0]
  return answer.split(", ", 1)[0]


def ok_vqa_answer(text: str, *, stem: bool = True) -> str:
  """vqa_answer, then OK-VQA's stemming (vqa_accuracy.stem_ok_vqa) as open_flamingo applies
  it; that needs NLTK's data (StemmingDataError says how to get it) unless `stem=False`."""
  answer = vqa_answer(text)
  return stem_ok_vqa(answer) if stem else answer
