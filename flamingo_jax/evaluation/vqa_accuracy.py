"""VQA accuracy ×100 as the official VQA evaluation computes it (GT-Vision-Lab's vqaEval.py).

A prediction's accuracy against a question's human answers (10 in VQAv2, OK-VQA, VizWiz)
is min(1, matches / 3) averaged over the leave-one-out subsets: for each answer, the
number of the OTHER answers equal to the prediction. Before matching, answers are
normalised: punctuation removed or turned into spaces, lower case, number words to
digits ("two" → "2"), articles dropped, apostrophe-less contractions restored
("dont" → "don't").

When that normalisation applies is where the two scorers in use differ, so it is an
option (`normalise_answers`):
  "official"       vqaEval.py (GT-Vision-Lab master, since its 2021 "processing answers"
                   fix): the prediction and the human answers are normalised only when the
                   answers disagree (`len(set(answers)) > 1`); when they all agree the raw
                   strings are compared (after trimming whitespace), so "Yes" scores 0
                   against ten "yes".
  "open_flamingo"  open_flamingo's port (eval/vqa_metric.py): both are always normalised.
The tables and regular expressions are the official data; both scorers share them.

OK-VQA: open_flamingo stems the predictions the way OK-VQA v1.1 stemmed its answers
(`stem=True`, `stem_ok_vqa`): a manual table, then NLTK's WordNet lemmatizer for "-ing"
words and `inflection.singularize` for plural nouns (NLTK's tagger decides which). That
needs NLTK's data packages, which `nltk.download` fetches from the internet;
StemmingDataError says how to get them where they are missing.
"""
import re
from typing import Hashable, Literal, Mapping, Sequence

NormaliseAnswers = Literal["official", "open_flamingo"]


class VqaAccuracyError(ValueError):
  """Predictions and answers that cannot be scored together; the message names the ids."""


class StemmingDataError(RuntimeError):
  """OK-VQA stemming needs NLTK data packages or `inflection`, missing here."""


def vqa_accuracy(predictions: Mapping[Hashable, str],
                 answers: Mapping[Hashable, Sequence[str]], *,
                 normalise_answers: NormaliseAnswers = "official",
                 stem: bool = False) -> float:
  """Mean VQA accuracy ×100 over the predicted question ids.

  `answers` maps each question id to its human answers and may hold more ids than
  `predictions`. `stem` applies open_flamingo's OK-VQA stemming to the predictions first
  (leave it off for predictions already stemmed, e.g. by postprocess.ok_vqa_answer).
  Raises VqaAccuracyError for no predictions or a predicted id without answers.
  """
  _check_mode(normalise_answers)
  if not predictions:
    raise VqaAccuracyError("no predictions to score")
  missing = [q for q in predictions if q not in answers]
  if missing:
    raise VqaAccuracyError(f"{len(missing)} predicted question id(s) have no answers: "
                           f"{_some(missing)}")
  if stem:
    require_stemming_data()
  scores = []
  for question_id, prediction in predictions.items():
    if stem:
      prediction = stem_ok_vqa(prediction)
    try:
      scores.append(question_accuracy(prediction, answers[question_id],
                                      normalise_answers=normalise_answers))
    except VqaAccuracyError as e:
      raise VqaAccuracyError(f"question {question_id!r}: {e}") from None
  # Summed in prediction order, as the official scorer sums: the same float.
  return 100.0 * sum(scores) / len(scores)


def question_accuracy(prediction: str, answers: Sequence[str], *,
                      normalise_answers: NormaliseAnswers = "official") -> float:
  """One question's accuracy in [0, 1]: min(1, matches / 3) over leave-one-out subsets."""
  _check_mode(normalise_answers)
  if isinstance(answers, str):
    raise VqaAccuracyError("answers must be a list of human answers, not a string")
  if len(answers) == 0:
    raise VqaAccuracyError("empty list of human answers")
  prediction = _clean_whitespace(prediction)
  answers = [_clean_whitespace(a) for a in answers]
  if normalise_answers == "open_flamingo" or len(set(answers)) > 1:
    prediction = normalise_answer(prediction)
    answers = [normalise_answer(a) for a in answers]
  # The scorers drop one answer record at a time (records differ by answer_id), so
  # duplicate strings count as separate answers.
  accuracies = []
  for i in range(len(answers)):
    matches = sum(a == prediction for a in answers[:i] + answers[i + 1:])
    accuracies.append(min(1, matches / 3))
  return sum(accuracies) / len(accuracies)


