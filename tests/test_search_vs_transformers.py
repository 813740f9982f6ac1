"""`flamingo_jax.decoding` search against transformers' `generate`, token for token.

Processors are checked against HF's own classes on random inputs. The full search runs on
a tiny deterministic LM that both sides can run: the next-token logits are a fixed random
table indexed by the last two tokens (eos made likely, so rows finish early). HF runs it
as a `PreTrainedModel` with `use_cache=False`; JAX as `step_fn` with the last two tokens
as the decode state. Sampling can't match torch's RNG, so it is checked by its support and
its frequencies.
"""
import functools

import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process as hf_lp
from transformers.modeling_outputs import CausalLMOutput

import jax
import jax.numpy as jnp

from flamingo_jax.decoding import logits_processors as lp
from flamingo_jax.decoding.search import search

V = 24
PAD = 1
EOS = (3, 7)
PROMPTS = np.array([[PAD, PAD, PAD, 5, 9],  # left-padded, as HF sees it
                    [PAD, 12, 4, 17, 8],
                    [20, 13, 6, 21, 10]], np.int32)


def _table(seed: int = 0, eos_bias: float = 1.5, eos=EOS) -> np.ndarray:
  """[V, V, V] logits of the token after (prev, last)."""
  table = np.random.default_rng(seed).normal(scale=2.0, size=(V, V, V)).astype(np.float32)
  table[:, :, list(eos)] += eos_bias
  return table


# ----------------------------------------------------------------------------------------
# The two sides of the tiny model


class _TableConfig(transformers.PretrainedConfig):
  model_type = "flamingo_jax_test_table_lm"

  def __init__(self, vocab_size: int = V, **kw):
    self.vocab_size = vocab_size
    super().__init__(**kw)


class _TableLM(transformers.PreTrainedModel, transformers.GenerationMixin):
  """logits[:, i] = table[ids[:, i - 1], ids[:, i]]; counts its forwards."""
  config_class = _TableConfig
  base_model_prefix = "table_lm"

  def __init__(self, config, table):
    super().__init__(config)
    self.table = torch.nn.Parameter(torch.as_tensor(table), requires_grad=False)
    self.forwards = 0

  def forward(self, input_ids, attention_mask=None, **kw):
    self.forwards += 1
    prev = torch.cat([torch.zeros_like(input_ids[:, :1]), input_ids[:, :-1]], dim=1)
    return CausalLMOutput(logits=self.table[prev, input_ids])


def _hf_generate(table, prompts, max_new_tokens, **kw):
  """HF's new tokens padded to max_new_tokens with PAD, and its forward count."""
  model = _TableLM(_TableConfig(), table).eval()
  ids = torch.as_tensor(prompts, dtype=torch.long)
  mask = torch.as_tensor(np.cumsum(prompts != PAD, axis=1) > 0, dtype=torch.long)  # left pad
  with torch.no_grad():
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         use_cache=False, pad_token_id=PAD, **kw)
  new = out[:, prompts.shape[1]:].numpy()
  padded = np.full((len(prompts), max_new_tokens), PAD, np.int64)
  padded[:, :new.shape[1]] = new
  return padded, model.forwards


_STEPS = []  # one entry per step_fn call, appended from inside the compiled loop


@functools.lru_cache(maxsize=None)
def _compiled_search(settings: tuple):
  """`search` under jit for one set of (static) settings; the table is an argument, so
  tables, prompts and seeds of one shape share a compile. LLVM's optimization level 0
  halves the CPU compile time of these tiny programs (XLA's own passes still run)."""

  def run(table, prompts, rng):
    def step_fn(state, tokens):
      jax.debug.callback(lambda: _STEPS.append(1))
      state = jnp.stack([state[:, 1], tokens], axis=1)
      return table[state[:, 0], state[:, 1]], state

    def reorder_fn(state, rows):
      return state[rows]

    state = prompts[:, -2:]
    first_logits = table[state[:, 0], state[:, 1]]
    return search(step_fn, reorder_fn, state, first_logits, prompts, pad_token_id=PAD,
                  rng=rng, **dict(settings))

  return jax.jit(run, compiler_options={"xla_backend_optimization_level": 0})


