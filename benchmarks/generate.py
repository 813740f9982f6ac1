"""Generation speed: `flamingo_jax.generate` against open_flamingo's `generate`, same weights.

    python benchmarks/generate.py [--batch-sizes 1,16] [--modes greedy,beam3] [--repeats 3]
        [--prompt-tokens 256] [--images 4] [--new-tokens 20] [--threads N]
        [--shape small|openflamingo_3b] [--dtype float32|bfloat16] [--no-reference]
        [--layout unscanned|scanned]
        [--peak-bandwidth-gbs GB/s]

One model, two frameworks. `small`: an open_clip CLIP ViT (width 384, 6 layers, head
width 64, patch 16, 224 px), OpenFlamingo's resampler and gated xattn (every 2 layers) and
an HF MPT (d 512, 8 layers, 8 heads, vocabulary 8192: a byte-level BPE trained here),
random non-degenerate weights, saved as OpenFlamingo's artefacts (checkpoint.pt,
vision.pt, lm/, tokenizer/) in a temporary directory and loaded with
`flamingo_jax.load_openflamingo`: the user path. The reference is `open_flamingo.Flamingo`
in eval mode under torch.no_grad, its MPT with use_cache=True (MptConfig's default, False,
makes HF generate re-run the whole prompt at every step).

The prompt is 4-shot captioning, "<image>Output:<caption><|endofchunk|>" x 3 +
"<image>Output:", about --prompt-tokens long; rows of a batch differ by a few tokens and
are left-padded. Both sides get `min_new_tokens = max_new_tokens`, so every row decodes
all --new-tokens steps. Per (batch size, mode): one warm-up call each (ours compiles
then), then --repeats timed calls alternating the two; medians. tokens/s counts
batch x new tokens (beams not counted); `speedup` = ours / theirs.

Ours is also timed with one new token (images, prefill and the first token), so
decode_step = (time - that) / (new tokens - 1). Bytes read per decode step ≈ the LM and
xattn weights (the xattn K/V projections excluded: their outputs are cached) + the
self-attention KV cache + the cached visual K/V, all at their stored size; divided by
decode_step that is the achieved bandwidth (and its fraction of --peak-bandwidth-gbs).

Two bounds on the speedup, both measured: `speedup_bound_free_decode`, open_flamingo's
whole call over ours with one new token (what ours would reach if every later step were
free), and, on CPU, `speedup_bound_compute`, open_flamingo's whole call over the prompt's
forward FLOPs (vision tower, resampler, LM over the prompt; XLA's cost model) at this
machine's measured fp32 matmul rate: what no implementation of the same model can beat
while it encodes the images and reads the prompt once.

`--no-reference` times ours only, with random weights initialised in JAX from a
FlamingoConfig (no torch); `--shape openflamingo_3b` (CLIP ViT-L/14, MPT-1B, xattn every
layer, vocabulary 50280, as configs/openflamingo_3b.py) needs it. --threads pins this
process to N CPUs (XLA:CPU sizes its thread pool to the CPUs it may run on) and sets
torch.set_num_threads(N); default: all of them. Use an idle machine: under CPU contention
torch's OpenMP threads slow down far more than XLA's (batch 1 greedy on 2 shared cores:
open_flamingo 1.2 s idle, 16 s at load 5; ours 1.0 s and 1.9 s). Progress goes to stderr;
the last line on stdout is a JSON object with every number, the machine and the command line.
"""
import argparse
import json
import os
import shlex
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_models import (SHAPES, build_reference, init_ours, jax_config, load_ours, log,  # noqa: E402
                    machine, param_count, pin_threads, sentence, timed, nbytes)

MODES = {"greedy": dict(num_beams=1), "beam3": dict(num_beams=3, length_penalty=0.0)}


# --- text ------------------------------------------------------------------------------------