def normalise_answer(text: str) -> str:
  """The official normalisation of an answer: whitespace, punctuation, case, number words,
  articles and contractions. Exact-match metrics can reuse it."""
  return _digits_articles(_punctuation(_clean_whitespace(text)))


def _check_mode(normalise_answers: str) -> None:
  if normalise_answers not in ("official", "open_flamingo"):
    raise ValueError(f"normalise_answers={normalise_answers!r}: expected 'official' "
                     "(GT-Vision-Lab vqaEval.py) or 'open_flamingo'")


def _clean_whitespace(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str) -> str:
  # Each mark is decided on the INPUT text but replaced in the running output, as the
  # official does: glued to a space (or any "1,000"-style number present) it is deleted,
  # otherwise it becomes a space ("black/white" → "black white").
  number_with_comma = _COMMA_IN_NUMBER.search(text) is not None
  out = text
  for mark in _PUNCTUATION:
    if number_with_comma or mark + " " in text or " " + mark in text:
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  # The official passes re.UNICODE (32) where sub() takes its count: at most 32 periods go.
  return _PERIOD.sub("", out, count=32)


def _digits_articles(text: str) -> str:
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _some(ids: list, shown: int = 5) -> str:
  more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
  return ", ".join(repr(i) for i in ids[:shown]) + more


# ---- OK-VQA stemming ---------------------------------------------------------------------

def stem_ok_vqa(text: str) -> str:
  """open_flamingo's OK-VQA stemming of one answer: NLTK word tokens, each replaced by the
  manual table's form, or lemmatized as a verb if it ends in "ing", or singularized if
  NLTK tags it a plural noun; joined by spaces. Raises StemmingDataError without the data."""
  require_stemming_data()
  import inflection
  import nltk
  lemmatizer = nltk.stem.WordNetLemmatizer()
  words = []
  for word, tag in nltk.pos_tag(nltk.tokenize.word_tokenize(text)):
    if word in _OK_VQA_STEMS:
      word = _OK_VQA_STEMS[word]
    elif word.endswith("ing"):
      word = lemmatizer.lemmatize(word, "v")
    elif tag.startswith(("NNS", "NNPS")):
      word = inflection.singularize(word)
    words.append(word)
  return " ".join(words)


_stemming_ready = False


def require_stemming_data() -> None:
  """Raises StemmingDataError unless NLTK's tokenizer, tagger and WordNet data and the
  `inflection` package are all here (checked by using each once)."""
  global _stemming_ready
  if _stemming_ready:
    return
  missing = []
  try:
    import inflection  # noqa: F401
  except ImportError:
    missing.append("the Python package `inflection` (pip install inflection)")
  try:
    import nltk
  except ImportError:
    raise StemmingDataError("OK-VQA stemming needs NLTK: pip install nltk") from None
  probes = (("word_tokenize", lambda: nltk.tokenize.word_tokenize("two dogs riding")),
            ("pos_tag", lambda: nltk.pos_tag(["two", "dogs", "riding"])),
            ("WordNet", lambda: nltk.stem.WordNetLemmatizer().lemmatize("riding", "v")))
  packages = []
  for what, probe in probes:
    try:
      probe()
    except LookupError as e:
      # NLTK names the package to download; older versions colour it with ANSI codes.
      found = re.search(r"Resource '?(\w+)", re.sub(r"\x1b\[[0-9;]*m", "", str(e)))
      packages.append(found.group(1) if found else what)
  if packages:
    missing.append(f"NLTK data {', '.join(packages)} (searched {nltk.data.path})")
  if missing:
    names = " ".join(packages) or "punkt_tab averaged_perceptron_tagger_eng wordnet"
    raise StemmingDataError(
        "OK-VQA stemming (open_flamingo's) is missing " + "; ".join(missing) + ". NLTK "
        f"downloads its data from the internet: on a machine with internet run `python -m "
        f"nltk.downloader {names}`, copy the nltk_data folder it fills here and point the "
        "NLTK_DATA environment variable at it (or put it in ~/nltk_data). Without stemming "
        "(stem=False) OK-VQA scores differ from open_flamingo's.")
  _stemming_ready = True