def _jax_search(table, prompts, *, count_steps=False, rng=None, **kw):
  """New tokens [B, max_new_tokens] (and, with count_steps, the number of step_fn calls)."""
  run = _compiled_search(tuple(sorted(kw.items())))
  start = len(_STEPS)
  rng = jax.random.key(0) if rng is None else rng
  out = jax.block_until_ready(run(jnp.asarray(table), jnp.asarray(prompts), rng))
  jax.effects_barrier()
  out = np.asarray(out)
  return (out, len(_STEPS) - start) if count_steps else out


# ----------------------------------------------------------------------------------------
# Processors vs HF's classes


def _scores(shape, seed=0):
  return np.random.default_rng(seed).normal(scale=3.0, size=shape).astype(np.float32)


def _hf(proc, ids, scores):
  ids = np.zeros((len(scores), 1)) if ids is None else ids  # warpers ignore the ids
  return proc(torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(scores)).numpy()


def _left_padded_ids(n, t, vocab, seed=0):
  ids = np.random.default_rng(seed).integers(0, vocab, size=(n, t)).astype(np.int32)
  ids[0, :3] = PAD
  ids[1, :1] = PAD
  return ids


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf(penalty):
  ids = _left_padded_ids(4, 9, 40)
  scores = _scores((4, 40))
  want = _hf(hf_lp.RepetitionPenaltyLogitsProcessor(penalty), ids, scores)
  got = lp.repetition_penalty(jnp.asarray(scores), lp.seen_map(jnp.asarray(ids), 40), penalty)
  np.testing.assert_array_equal(np.asarray(got), want)
  # The seen map kept step by step equals the one built from the whole row.
  seen = lp.seen_map(jnp.asarray(ids[:, :4]), 40)
  for i in range(4, 9):
    seen = lp.mark_seen(seen, jnp.asarray(ids[:, i]))
  np.testing.assert_array_equal(np.asarray(seen), np.asarray(lp.seen_map(jnp.asarray(ids), 40)))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_hf(n):
  vocab, max_len = 12, 20
  rng = np.random.default_rng(n)
  history = rng.integers(0, 5, size=(5, max_len)).astype(np.int32)  # few ids: many repeats
  history[0, :4] = PAD
  scores = _scores((5, vocab), seed=n)
  proc = hf_lp.NoRepeatNGramLogitsProcessor(n)
  for length in [1, n - 1, n, 7, 13]:
    if length < 1:
      continue
    want = _hf(proc, history[:, :length], scores)
    # Positions >= length hold garbage: they must be ignored.
    got = lp.no_repeat_ngram(jnp.asarray(scores), jnp.asarray(history), jnp.int32(length), n)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"length {length}")
  assert np.isinf(want).any()  # the case bans something


def test_min_new_tokens_matches_hf():
  eos, prompt_len, min_new = [2, 5, 9], 6, 3
  scores = _scores((3, 16))
  proc = hf_lp.MinNewTokensLengthLogitsProcessor(prompt_len, min_new, eos)
  ids = _left_padded_ids(3, prompt_len + 5, 16)
  for new in range(5):
    want = _hf(proc, ids[:, :prompt_len + new], scores)
    got = lp.min_new_tokens(jnp.asarray(scores), jnp.int32(new), min_new, eos)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert np.isinf(want[:, eos]).all() == (new < min_new)


