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
import os
import sys
import types

# No hub on these machines: fail fast instead of a lookup.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The only torchvision wheel here is a CUDA build whose operator registrations fail on a
# CPU-only torch; open_clip and open_flamingo never need them.
for _name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
  sys.modules.setdefault(_name, types.ModuleType(_name))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # uninstalled; tests.tiny_openflamingo

SHAPES = {
    "small": dict(vision=dict(image_size=224, layers=6, width=384, head_width=64, patch_size=16),
                  lm=dict(d_model=512, n_layers=8, n_heads=8, vocab=8192), every=2),
    "openflamingo_3b": dict(vision=dict(image_size=224, layers=24, width=1024, head_width=64,
                                        patch_size=14),
                            lm=dict(d_model=2048, n_layers=24, n_heads=16, vocab=50277), every=1),
}
MODES = {"greedy": dict(num_beams=1), "beam3": dict(num_beams=3, length_penalty=0.0)}
SPECIALS = ("<|endofchunk|>", "<image>", "<PAD>")  # OpenFlamingo's additions, in id order
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["th", "sh", "an", "or", "el"]


def log(*parts):
  print(*parts, file=sys.stderr, flush=True)


# --- text ------------------------------------------------------------------------------------

def vocabulary(rng, n=20000) -> tuple[np.ndarray, np.ndarray]:
  """Made-up words and their Zipf CDF: enough distinct text for an 8192-token BPE."""
  words = np.array(sorted({"".join(rng.choice(SYLLABLES, rng.integers(1, 5))) for _ in range(n)}))
  cdf = np.cumsum(1.0 / np.arange(1, len(words) + 1))
  return words, cdf / cdf[-1]


def sentence(rng, words, cdf, n=(8, 30)) -> str:
  picks = np.searchsorted(cdf, rng.random(int(rng.integers(*n))))
  return " ".join(words[np.minimum(picks, len(words) - 1)]).capitalize() + "."