def prompts(rng, batch: int, length: int, images: int, ids: dict, text=None):
  """Left-padded few-shot prompts [B, length] and their mask: row 0 is `length` tokens,
  the others up to 8 shorter. Captions come from the tokenizer's text (else random ids)."""
  def caption(n):
    if text is None:
      return list(rng.integers(0, ids["text_vocab"], n))
    out = []
    while len(out) < n:
      out += ids["encode"](" " + sentence(rng, *text))
    return out[:n]

  rows = []
  for b in range(batch):
    real = length - (0 if b == 0 else int(rng.integers(1, 9)))
    fixed = images * (1 + len(ids["output"])) + (images - 1)  # <image>Output: ... <eoc>
    budget = real - fixed
    if budget < images - 1:
      raise SystemExit(f"--prompt-tokens {length} is too short for {images} images")
    sizes = [budget // (images - 1) + (i < budget % (images - 1)) for i in range(images - 1)]
    row = []
    for n in sizes:
      row += [ids["image"], *ids["output"], *caption(n), ids["eoc"]]
    rows.append(row + [ids["image"], *ids["output"]])
  input_ids = np.full((batch, length), ids["pad"], np.int64)
  mask = np.zeros((batch, length), np.int64)
  for b, row in enumerate(rows):
    input_ids[b, length - len(row):], mask[b, length - len(row):] = row, 1
  return input_ids, mask


# --- timing ----------------------------------------------------------------------------------

def reference_call(ref, vision_x, ids, mask, new, mode, eos, pad):
  import torch
  with torch.no_grad():
    out = ref.generate(vision_x=vision_x, lang_x=ids, attention_mask=mask, max_new_tokens=new,
                       min_new_tokens=new, eos_token_id=eos, pad_token_id=pad, do_sample=False,
                       **MODES[mode])
  return out[:, ids.shape[1]:].numpy()


def our_call(model, params, images, ids, mask, new, mode, eos, pad):
  import flamingo_jax
  out = flamingo_jax.generate(model, params, images=images, input_ids=ids, attention_mask=mask,
                              max_new_tokens=new, min_new_tokens=new, eos_token_id=eos,
                              pad_token_id=pad, count_padding=True, **MODES[mode])
  return np.asarray(out)  # waits for the device


def rates(seconds: float, batch: int, new: int) -> dict:
  return dict(tokens_per_s=round(batch * new / seconds, 2),
              ms_per_token=round(1e3 * seconds / new, 2))


def decode_bytes(model, params, rows: int, prompt_len: int, new: int, images: int) -> dict:
  """Bytes one decode step reads: LM + xattn weights (less the xattn K/V projections, whose
  outputs are cached), the self-attention KV cache and the cached visual K/V."""
  import jax
  import jax.numpy as jnp
  from flamingo_jax.decoding import state
  named = lambda tree: {jax.tree_util.keystr(p): x
                        for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  weights = named(params["lm"])
  kv_proj = [k for k in weights
             if "xattn" in k and "'attn'" in k and ("'key'" in k or "'value'" in k)]
  size = model.config.vision.image_size
  st = jax.eval_shape(
      lambda p, i, t: state.prefill(model, p, images=i, input_ids=t,
                                    attention_mask=jnp.ones_like(t),
                                    cache_size=prompt_len + new - 1)[1],
      params, jax.ShapeDtypeStruct((rows, images, 1, size, size, 3), model.config.compute_dtype),
      jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32))
  return dict(weights=nbytes(list(weights.values())) - nbytes([weights[k] for k in kv_proj]),
              kv_cache=nbytes(st.cache), visual_kv=nbytes(st.media_cache))


def side_summary(first: float, times: list, tokens: np.ndarray, batch: int, new: int,
                 ids: dict) -> dict:
  """One side's timings and rates, and what it generated (did every step run, do rows vary)."""
  med = float(np.median(times))
  return dict(first_call_s=round(first, 3), median_s=round(med, 4),
              times_s=[round(t, 4) for t in times], **rates(med, batch, new),
              new_tokens_produced=int(tokens.shape[1]),
              stop_token_produced=bool((tokens == ids["eoc"]).any()),
              image_token_produced=bool((tokens == ids["image"]).any()),
              distinct_tokens_per_row=[len(set(row)) for row in tokens.tolist()])


def prompt_flops(model, images_shape, ids_shape) -> float:
  """Forward FLOPs of the images (vision tower, resampler) and the prompt through the LM,
  from XLA's cost model (flamingo_jax.train.flops), once per prompt (beams not counted)."""
  import jax
  import jax.numpy as jnp
  from flamingo_jax.train.flops import forward_flops
  batch = dict(images=jax.ShapeDtypeStruct(images_shape, jnp.float32),
               input_ids=jax.ShapeDtypeStruct(ids_shape, jnp.int32))
  return float(sum(forward_flops(model, batch).values()))


def decode_summary(a, ctx, rows: int, seconds: float, one_token: float) -> dict:
  """Decode step time (all steps less the one-token call), bytes it reads, bandwidth."""
  new = a.new_tokens
  step = (seconds - one_token) / (new - 1)
  read = decode_bytes(ctx["model"], ctx["params"], rows, a.prompt_tokens, new, a.images)
  total = sum(read.values())
  out = dict(decode_step_ms=None, decode_bytes_per_step=dict(read, total=total),
             decode_gb_per_s=None)
  if step <= 0:  # the one-token call was slower than the whole one: noise, not a number
    log(f"  decode step not resolved ({new} tokens {seconds:.3f} s, 1 token {one_token:.3f} s);"
        " more --repeats or --new-tokens")
    return out
  out.update(decode_step_ms=round(1e3 * step, 3), decode_gb_per_s=round(total / step / 1e9, 2))
  if a.peak_bandwidth_gbs:
    out["decode_peak_bandwidth_fraction"] = round(total / step / 1e9 / a.peak_bandwidth_gbs, 4)
  return out


def bench_case(a, ctx, batch: int, mode: str) -> dict:
  """Warm-up each side, then `repeats` alternating timed calls; ours also at 1 new token."""
  import jax
  rng = np.random.default_rng(batch)
  ids, mask = prompts(rng, batch, a.prompt_tokens, a.images, ctx["ids"], ctx.get("text"))
  size = ctx["model"].config.vision.image_size
  images = rng.normal(size=(batch, a.images, 1, size, size, 3)).astype(np.float32)
  eos, pad, new = ctx["ids"]["eoc"], ctx["ids"]["pad"], a.new_tokens
  dtype = ctx["model"].config.compute_dtype
  ours_images = jax.device_put(images.astype(dtype))
  ours = lambda n=new: our_call(ctx["model"], ctx["params"], ours_images, ids, mask, n, mode,
                                eos, pad)
  sides = {"flamingo_jax": ours}
  if ctx.get("reference") is not None:
    import torch
    vision_x = torch.from_numpy(images).permute(0, 1, 2, 5, 3, 4).contiguous()  # NHWC → NCHW
    vision_x = vision_x.to(ctx["torch_dtype"])
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    sides["open_flamingo"] = lambda n=new: reference_call(ctx["reference"], vision_x, ids_t,
                                                          mask_t, n, mode, eos, pad)
  first, tokens, times = {}, {}, {name: [] for name in sides}
  for name, fn in sides.items():
    first[name], tokens[name] = timed(fn)
    log(f"  b={batch} {mode}: {name} first call {first[name]:.2f} s")
  for _ in range(a.repeats):
    for name, fn in sides.items():
      t, out = timed(fn)
      times[name].append(t)
      tokens[name] = out
  prefill_first, _ = timed(lambda: ours(1))
  one_token = {name: float(np.median([timed(lambda: fn(1))[0] for _ in range(a.repeats)]))
               for name, fn in sides.items()}
  prefill = one_token["flamingo_jax"]

  result = dict(batch_size=batch, mode=mode, **MODES[mode], prompt_tokens=a.prompt_tokens,
                prompt_lengths=mask.sum(1).tolist(), images=a.images, new_tokens=new)
  for name in sides:
    result[name] = side_summary(first[name], times[name], tokens[name], batch, new, ctx["ids"])
  o = result["flamingo_jax"]
  o["compile_s"] = round(first["flamingo_jax"] - o["median_s"], 3)  # first call less a warm one
  o.update(one_token_s=round(prefill, 4), one_token_first_call_s=round(prefill_first, 3))
  o.update(decode_summary(a, ctx, batch * MODES[mode]["num_beams"], o["median_s"], prefill))
  if "open_flamingo" in result:
    ours_t, theirs_t = tokens["flamingo_jax"], tokens["open_flamingo"]
    t = result["open_flamingo"]
    t["one_token_s"] = round(one_token["open_flamingo"], 4)
    t["decode_step_ms"] = round(1e3 * (t["median_s"] - t["one_token_s"]) / (new - 1), 3)
    result["speedup"] = round(o["tokens_per_s"] / t["tokens_per_s"], 3)
    # Side by side per part: images + prefill + first token, and one decode step.
    result["one_token_speedup"] = round(t["one_token_s"] / o["one_token_s"], 3)
    if o["decode_step_ms"] and t["decode_step_ms"] > 0:
      result["decode_step_speedup"] = round(t["decode_step_ms"] / o["decode_step_ms"], 3)
    # What no decode loop can beat: open_flamingo's whole call over ours with one token
    # (images, prefill and the first token as measured), and over the prompt's FLOPs
    # at this machine's measured matmul rate (images and prefill only).
    result["speedup_bound_free_decode"] = round(t["median_s"] / o["one_token_s"], 3)
    if "matmul_flops" in ctx:
      flops = prompt_flops(ctx["model"], images.shape, ids.shape)
      result["prompt_gflop"] = round(flops / 1e9, 2)
      result["speedup_bound_compute"] = round(t["median_s"] / (flops / ctx["matmul_flops"]), 3)
    result["tokens_equal"] = bool(np.array_equal(ours_t, theirs_t))
    result["rows_equal"] = [bool(np.array_equal(x, y)) for x, y in zip(ours_t, theirs_t)]
  report(result)
  return result


def report(r: dict) -> None:
  o = r["flamingo_jax"]
  line = (f"b={r['batch_size']:<3} {r['mode']:<6} ours {o['tokens_per_s']:>8.1f} tok/s "
          f"{o['ms_per_token']:>8.1f} ms/tok (compile {o['compile_s']:.1f} s, 1 token "
          f"{o['one_token_s']:.3f} s, decode step {o['decode_step_ms']} ms, "
          f"{o['decode_gb_per_s']} GB/s")
  if "decode_peak_bandwidth_fraction" in o:
    line += f", {100 * o['decode_peak_bandwidth_fraction']:.1f}% of peak"
  line += ")"
  if "open_flamingo" in r:
    t = r["open_flamingo"]
    line += (f" | open_flamingo {t['tokens_per_s']:>8.1f} tok/s {t['ms_per_token']:>8.1f} ms/tok"
             f" (1 token {t['one_token_s']:.3f} s, decode step {t['decode_step_ms']} ms)"
             f" | speedup {r['speedup']:.2f}x (1 token {r['one_token_speedup']:.2f}x, decode "
             f"step {r.get('decode_step_speedup')}x), tokens equal: {r['tokens_equal']}"
             f" | bound: {r['speedup_bound_free_decode']:.2f}x with free decoding, "
             f"{r.get('speedup_bound_compute')}x at the matmul peak")
    if not r["tokens_equal"]:
      line += f" (rows equal: {r['rows_equal']})"
  log(line)


# --- main ------------------------------------------------------------------------------------

def setup(a) -> dict:
  """The model(s) and token ids of the run."""
  max_seq_len = a.prompt_tokens + a.new_tokens
  if a.no_reference:
    config, pad = jax_config(a.shape, max_seq_len, a.dtype)
    model, params = init_ours(config)
    ids = dict(eoc=config.eoc_token_id, image=config.media_token_id, pad=pad,
               text_vocab=SHAPES[a.shape]["lm"]["vocab"], output=[101, 102])  # "Output:"
    return dict(model=model, params=params, ids=ids)
  import torch
  with tempfile.TemporaryDirectory(prefix="flamingo_generate_bench_") as tmp:
    ref, clip_cfg, tokenizer, text = build_reference(tmp, SHAPES[a.shape], max_seq_len)
    model, params, ours_tok = load_ours(tmp, clip_cfg, SHAPES[a.shape]["every"], a.dtype)
  assert len(ours_tok) == len(tokenizer)
  torch_dtype = getattr(torch, a.dtype)
  ref.to(torch_dtype)
  ids = dict(eoc=ref.eoc_token_id, image=ref.media_token_id, pad=tokenizer.pad_token_id,
             output=tokenizer.encode("Output:"), encode=tokenizer.encode)
  assert model.config.eoc_token_id == ids["eoc"] and model.config.media_token_id == ids["image"]
  return dict(model=model, params=params, ids=ids, text=text, reference=ref,
              torch_dtype=torch_dtype)


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  ints = lambda s: [int(x) for x in s.split(",")]
  p.add_argument("--batch-sizes", type=ints, default=[1, 16])
  p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--prompt-tokens", type=int, default=256)
  p.add_argument("--images", type=int, default=4)
  p.add_argument("--new-tokens", type=int, default=20)
  p.add_argument("--threads", type=int, default=None,
                 help="default: every CPU this process may use")
  p.add_argument("--no-reference", action="store_true",
                 help="ours only, weights initialised in JAX")
  p.add_argument("--shape", choices=list(SHAPES), default="small")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--layout", choices=["unscanned", "scanned"], default="unscanned",
                 help="the LM's layer groups: split (FlamingoConfig.scan_layers=False, as the "
                      "generate and eval commands decode) or one scanned stack")
  p.add_argument("--peak-bandwidth-gbs", type=float, default=None,
                 help="the device's peak memory bandwidth (H200: 4800)")
  a = p.parse_args(argv)
  bad = [m for m in a.modes if m not in MODES]
  if bad:
    p.error(f"--modes: unknown {bad}; choose from {list(MODES)}")
  if a.shape != "small" and not a.no_reference:
    p.error(f"--shape {a.shape} has no reference build here; add --no-reference")
  if a.images < 2 or a.repeats < 1 or a.new_tokens < 2:
    p.error("need --images >= 2, --repeats >= 1, --new-tokens >= 2")
  return a


