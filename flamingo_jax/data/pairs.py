"""Image–text and video–text pairs (ALIGN, LTIP, LAION; VTP) → model examples. Pure.

    [BOS] <image> {text} <|endofchunk|> [EOS]

(the paper's `<BOS><image>{text}<EOC><EOS>`; OpenFlamingo's
`<image>{caption}<|endofchunk|>{eos}`). BOS only when the tokenizer itself prepends one
(`SpecialTokens.bos_token_id`), EOS when it has one (`add_eos`). The text is stripped of
surrounding whitespace and, in training (an `rng` given), a space is prepended with
probability `prepend_space_p` (paper: 0.5), so the model sees captions tokenised both
as a text start and as a continuation; with `rng=None` (evaluation) never.

Longer sequences are truncated to `seq_len` from the end (as OpenFlamingo's
`max_length` truncation: a cut caption loses its EOC/EOS rather than teaching the model
to end early); shorter ones are right-padded. Every token from `<image>` on looks at the
one medium (media_index 0; BOS: -1). Loss on predicting the text, EOC and EOS (rules
'paper'); rules 'openflamingo' also masks the EOS, as their labels do. Never on
predicting `<image>` or padding.

Video: `pixels` [F, H, W, 3] are the F frames the storage layer sampled (paper: 8 at
1 FPS); images comes out [1, F, H, W, 3]. Skips (empty text, invalid UTF-8) raise
`interleaved.SkipExample`.
"""
import dataclasses

import numpy as np

from flamingo_jax.data.interleaved import RULES, SkipExample, as_text, finish
from flamingo_jax.data.tokenizer import encode_text


@dataclasses.dataclass(frozen=True)
class PairConfig:
  seq_len: int = 32  # paper: 32 or 64
  prepend_space_p: float = 0.5
  rules: str = "paper"
  add_eos: bool = True

  def __post_init__(self):
    if self.rules not in RULES:
      raise ValueError(f"rules={self.rules!r}; one of {RULES}")
    if self.seq_len < 3:
      raise ValueError(f"seq_len={self.seq_len} must be >= 3")
    if not 0.0 <= self.prepend_space_p <= 1.0:
      raise ValueError(f"prepend_space_p={self.prepend_space_p} must lie in [0, 1]")


def pair_example(pixels: np.ndarray, text, tokenizer_and_specials, config: PairConfig,
                 rng: np.random.Generator | None) -> dict:
  """One example: pixels [H, W, 3] (image) or [F, H, W, 3] (video frames), text str/bytes.

  Raises SkipExample('empty_text' | 'invalid_utf8').
  """
  tokenizer, specials = tokenizer_and_specials
  text = as_text(text).strip()
  if not text:
    raise SkipExample("empty_text")
  pixels = np.asarray(pixels, np.float32)
  if pixels.ndim == 3:
    pixels = pixels[None]
  if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[0] < 1:
    raise ValueError(f"pixels: expected [H, W, 3] or [F, H, W, 3], got shape {pixels.shape}")

  if rng is not None and config.prepend_space_p > 0 and rng.random() < config.prepend_space_p:
    text = " " + text
  (text_ids,) = encode_text(tokenizer, specials, [text])
  if not text_ids:
    raise SkipExample("empty_text", "no tokens")
  ids = [] if specials.bos_token_id is None else [specials.bos_token_id]
  ids += [specials.media_token_id] + text_ids + [specials.eoc_token_id]
  has_eos = config.add_eos and specials.eos_token_id is not None
  if has_eos:
    ids.append(specials.eos_token_id)
  eos_pos = len(ids) - 1 if has_eos else None
  ids = np.asarray(ids[:config.seq_len], np.int64)
  media_index = np.where(np.arange(len(ids)) >= ids.tolist().index(specials.media_token_id),
                         0, -1).astype(np.int32)
  trainable = np.ones(len(ids), bool)
  if config.rules == "openflamingo" and eos_pos is not None and eos_pos < len(ids):
    trainable[eos_pos - 1] = False  # no label on the EOS after the EOC
  return finish(ids, media_index, trainable, [pixels], config.seq_len, 1, specials)