def train_tokenizer(path: str, rng, vocab_size: int):
  """A byte-level BPE of `vocab_size` with an eos and no pad (OpenFlamingo adds <PAD>)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  words, cdf = vocabulary(rng)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator((sentence(rng, words, cdf) for _ in range(30000)), trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                 bos_token="<|endoftext|>", unk_token="<|endoftext|>")
  if len(fast) != vocab_size:
    raise RuntimeError(f"the BPE reached {len(fast)} tokens, not {vocab_size}: more text needed")
  fast.save_pretrained(path)
  return fast, (words, cdf)


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


# --- the reference model and its artefacts -----------------------------------------------------

# Weights with gain 2 (the rest: 1 / sqrt(fan in)): the blocks' output projections and MPT's
# input ones. With plain fan-in scaling and the tied head, the residual stream stays close
# to the input token's embedding and greedy decoding repeats one token; with these (and a
# small embedding) it emits ~14 distinct tokens in 20.
GAIN_2 = ("out_proj", "down_proj", "to_out", "ff.3.", "Wqkv", "up_proj")


def randomise(module, embed_std: float) -> None:
  """Fan-in scaled weights, LayerNorm scales near 1, gates open (the xattn blocks must
  matter), latents N(0, 1)."""
  import torch
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "gate" in name:
        p.uniform_(0.5, 1.0)
      elif "latents" in name:
        p.normal_(0, 1.0)
      elif name.endswith(("wte.weight", "lm_head.weight")):
        p.normal_(0, embed_std)
      elif p.ndim >= 2:
        p.normal_(0, (2.0 if any(k in name for k in GAIN_2) else 1.0) * p[0].numel() ** -0.5)
      elif name.endswith("weight"):
        p.normal_(1.0, 0.1)
      elif p.ndim == 1:
        p.normal_(0, 0.05)


def build_reference(tmp: str, shape: dict, max_seq_len: int, seed: int = 0):
  """Writes tokenizer/, lm/, vision.pt, checkpoint.pt to `tmp` as OpenFlamingo's users get
  them; returns (reference Flamingo in eval mode, open_clip config, tokenizer, text)."""
  import open_clip
  import torch
  import transformers as tf
  from open_flamingo import Flamingo
  from open_flamingo.src.flamingo_lm import FlamingoLMMixin
  from open_flamingo.src.utils import extend_instance
  from tests.tiny_openflamingo import trainable_state_dict

  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)
  s = shape["lm"]
  tokenizer, text = train_tokenizer(os.path.join(tmp, "tokenizer"), rng, s["vocab"])
  vision_cfg = dict(shape["vision"], final_ln_after_pool=True)  # OpenFlamingo's token convention
  clip_cfg = dict(embed_dim=64, vision_cfg=vision_cfg,
                  text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1))
  clip = open_clip.model.CLIP(**clip_cfg)
  randomise(clip, 0.05)
  torch.save(clip.state_dict(), os.path.join(tmp, "vision.pt"))
  clip.visual.output_tokens = True

  # MptConfig defaults to use_cache=False: HF generate would then re-run the whole prompt
  # at every step (~20x slower here); the comparison is KV cache against KV cache.
  config = tf.MptConfig(d_model=s["d_model"], n_heads=s["n_heads"], n_layers=s["n_layers"],
                        vocab_size=s["vocab"], max_seq_len=max_seq_len, use_cache=True)
  lm = tf.AutoModelForCausalLM.from_config(config)
  randomise(lm, 0.05)
  lm.save_pretrained(os.path.join(tmp, "lm"), safe_serialization=True)

  # What OpenFlamingo's factory does.
  tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIALS[:2])})
  tokenizer.add_special_tokens({"pad_token": SPECIALS[2]})
  extend_instance(lm, FlamingoLMMixin)
  lm.set_decoder_layers_attr_name("transformer.blocks")
  lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # redrawn below
  model = Flamingo(clip, lm, tokenizer.encode(SPECIALS[0])[-1], tokenizer.encode(SPECIALS[1])[-1],
                   vis_dim=vision_cfg["width"], cross_attn_every_n_layers=shape["every"])
  model.requires_grad_(False)
  model.perceiver.requires_grad_(True)
  model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
  model.lang_encoder.get_input_embeddings().requires_grad_(True)
  randomise(model.perceiver, 0.0)
  randomise(model.lang_encoder.gated_cross_attn_layers, 0.0)
  with torch.no_grad():  # the resized table, new rows included (tied head)
    model.lang_encoder.get_input_embeddings().weight.normal_(0, 0.05)
  model.float().eval()
  torch.save({"epoch": 0, "model_state_dict": trainable_state_dict(model)},
             os.path.join(tmp, "checkpoint.pt"))
  return model, clip_cfg, tokenizer, text


def load_ours(tmp: str, clip_cfg: dict, every: int, dtype: str):
  import jax
  import flamingo_jax
  model, params, tokenizer = flamingo_jax.load_openflamingo(
      os.path.join(tmp, "checkpoint.pt"), os.path.join(tmp, "vision.pt"),
      os.path.join(tmp, "lm"), os.path.join(tmp, "tokenizer"),
      cross_attn_every_n_layers=every, vision_config=clip_cfg, dtype=dtype, param_dtype=dtype)
  return model, jax.device_put(params, jax.devices()[0]), tokenizer


# --- our model from a config alone ----------------------------------------------------------

def jax_config(shape_name: str, max_seq_len: int, dtype: str):
  """The FlamingoConfig load_openflamingo would build for `shape_name` (3B: the model of
  configs/openflamingo_3b.py); also returns the `<PAD>` id."""
  from flamingo_jax import presets
  from flamingo_jax.config import FlamingoConfig
  shape = SHAPES[shape_name]
  if shape_name == "openflamingo_3b":
    vision = presets.clip_vit_l14()
    lm = presets.mpt(d_model=2048, num_layers=24, num_heads=16, qk_norm=True)
  else:
    v = shape["vision"]
    vision = dict(kind="vit", image_size=v["image_size"], patch_size=v["patch_size"],
                  width=v["width"], depth=v["layers"], num_heads=v["width"] // v["head_width"],
                  mlp_dim=4 * v["width"], activation="gelu", keep_cls=False,
                  final_ln_on_tokens=False)
    s = shape["lm"]
    lm = presets.mpt(d_model=s["d_model"], num_layers=s["n_layers"], num_heads=s["n_heads"])
  base = shape["lm"]["vocab"]
  eoc, image, pad = base, base + 1, base + 2
  # small: the HF MptConfig's max_seq_len; 3B: MPT-1B's 2048 unless the run needs more.
  need = max_seq_len if shape_name == "small" else max(max_seq_len, lm["max_seq_len"])
  lm.update(vocab_size=base + len(SPECIALS), max_seq_len=need)
  return FlamingoConfig.from_dict(dict(
      presets.openflamingo(lm, every=shape["every"]), vision=vision, media_token_id=image,
      eoc_token_id=eoc, trainable_token_ids=(eoc, image), dtype=dtype, param_dtype=dtype,
      remat_policy="none")), pad


def init_ours(config, seed: int = 0):
  """Random params initialised in JAX at the config's param dtype, gates opened."""
  import jax
  import jax.numpy as jnp
  from flamingo_jax.load_model import random_init
  from flamingo_jax.model import Flamingo
  model = Flamingo(config)
  params = random_init(model, seed)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.full_like(x, 0.7) if "gate" in jax.tree_util.keystr(path) else x, params)
  return model, jax.block_until_ready(params)


# --- timing ----------------------------------------------------------------------------------

def timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


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


def param_count(tree) -> dict:
  """Parameters per top-level part (vision, resampler, lm: xattn included)."""
  import jax
  return {k: int(sum(x.size for x in jax.tree.leaves(v))) for k, v in tree.items()}


def nbytes(tree) -> int:
  import jax
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


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

def pin_threads(threads: int | None) -> int:
  """Pins this process to `threads` CPUs before jax / torch start their pools."""
  cpus = sorted(os.sched_getaffinity(0))
  if threads:
    if threads > len(cpus):
      raise SystemExit(f"--threads {threads}: only {len(cpus)} CPUs available")
    cpus = cpus[:threads]
    os.sched_setaffinity(0, cpus)
  return len(cpus)


def machine(threads: int, reference: bool) -> dict:
  import jax
  import jaxlib
  info = dict(cpu_count=os.cpu_count(), threads=threads, platform=platform.platform(),
              processor=platform.processor() or platform.machine(),
              python=platform.python_version(),
              jax=jax.__version__, jaxlib=jaxlib.__version__, jax_backend=jax.default_backend(),
              jax_devices=[d.device_kind for d in jax.devices()],
              jax_threads=f"XLA:CPU pool sized to the {threads} schedulable CPUs (affinity)")
  if reference:
    from importlib.metadata import version
    import torch
    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                **{name: version(name)
                   for name in ("transformers", "open_flamingo", "open_clip_torch")})
  return info


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
