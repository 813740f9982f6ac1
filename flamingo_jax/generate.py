"""Continues prompts about images with a converted model or a train.py workdir.

  python -m flamingo_jax.generate --model DIR --image a.jpg --image b.jpg \
      --prompt "<image>Output:a cat.<|endofchunk|><image>Output:" [--num-beams 3]

Each `<image>` tag takes the next --image file, in order (several --prompt flags make a
batch and share the files in the same order). Prints one continuation per prompt: the
generated text up to, not including, the `<|endofchunk|>` that ends it, special tokens
dropped (as open_flamingo's evaluation decodes). Exit status 2 and a one-line message on
stderr for a mistake in the arguments, the model directory, a prompt or an image file.

Run it as a command (`python -m`), not as an import: `flamingo_jax.generate` is the
generation function.
"""
import argparse
import sys

from flamingo_jax.cli import EPILOG, Parser, UsageError, run_command


def parser() -> argparse.ArgumentParser:
  p = Parser(prog="python -m flamingo_jax.generate", description=__doc__.split("\n\n")[0],
              epilog=EPILOG)
  p.add_argument("--model", required=True, metavar="DIR",
                 help="a converted model (convert CLI --output) or a train.py workdir")
  p.add_argument("--image", action="append", default=[], metavar="FILE",
                 help="an image file for the next <image> tag (repeat, in order)")
  p.add_argument("--prompt", action="append", required=True,
                 help="text with <image> tags (repeat for a batch)")
  p.add_argument("--tokenizer", default=None, metavar="DIR",
                 help="HF tokenizer directory (default: the model directory's)")
  p.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="default 20")
  p.add_argument("--min-new-tokens", type=int, default=0, metavar="N",
                 help="no stop before this many (default 0)")
  p.add_argument("--num-beams", type=int, default=1, metavar="N",
                 help="beam search width; 1 = greedy or sampling (default)")
  p.add_argument("--length-penalty", type=float, default=1.0, metavar="X",
                 help="beam scores are divided by length ** X (default 1)")
  p.add_argument("--do-sample", action="store_true", help="sample instead of the argmax")
  p.add_argument("--temperature", type=float, default=None, metavar="X",
                 help="sampling only (default 1)")
  p.add_argument("--top-k", type=int, default=None, metavar="N",
                 help="sampling only; 0 = off (default)")
  p.add_argument("--top-p", type=float, default=None, metavar="X",
                 help="sampling only; 1 = off (default)")
  p.add_argument("--seed", type=int, default=None, metavar="N", help="sampling only (default 0)")
  p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="X",
                 help="1 = off (default)")
  p.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N",
                 help="0 = off (default)")
  return p


def check_args(a) -> None:
  """Flag values that cannot work; raises UsageError naming the flag."""
  sampling = {"--temperature": a.temperature, "--top-k": a.top_k, "--top-p": a.top_p,
              "--seed": a.seed}
  if not a.do_sample:
    given = [flag for flag, value in sampling.items() if value is not None]
    if given:
      raise UsageError(f"{', '.join(given)} only take effect with --do-sample")
  a.temperature = 1.0 if a.temperature is None else a.temperature
  a.top_k = 0 if a.top_k is None else a.top_k
  a.top_p = 1.0 if a.top_p is None else a.top_p
  a.seed = 0 if a.seed is None else a.seed
  rules = [(a.max_new_tokens >= 1, "--max-new-tokens", "must be >= 1"),
           (0 <= a.min_new_tokens <= a.max_new_tokens, "--min-new-tokens",
            f"must be in [0, --max-new-tokens={a.max_new_tokens}]"),
           (a.num_beams >= 1, "--num-beams", "must be >= 1"),
           (a.temperature > 0, "--temperature", "must be > 0"),
           (a.top_k >= 0, "--top-k", "must be >= 0 (0 = off)"),
           (0 < a.top_p <= 1, "--top-p", "must be in (0, 1]"),
           (a.repetition_penalty > 0, "--repetition-penalty", "must be > 0 (1 = off)"),
           (a.no_repeat_ngram_size >= 0, "--no-repeat-ngram-size", "must be >= 0 (0 = off)")]
  for ok, flag, message in rules:
    if not ok:
      raise UsageError(f"{flag} {message}, got {getattr(a, flag[2:].replace('-', '_'))}")


def prepare(a):
  """(model, params, tokenizer, batch dict) from the checked arguments."""
  from flamingo_jax.decoding import prompts
  from flamingo_jax.load_model import load_model
  from flamingo_jax.model import unscanned

  model, params, tokenizer, preprocessing = load_model(a.model, tokenizer=a.tokenizer)
  model, params = unscanned(model, params)  # the layout that decodes fastest
  max_seq_len = model.config.lm.max_seq_len
  budget = max_seq_len - a.max_new_tokens
  if budget < 1:
    raise UsageError(f"--max-new-tokens {a.max_new_tokens} leaves no room for the prompt "
                     f"(lm.max_seq_len={max_seq_len})")
  ids, mask = prompts.encode_prompts(
      tokenizer, a.prompt, budget,
      why=f"lm.max_seq_len={max_seq_len} minus --max-new-tokens={a.max_new_tokens}")
  counts = prompts.media_counts(ids, model.config.media_token_id)
  images, media_mask = prompts.load_images(a.image, preprocessing, counts)
  batch = dict(images=images, input_ids=ids, attention_mask=mask, media_mask=media_mask)
  return model, params, tokenizer, batch


def run(a) -> list[str]:
  import jax

  from flamingo_jax.decoding import generate, prompts

  model, params, tokenizer, batch = prepare(a)
  new_tokens = generate(
      model, params, **batch, max_new_tokens=a.max_new_tokens, num_beams=a.num_beams,
      length_penalty=a.length_penalty, do_sample=a.do_sample, temperature=a.temperature,
      top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty,
      no_repeat_ngram_size=a.no_repeat_ngram_size, min_new_tokens=a.min_new_tokens,
      eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
      rng=jax.random.PRNGKey(a.seed) if a.do_sample else None)
  return prompts.continuations(tokenizer, new_tokens, model.config.eoc_token_id)


def main(argv=None) -> int:
  """Prints the continuations; returns 0, or 2 (one line on stderr) for user errors."""
  def parse(argv):
    a = parser().parse_args(argv)
    check_args(a)
    return a
  return run_command("generate", parse, lambda a: print(*run(a), sep="\n"), argv)


if __name__ == "__main__":
  sys.exit(main())