def main(argv=None):
  a = parse(argv)
  threads = pin_threads(a.threads)
  if not a.no_reference:
    import torch
    torch.set_num_threads(threads)
    import transformers
    transformers.logging.set_verbosity_error()
  import jax
  start = time.perf_counter()
  ctx = setup(a)
  if a.layout == "unscanned":  # what the generate and eval commands decode with
    from flamingo_jax.model import unscanned
    ctx["model"], ctx["params"] = unscanned(ctx["model"], ctx["params"])
  info = machine(threads, not a.no_reference)
  if jax.devices()[0].platform == "cpu":  # the compute bound below needs the machine's rate
    from flamingo_jax.train.flops import measure_matmul_flops
    ctx["matmul_flops"] = max(measure_matmul_flops(jax.devices()[0]) for _ in range(3))
    info["matmul_gflops_measured"] = round(ctx["matmul_flops"] / 1e9, 1)
  log(f"{a.shape} model ({a.dtype}) ready in {time.perf_counter() - start:.1f} s; "
      f"{threads} threads; jax {jax.__version__} on {info['jax_devices']}")
  results = [bench_case(a, ctx, b, m) for b in a.batch_sizes for m in a.modes]
  out = dict(benchmark="generate", command=shlex.join([sys.executable, *sys.argv]),
             machine=info, shape=a.shape, dtype=a.dtype, layout=a.layout,
             reference=not a.no_reference,
             repeats=a.repeats, params=param_count(ctx["params"]), results=results,
             total_s=round(time.perf_counter() - start, 1))
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