@pytest.mark.parametrize("temperature", [0.7, 1.9])
def test_temperature_matches_hf(temperature):
  scores = _scores((3, 30))
  want = _hf(hf_lp.TemperatureLogitsWarper(temperature), None, scores)
  got = lp.temperature(jnp.asarray(scores), temperature)
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("k,keep", [(1, 1), (5, 1), (2, 4), (40, 1)])
def test_top_k_matches_hf(k, keep):
  scores = _scores((4, 30))
  scores[0, [3, 8, 11]] = scores[0].max() + 1.0  # a tie at the boundary: all of it stays
  want = _hf(hf_lp.TopKLogitsWarper(k, min_tokens_to_keep=keep), None, scores)
  got = lp.top_k(jnp.asarray(scores), k, keep)
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("p,keep", [(0.3, 1), (0.9, 1), (0.05, 3), (0.999, 2)])
def test_top_p_matches_hf(p, keep):
  scores = _scores((6, 30), seed=3)
  scores[1, :10] = -np.inf  # as after top-k
  want = _hf(hf_lp.TopPLogitsWarper(p, min_tokens_to_keep=keep), None, scores)
  got = lp.top_p(jnp.asarray(scores), p, keep)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert (np.isinf(want).sum(-1) < 30).all()


@pytest.mark.parametrize("do_sample", [False, True])
def test_process_applies_hf_order(do_sample):
  """All processors chained as `_get_logits_processor` builds them."""
  eos, prompt_len, vocab = [2, 5], 4, 20
  ids = _left_padded_ids(4, prompt_len + 3, 10, seed=1)
  scores = _scores((4, vocab), seed=2)
  procs = [hf_lp.RepetitionPenaltyLogitsProcessor(1.4), hf_lp.NoRepeatNGramLogitsProcessor(2),
           hf_lp.MinNewTokensLengthLogitsProcessor(prompt_len, 5, eos)]
  if do_sample:
    procs += [hf_lp.TemperatureLogitsWarper(0.8), hf_lp.TopKLogitsWarper(8),
              hf_lp.TopPLogitsWarper(0.8)]
  want = _hf(hf_lp.LogitsProcessorList(procs), ids, scores)
  settings = lp.Settings(repetition_penalty=1.4, no_repeat_ngram_size=2, min_new_tokens=5,
                         eos_token_ids=tuple(eos), do_sample=do_sample, temperature=0.8,
                         top_k=8, top_p=0.8)
  history = np.concatenate([ids, np.zeros((4, 5), np.int32)], axis=1)
  got = lp.process(jnp.asarray(scores), settings, num_new=jnp.int32(3),
                   seen=lp.seen_map(jnp.asarray(ids), vocab), history=jnp.asarray(history),
                   length=jnp.int32(ids.shape[1]))
  np.testing.assert_array_equal(np.asarray(got), want)
  # Neutral values switch everything off, as in HF.
  off = lp.process(jnp.asarray(scores), lp.Settings(eos_token_ids=(2,), do_sample=True),
                   num_new=jnp.int32(0))
  np.testing.assert_array_equal(np.asarray(off), scores)


# ----------------------------------------------------------------------------------------
# Full search vs generate

