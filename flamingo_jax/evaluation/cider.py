"""CIDEr-D ×100, the captioning metric of the Flamingo paper and open_flamingo, as COCO scores it.

The official COCO caption scorer (pycocoevalcap) computes it: Stanford's PTB tokenizer (a
Java program) lower-cases the captions and drops punctuation, then CIDEr-D (1- to 4-grams,
sigma 6, clipped counts) weighs n-grams by their IDF over the references of the images
scored. This is COCOEvalCap's computation with `params['image_id']` set to the predicted
images, as open_flamingo's compute_cider sets it: only the ids predicted are scored, and
only their references enter the IDF.
"""
import shutil
from typing import Hashable, Mapping, Sequence


class CiderError(ValueError):
  """Predictions and references that cannot be scored together; the message names the ids."""


class JavaNotFoundError(RuntimeError):
  """No `java` on PATH: the COCO scorer's PTB tokenizer is a Java program."""


def cider(predictions: Mapping[Hashable, str],
          references: Mapping[Hashable, Sequence[str]]) -> float:
  """CIDEr-D ×100 of one caption per id against that id's reference captions.

  `references` may hold more ids than `predictions`; the others are not used. Raises
  CiderError for no predictions, a prediction id without references or with an empty
  reference list, and JavaNotFoundError when `java` is missing.
  """
  ids = _checked_ids(predictions, references)
  _require_java()
  from pycocoevalcap.cider.cider import Cider
  # Two tokenizer runs, references then predictions, as COCOEvalCap makes them.
  refs = _tokenize({i: list(references[i]) for i in ids})
  preds = _tokenize({i: [predictions[i]] for i in ids})
  score, _ = Cider().compute_score(refs, preds)
  return 100.0 * float(score)


def _checked_ids(predictions: Mapping[Hashable, str],
                 references: Mapping[Hashable, Sequence[str]]) -> list:
  if not predictions:
    raise CiderError("no predictions to score")
  ids = list(predictions)
  missing = [i for i in ids if i not in references]
  if missing:
    raise CiderError(f"{len(missing)} predicted id(s) have no references: {_some(missing)}")
  empty = [i for i in ids if len(references[i]) == 0]
  if empty:
    raise CiderError(f"{len(empty)} id(s) have an empty reference list: {_some(empty)}")
  # A bare string would be scored as a list of one-character references.
  bare = [i for i in ids if isinstance(references[i], str)]
  if bare:
    raise CiderError(f"references must be lists of captions, not strings: {_some(bare)}")
  not_str = [i for i in ids if not isinstance(predictions[i], str)]
  if not_str:
    raise CiderError(f"predictions must be strings: {_some(not_str)}")
  return ids


def _require_java() -> None:
  if shutil.which("java") is None:
    raise JavaNotFoundError(
        "CIDEr needs `java` on PATH: the COCO scorer tokenizes captions with Stanford's "
        "PTB tokenizer, a Java program. Install a Java runtime: Debian/Ubuntu "
        "`apt-get install default-jre-headless`, conda `conda install -c conda-forge openjdk`.")


# pycocoevalcap writes one caption a line, turning '\n' into a space; the PTB lexer also ends
# lines at these, which would shift every later caption onto the wrong id.
_LINE_BREAKS = str.maketrans({c: " " for c in "\r\x0b\x0c\u2028\u2029"})


def _tokenize(captions: dict[Hashable, list[str]]) -> dict[Hashable, list[str]]:
  """pycocoevalcap's PTBTokenizer over {id: [caption, ...]}, checked to give every caption."""
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  tokens = PTBTokenizer().tokenize(
      {i: [{"caption": c.translate(_LINE_BREAKS)} for c in cs] for i, cs in captions.items()})
  # A java failure shows as missing lines, which the tokenizer silently drops.
  if any(len(tokens.get(i, ())) != len(cs) for i, cs in captions.items()):
    raise RuntimeError("the PTB tokenizer (java) returned fewer lines than captions given; "
                       "its error output is above")
  return tokens


def _some(ids: list, shown: int = 5) -> str:
  more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
  return ", ".join(repr(i) for i in ids[:shown]) + more
