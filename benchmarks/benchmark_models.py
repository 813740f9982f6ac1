"""The benchmarks' models: one small Flamingo built twice, as open_flamingo (PyTorch) and as
flamingo_jax on the same weights, or ours alone from a config (`--no-reference`).

`build_reference` writes OpenFlamingo's artefacts (tokenizer/, lm/, vision.pt,
checkpoint.pt) to a temporary directory with random non-degenerate weights and returns
the open_flamingo model; `load_ours` loads those files with
`flamingo_jax.load_openflamingo` (the user path). `jax_config` / `init_ours` build ours
from a FlamingoConfig alone, with random weights initialised in JAX (no torch), for
shapes with no reference build here.
"""
import os
import platform
import sys
import time
import types

# No hub on these machines: fail fast instead of a lookup.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The only torchvision wheel here is a CUDA build whose operator registrations fail on a
# CPU-only torch; open_clip and open_flamingo never need them.
for _name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
  sys.modules.setdefault(_name, types.ModuleType(_name))

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # uninstalled; tests.tiny_openflamingo

SHAPES = {
    "small": dict(vision=dict(image_size=224, layers=6, width=384, head_width=64, patch_size=16),
                  lm=dict(d_model=512, n_layers=8, n_heads=8, vocab=8192), every=2),
    "openflamingo_3b": dict(vision=dict(image_size=224, layers=24, width=1024, head_width=64,
                                        patch_size=14),
                            lm=dict(d_model=2048, n_layers=24, n_heads=16, vocab=50277), every=1),
    # For CI: that the benchmarks run, not how fast.
    "tiny": dict(vision=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=16),
                 lm=dict(d_model=64, n_layers=2, n_heads=2, vocab=512), every=1),
}


SPECIALS = ("<|endofchunk|>", "<image>", "<PAD>")  # OpenFlamingo's additions, in id order
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["th", "sh", "an", "or", "el"]


def log(*parts):
  print(*parts, file=sys.stderr, flush=True)


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
  need = max_seq_len if shape_name != "openflamingo_3b" else max(max_seq_len, lm["max_seq_len"])
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


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def param_count(tree) -> dict:
  """Parameters per top-level part (vision, resampler, lm: xattn included)."""
  import jax
  return {k: int(sum(x.size for x in jax.tree.leaves(v))) for k, v in tree.items()}


def nbytes(tree) -> int:
  import jax
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


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