CASES = {
    "greedy": dict(max_new_tokens=12),
    "greedy_one_eos": dict(max_new_tokens=12, eos_token_id=7),
    # Unlikely eos for the processor cases: long rows, so generated tokens repeat.
    "greedy_processors": dict(max_new_tokens=12, repetition_penalty=1.3, no_repeat_ngram_size=2,
                              min_new_tokens=4, table=dict(eos_bias=0.0)),
    "greedy_one_token": dict(max_new_tokens=1),
    "greedy_no_eos": dict(max_new_tokens=6, eos_token_id=None),
    "beam3_lp1": dict(max_new_tokens=12, num_beams=3, length_penalty=1.0),
    "beam3_lp0": dict(max_new_tokens=12, num_beams=3, length_penalty=0.0),
    "beam2_processors": dict(max_new_tokens=12, num_beams=2, repetition_penalty=1.5,
                             no_repeat_ngram_size=2, min_new_tokens=3, table=dict(eos_bias=0.0)),
    # Likely eos and a length penalty favouring long hypotheses: a live beam that only
    # HF's (1 + #eos) * K candidates keep (not 2 * K) wins in the end.
    "beam4_three_eos": dict(max_new_tokens=12, num_beams=4, eos_token_id=(3, 7, 11),
                            length_penalty=2.0, table=dict(seed=0, eos_bias=2.0)),
    "beam3_one_token": dict(max_new_tokens=1, num_beams=3),
    "beam2_no_eos": dict(max_new_tokens=5, num_beams=2, eos_token_id=None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_search_matches_generate(name):
  kw = dict(CASES[name])
  kw.setdefault("eos_token_id", EOS)
  eos = kw["eos_token_id"]
  eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
  table_kw = kw.pop("table", {})
  table = _table(eos=eos or EOS, **table_kw)
  hf_kw = dict(kw, eos_token_id=list(eos) if eos else None, do_sample=False)
  if "repetition_penalty" in hf_kw:
    hf_kw["repetition_penalty"] = float(hf_kw["repetition_penalty"])
  want, forwards = _hf_generate(table, PROMPTS, **hf_kw)
  got, steps = _jax_search(table, PROMPTS, count_steps=True, **kw)
  np.testing.assert_array_equal(got, want)
  # Same early stop, and no forward after the last token (HF's first forward is the prefill).
  assert steps == forwards - 1
  m = kw["max_new_tokens"]
  if eos and m > 1 and not table_kw:  # the case has rows that stop before max_new_tokens
    assert (got[:, -1] == PAD).any(), got


@pytest.mark.parametrize("case", ["greedy", "beam3_lp1"])
def test_search_stops_early_for_the_whole_batch(case):
  """A table where every row ends soon: the loop stops well before max_new_tokens."""
  table = _table(seed=5, eos_bias=4.0)
  kw = dict(CASES[case], eos_token_id=EOS)
  want, forwards = _hf_generate(table, PROMPTS, **dict(kw, eos_token_id=list(EOS)))
  got, steps = _jax_search(table, PROMPTS, count_steps=True, **kw)
  np.testing.assert_array_equal(got, want)
  assert steps == forwards - 1 < 11


# ----------------------------------------------------------------------------------------
# Sampling


def _sample(table, prompts, seed, **kw):
  kw = dict(dict(max_new_tokens=8, eos_token_id=EOS, do_sample=True), **kw)
  return _jax_search(table, prompts, rng=jax.random.key(seed), **kw)


def test_beam_sampling_reproducible_and_seed_dependent():
  table = _table(eos_bias=-1.0)
  a, b, c = (_sample(table, PROMPTS, s, num_beams=3, temperature=1.5) for s in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_sampling_top_k_1_is_greedy():
  """With the processors on too: greedy picks the argmax of the same processed scores."""
  kw = dict(CASES["greedy_processors"], eos_token_id=EOS)
  table = _table(**kw.pop("table"))
  greedy = _jax_search(table, PROMPTS, **kw)
  sampled = _sample(table, PROMPTS, 3, top_k=1, temperature=0.5, **kw)
  np.testing.assert_array_equal(sampled, greedy)


def test_beam_sampling_at_low_temperature_is_beam_search():
  """Scaling every log-prob by 1/T keeps the beam ranking; as T → 0 the Gumbel draws
  without replacement become the top-k, so beam sampling must equal beam search."""
  table = _table()
  want = _jax_search(table, PROMPTS, max_new_tokens=12, num_beams=3, length_penalty=1.0,
                     eos_token_id=EOS)
  got = _sample(table, PROMPTS, 0, max_new_tokens=12, num_beams=3, temperature=1e-6)
  np.testing.assert_array_equal(got, want)


def test_beam_sampling_draws_without_replacement():
  """One new token, 2 beams: the output is the likelier of the first two draws without
  replacement from softmax(logits), whose law is known in closed form."""
  table = _table(eos_bias=0.0)
  prompts = np.repeat(PROMPTS[1:2], 3000, axis=0)
  got = _sample(table, prompts, 0, max_new_tokens=1, num_beams=2)[:, 0]
  freq = np.bincount(got, minlength=V) / len(got)
  logits = table[prompts[0, -2], prompts[0, -1]].astype(np.float64)
  p = np.exp(logits - logits.max())
  p /= p.sum()
  pair = p[:, None] * p[None, :] * (1 / (1 - p[:, None]) + 1 / (1 - p[None, :]))  # {i, j} first
  want = np.array([pair[i, p < p[i]].sum() for i in range(V)])
  np.testing.assert_allclose(want.sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(freq, want, atol=0.03)


def _first_token_frequencies(table, warper, seed, **kw):
  """Empirical distribution of the first sampled token over many copies of one prompt,
  and the distribution HF's warper defines."""
  prompts = np.repeat(PROMPTS[2:], 3000, axis=0)
  got = _sample(table, prompts, seed, max_new_tokens=1, **kw)[:, 0]
  freq = np.bincount(got, minlength=V) / len(got)
  logits = table[prompts[0, -2], prompts[0, -1]][None]
  warped = _hf(warper, None, logits)[0]
  probs = np.exp(warped - warped.max())
  return freq, probs / probs.sum()


@pytest.mark.parametrize("kind", ["top_k", "top_p"])
def test_sampling_follows_the_warped_distribution(kind):
  table = _table(eos_bias=0.0)
  if kind == "top_k":
    warper, kw = hf_lp.TopKLogitsWarper(4), dict(top_k=4)
  else:
    warper, kw = hf_lp.TopPLogitsWarper(0.6), dict(top_p=0.6)
  freq, probs = _first_token_frequencies(table, warper, 0, **kw)
  assert (freq[probs == 0] == 0).all()  # only the warper's support is sampled
  assert (probs > 0).sum() > 1 and (freq > 0).sum() > 1  # ... and not just its argmax
  np.testing.assert_allclose(freq, probs, atol=0.03)


def test_sampling_top_k_support_at_every_step_and_seeds():
  """Every sampled token (until eos) is within the top-k of its step's logits; a seed
  reproduces its samples, another seed gives others."""
  table = _table(eos_bias=-1.0)
  prompts = np.repeat(PROMPTS, 20, axis=0)
  got = _sample(table, prompts, 7, max_new_tokens=10, top_k=3)
  np.testing.assert_array_equal(_sample(table, prompts, 7, max_new_tokens=10, top_k=3), got)
  assert (_sample(table, prompts, 8, max_new_tokens=10, top_k=3) != got).any()
  rows = np.concatenate([prompts, got], axis=1)
  t0, checked = prompts.shape[1], 0
  for r in range(len(rows)):
    for i in range(t0, rows.shape[1]):
      logits = table[rows[r, i - 2], rows[r, i - 1]]
      assert rows[r, i] in np.argsort(-logits)[:3], (r, i)
      checked += 1
      if rows[r, i] in EOS:
        break  # then only padding
  assert checked > 300
  assert len(np.unique(got)) > 3


# ----------------------------------------------------------------------------------------
# Compilation


def test_compiles_once_for_prompts_of_one_shape():
  table = jnp.asarray(_table())

  def step_fn(state, tokens):
    return table[state, tokens], tokens

  run = jax.jit(functools.partial(search, step_fn, lambda s, rows: s[rows], max_new_tokens=6,
                                  num_beams=2, eos_token_id=EOS, pad_token_id=PAD,
                                  no_repeat_ngram_size=2))
  outs = []
  for prompts in (PROMPTS, PROMPTS[::-1] + 1):
    prompts = jnp.asarray(prompts)
    outs.append(run(prompts[:, -1], table[prompts[:, -2], prompts[:, -1]], prompts))
  assert run._cache_size() == 1
  assert outs[0].shape == (3, 6) and outs[0].dtype == jnp.int32
  assert (np.asarray(outs[0]) != np.asarray(outs[1])).any()