# ---- The official tables -----------------------------------------------------------------

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                ">", "<", "@", "`", ",", "?", "!")
# The official "(?!<=\d)(\.)(?!\d)" opens with a mistyped look-behind that, placed before a
# period, always holds: a period goes unless a digit follows it ("2.5" stays).
_PERIOD = re.compile(r"\.(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
_ARTICLES = frozenset(("a", "an", "the"))
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# Capitalised keys ("Im") never match the lower-cased words; kept as the official has them.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
# OK-VQA v1.1's manual stems (open_flamingo's table): words its automatic rules miss or get
# wrong, some mapped to themselves so that no rule touches them.
_OK_VQA_STEMS = {
    "police": "police", "las": "las", "vegas": "vegas", "yes": "yes", "jeans": "jean",
    "hell's": "hell", "domino's": "domino", "morning": "morn", "clothes": "cloth",
    "are": "are", "riding": "ride", "leaves": "leaf", "dangerous": "danger",
    "clothing": "cloth", "texting": "text", "kiting": "kite", "firefighters": "firefight",
    "ties": "tie", "married": "married", "teething": "teeth", "gloves": "glove",
    "tennis": "tennis", "dining": "dine", "directions": "direct", "waves": "wave",
    "christmas": "christmas", "drives": "drive", "pudding": "pud", "coding": "code",
    "plating": "plate", "quantas": "quanta", "hornes": "horn", "graves": "grave",
    "mating": "mate", "paned": "pane", "alertness": "alert", "sunbathing": "sunbath",
    "tenning": "ten", "wetness": "wet", "urinating": "urine", "sickness": "sick",
    "braves": "brave", "firefighting": "firefight", "lenses": "lens",
    "reflections": "reflect", "backpackers": "backpack", "eatting": "eat",
    "designers": "design", "curiousity": "curious", "playfulness": "play",
    "blindness": "blind", "hawke": "hawk", "tomatoe": "tomato", "rodeoing": "rodeo",
    "brightness": "bright", "circuses": "circus", "skateboarders": "skateboard",
    "staring": "stare", "electronics": "electron", "electicity": "elect",
    "mountainous": "mountain", "socializing": "social", "hamburgers": "hamburg",
    "caves": "cave", "transitions": "transit", "wading": "wade", "creame": "cream",
    "toileting": "toilet", "sautee": "saute", "buildings": "build", "belongings": "belong",
    "stockings": "stock", "walle": "wall", "cumulis": "cumuli", "travelers": "travel",
    "conducter": "conduct", "browsing": "brows", "pooping": "poop", "haircutting": "haircut",
    "toppings": "top", "hearding": "heard", "sunblocker": "sunblock", "bases": "base",
    "markings": "mark", "mopeds": "mope", "kindergartener": "kindergarten", "pies": "pie",
    "scrapbooking": "scrapbook", "couponing": "coupon", "meetings": "meet",
    "elevators": "elev", "lowes": "low", "men's": "men", "childrens": "children",
    "shelves": "shelve", "paintings": "paint", "raines": "rain", "paring": "pare",
    "expressions": "express", "routes": "rout", "pease": "peas", "vastness": "vast",
    "awning": "awn", "boy's": "boy", "drunkenness": "drunken", "teasing": "teas",
    "conferences": "confer", "ripeness": "ripe", "suspenders": "suspend", "earnings": "earn",
    "reporters": "report", "kid's": "kid", "containers": "contain", "corgie": "corgi",
    "porche": "porch", "microwaves": "microwave", "batter's": "batter", "sadness": "sad",
    "apartments": "apart", "oxygenize": "oxygen", "striping": "stripe", "purring": "pure",
    "professionals": "profession", "piping": "pipe", "farmer's": "farmer",
    "potatoe": "potato", "emirates": "emir", "womens": "women", "veteran's": "veteran",
    "wilderness": "wilder", "propellers": "propel", "alpes": "alp",
    "charioteering": "chariot", "swining": "swine", "illness": "ill", "crepte": "crept",
    "adhesives": "adhesive", "regent's": "regent", "decorations": "decor",
    "rabbies": "rabbi", "overseas": "oversea", "travellers": "travel", "casings": "case",
    "smugness": "smug", "doves": "dove", "nationals": "nation", "mustange": "mustang",
    "ringe": "ring", "gondoliere": "gondolier", "vacationing": "vacate",
    "reminders": "remind", "baldness": "bald", "settings": "set", "glaced": "glace",
    "coniferous": "conifer", "revelations": "revel", "personals": "person",
    "daughter's": "daughter", "badness": "bad", "projections": "project",
    "polarizing": "polar", "vandalizers": "vandal", "minerals": "miner",
    "protesters": "protest", "controllers": "control", "weddings": "wed",
    "sometimes": "sometime", "earing": "ear",
}
