"""Few-shot prompts, in OpenFlamingo's wording or the Flamingo paper's.

  openflamingo  caption   <image>Output:{caption}<|endofchunk|>
                vqa       <image>Question:{question} Short answer:{answer}<|endofchunk|>
                imagenet  <image>Output:{class}<|endofchunk|>
                memes     <image>is an image with: '{text}' written on it. Is it hateful? Answer:{label}<|endofchunk|>
                demonstrations joined by "\n" for generation tasks, by "" for classification
                (as open_flamingo's evaluate.py joins them)
  paper         the same with the paper's `Output: {x}` / `Question: {q} Answer: {a}`
                (a space before the answer), demonstrations joined by "".

The query is the same text with no answer and no `<|endofchunk|>`, so the model writes
the answer; a paper-style answer therefore starts with a space, and so do its
classification candidates (`candidate_text`). Zero shots: two text-only demonstrations
(their `<image>` removed), the paper's and OpenFlamingo's protocol.
"""
from flamingo_jax.evaluation.tasks.base import Example, Task

STYLES = ("openflamingo", "paper")
MEDIA, EOC = "<image>", "<|endofchunk|>"
ZERO_SHOT_DEMONSTRATIONS = 2


def _answer_space(style: str) -> str:
  if style not in STYLES:
    raise ValueError(f"prompt style {style!r}: one of {', '.join(STYLES)}")
  return " " if style == "paper" else ""


def example_text(task: Task, example: Example, style: str, answer: str | None) -> str:
  """One example's chunk; `answer=None` leaves it open for the model (the query)."""
  s = _answer_space(style)
  tail = "" if answer is None else f"{s}{answer}{EOC}"
  if task.family == "captioning":
    return f"{MEDIA}Output:{tail}"
  if task.family == "vqa":
    label = "Answer:" if style == "paper" else "Short answer:"
    return f"{MEDIA}Question:{s}{example.question} {label}{tail}"
  if task.family == "classification":
    if example.text is not None:  # HatefulMemes: the meme's OCR text
      return f"{MEDIA}is an image with: '{example.text}' written on it. Is it hateful? Answer:{tail}"
    return f"{MEDIA}Output:{tail}"
  raise ValueError(f"task {task.name}: no prompt for family {task.family!r}")


def demonstration_answer(task: Task, example: Example) -> str:
  # open_flamingo strips captions and uses the first human answer of a VQA example.
  return example.targets[0].strip() if task.family == "captioning" else example.targets[0]


def build(task: Task, demonstrations: list[Example], query: Example, style: str,
          zero_shot: bool) -> str:
  """The whole prompt: demonstrations (their `<image>` removed when `zero_shot`), then
  the query."""
  separator = "" if style == "paper" or task.family == "classification" else "\n"
  context = "".join(example_text(task, d, style, demonstration_answer(task, d)) + separator
                    for d in demonstrations)
  if zero_shot:
    context = context.replace(MEDIA, "")
  return context + example_text(task, query, style, None)


def candidate_text(class_name: str, style: str) -> str:
  """A class name as the continuation of a classification query."""
  return _answer_space(style) + class_name
