"""The text tokenizer, extended with Flamingo's special tokens.

`load_tokenizer(path)` loads any Hugging Face tokenizer saved in a local directory and
adds, as OpenFlamingo does, `<|endofchunk|>` and `<image>` as special tokens, and `<PAD>`
when the tokenizer has no pad token. Each is added only when missing, so loading an
already-extended tokenizer (e.g. one saved next to an OpenFlamingo checkpoint) adds
nothing and keeps its ids. The ids the model config and the data pipelines need are
returned as a `SpecialTokens`.

Text is tokenised with `split_special_tokens=True` (`encode_text`): a web page that
contains the literal string "<image>" must not produce a media token.
"""
import dataclasses
import os

MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"
# Files that mark a directory as holding a Hugging Face tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                   "spiece.model", "vocab.txt")


class TokenizerNotFoundError(FileNotFoundError):
  """The path holds no loadable tokenizer; the message names the path."""


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  media_token_id: int  # <image>
  eoc_token_id: int  # <|endofchunk|>
  pad_token_id: int
  eos_token_id: int | None  # None when the tokenizer has no eos
  vocab_size: int  # len(tokenizer), added tokens included
  bos_token_id: int | None = None  # the BOS the tokenizer itself prepends to text
                                   # (LLaMA's <s>); None when it prepends none (GPT-2,
                                   # MPT, GPT-NeoX). Pipelines prepend it when set.


def extend_tokenizer(tokenizer) -> SpecialTokens:
  """Adds the missing special tokens to `tokenizer` in place; returns their ids."""
  vocab = tokenizer.get_vocab()
  missing = [t for t in (EOC_TOKEN, MEDIA_TOKEN) if t not in vocab]
  registered = set(tokenizer.all_special_tokens)
  unregistered = [t for t in (EOC_TOKEN, MEDIA_TOKEN) if t not in registered]
  if missing or unregistered:
    # Present but not special (e.g. saved as plain added tokens): registering them as
    # special keeps their ids and stops normalisers or pre-tokenisers from splitting them.
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in (EOC_TOKEN, MEDIA_TOKEN)
                                       if t in missing or t in unregistered]},
        replace_additional_special_tokens=False)
  if tokenizer.pad_token is None:
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})

  media = tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)
  eoc = tokenizer.convert_tokens_to_ids(EOC_TOKEN)
  bos = tokenizer.bos_token_id
  if bos is not None:
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if not (with_specials[:1] == [bos] and plain[:1] != [bos]):
      bos = None
  return SpecialTokens(media_token_id=int(media), eoc_token_id=int(eoc),
                       pad_token_id=int(tokenizer.pad_token_id),
                       eos_token_id=None if tokenizer.eos_token_id is None
                       else int(tokenizer.eos_token_id),
                       vocab_size=len(tokenizer),
                       bos_token_id=None if bos is None else int(bos))


def load_tokenizer(path) -> tuple:
  """(tokenizer, SpecialTokens) for the Hugging Face tokenizer saved in directory `path`.

  Local files only. Raises TokenizerNotFoundError, naming the path, when there is no
  such directory or it holds no tokenizer.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise TokenizerNotFoundError(f"tokenizer path {path!r} is not a directory")
  present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
  if not present:
    raise TokenizerNotFoundError(
        f"no tokenizer in {path!r}: none of {', '.join(TOKENIZER_FILES)} found")
  from transformers import AutoTokenizer  # heavy import, only when needed
  try:
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
  except Exception as e:  # transformers raises many types for broken directories
    raise TokenizerNotFoundError(
        f"no loadable tokenizer in {path!r} (expected tokenizer.json or a "
        f"tokenizer_config.json with vocabulary files): {type(e).__name__}: {e}") from e
  if tokenizer is None or isinstance(tokenizer, bool):
    raise TokenizerNotFoundError(f"no loadable tokenizer in {path!r}")
  return tokenizer, extend_tokenizer(tokenizer)


def encode_text(tokenizer, specials: SpecialTokens, texts: list[str]) -> list[list[int]]:
  """Token ids of each text, no special tokens added, literal "<image>" etc. split as text.

  As a second guard, ids of the media / end-of-chunk / pad tokens are removed.
  """
  if not texts:
    return []
  ids = tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
  banned = {specials.media_token_id, specials.eoc_token_id, specials.pad_token_id}
  return [[int(i) for i in row if i not in banned] for row in ids]
