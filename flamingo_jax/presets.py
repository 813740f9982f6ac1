"""Model presets that `configs/*.py` compose: the paper's (Tables 4-5) and OpenFlamingo's.

Each function returns a plain dict of `FlamingoConfig` fields. The paper's stated widths
and its parameter counts do not all agree (see the notes by each preset); where they
disagree we keep the stated widths, heads and depths and choose the one free size (an FFW
hidden size) that reproduces the published count, and say so.
"""

# ---------------------------------------------------------------- vision encoders

def nfnet_f6() -> dict:
  """Paper: NFNet-F6 (435M, frozen), contrastively pretrained, 320x320 in Flamingo; as
  DeepMind's Haiku NFNets (the paper's code) compute it: `jax.nn.gelu`'s default tanh
  approximation and WSConv2D's weight standardisation (timm's `dm_nfnet_*` port uses exact
  GELU instead). The tanh form also compiles faster on TPU: the erf polynomial is fused
  into each conv's epilogue (flamingo_3b's vision tower: 59-63 s with it, see flamingo())."""
  return dict(kind="nfnet", variant="F6", image_size=320, activation="gelu_tanh",
              weight_standardization="deepmind")


def clip_vit_l14() -> dict:
  """OpenFlamingo: open_clip ViT-L/14 'openai' (QuickGELU), 256 patch tokens, no CLS,
  no final LayerNorm on the tokens (the behaviour of open_clip <= 2.22 it was trained on)."""
  return dict(kind="vit", image_size=224, patch_size=14, width=1024, depth=24, num_heads=16,
              mlp_dim=4096, activation="quick_gelu", keep_cls=False, final_ln_on_tokens=False)


# ---------------------------------------------------------------- resamplers

def paper_resampler() -> dict:
  """6 layers, d 1536, 16 heads x 96, 64 latents, squared ReLU, 8-frame temporal table.

  Departure: with these dims (and the 3072 → 1536 input projection NFNet-F6's output
  needs) the resampler has 175M parameters, not the stated 194M; no stated width gives 194M.
  """
  return dict(dim=1536, depth=6, num_heads=16, head_dim=96, num_latents=64, ff_mult=4,
              activation="squared_relu", max_frames=8)


def openflamingo_resampler() -> dict:
  """Width = the vision width (1024), 6 layers, 8 heads x 64, 64 latents, GELU."""
  return dict(depth=6, num_heads=8, head_dim=64, num_latents=64, ff_mult=4, activation="gelu")


# ---------------------------------------------------------------- gated xattn

def paper_xattn(every: int, num_heads: int, ff_dim: int) -> dict:
  """Paper: blocks from the first LM layer, every `every`; key/value size 128; squared ReLU.
  The block adds nothing to tokens that have no image (φ = 0)."""
  return dict(every=every, placement="first", num_heads=num_heads, head_dim=128,
              ff_dim=ff_dim, activation="squared_relu", ff_without_media=False)


def openflamingo_xattn(every: int) -> dict:
  """OpenFlamingo: before layer i when (i + 1) % every == 0; 8 heads x 64 at any LM size;
  GELU; the FFW runs on every token, media or not."""
  return dict(every=every, placement="last", num_heads=8, head_dim=64, ff_mult=4,
              activation="gelu", ff_without_media=True)


# ---------------------------------------------------------------- frozen LMs

# The paper's tokenizer: Chinchilla's 32,000-token SentencePiece vocabulary, then
# `<|endofchunk|>` and `<image>` appended (ids 32000, 32001; their rows train). The table
# is padded to 32,128 rows, a multiple of 128, so that it splits over 16-, 64- or 128-way
# tensor parallelism (32,002 splits over none); the rows past 32,001 are never used.
CHINCHILLA_VOCAB = 32000
PAPER_EOC_TOKEN_ID = 32000  # `<|endofchunk|>`
PAPER_MEDIA_TOKEN_ID = 32001  # `<image>`
PAPER_VOCAB = 32128


def chinchilla(d_model: int, num_layers: int, num_heads: int, mlp_dim: int) -> dict:
  """A Chinchilla-shaped LM on the LLaMA layer (RMSNorm, RoPE, gated FFW), 32k
  SentencePiece vocabulary plus Flamingo's two tokens (PAPER_VOCAB), untied head.
  `mlp_dim` is chosen per size to reproduce the paper's LM parameter count (Chinchilla's
  own FFW differs from a plain 4·D)."""
  return dict(family="llama", vocab_size=PAPER_VOCAB, d_model=d_model, num_layers=num_layers,
              num_heads=num_heads, mlp_dim=mlp_dim, activation="silu", norm_eps=1e-6,
              tie_embeddings=False, max_seq_len=2048)


# OpenFlamingo's LMs. Vocabulary: the 50,277-token GPT-NeoX tokenizer plus `<|endofchunk|>`,
# `<image>` and `<PAD>`; OpenFlamingo resizes the embeddings to len(tokenizer) = 50,280.
OPENFLAMINGO_VOCAB = 50280
OPENFLAMINGO_MEDIA_TOKEN_ID = 50278  # `<image>`
OPENFLAMINGO_EOC_TOKEN_ID = 50277  # `<|endofchunk|>`


def mpt(d_model: int, num_layers: int, num_heads: int, qk_norm: bool = False) -> dict:
  """MPT (mosaicml): ALiBi, bias-free LayerNorm and linears, GELU FFW at 4·D, tied.
  `qk_norm`: MPT-1B (MosaicGPT) LayerNorms q and k; MPT-7B does not."""
  return dict(family="mpt", vocab_size=OPENFLAMINGO_VOCAB, d_model=d_model,
              num_layers=num_layers, num_heads=num_heads, mlp_dim=4 * d_model,
              activation="gelu", use_bias=False, tie_embeddings=True, alibi_bias_max=8.0,
              qk_norm=qk_norm, max_seq_len=2048)


def redpajama_incite_3b() -> dict:
  """RedPajama-INCITE-Base-3B-v1 (GPT-NeoX), as in its config.json."""
  return dict(family="gpt_neox", vocab_size=OPENFLAMINGO_VOCAB, d_model=2560, num_layers=32,
              num_heads=32, mlp_dim=10240, activation="gelu", use_bias=True,
              tie_embeddings=False, rotary_pct=1.0, parallel_residual=False,
              max_seq_len=2048)


# ---------------------------------------------------------------- whole models

def flamingo(*, d_model: int, num_layers: int, num_heads: int, lm_mlp_dim: int, every: int,
             xattn_ff_dim: int) -> dict:
  """The paper's models: NFNet-F6, its resampler, a Chinchilla-shaped LM, bf16 activations."""
  return dict(
      vision=nfnet_f6(),
      resampler=paper_resampler(),
      lm=chinchilla(d_model=d_model, num_layers=num_layers, num_heads=num_heads, mlp_dim=lm_mlp_dim),
      xattn=paper_xattn(every=every, num_heads=num_heads, ff_dim=xattn_ff_dim),
      media_token_id=PAPER_MEDIA_TOKEN_ID,
      eoc_token_id=PAPER_EOC_TOKEN_ID,
      trainable_token_ids=(PAPER_EOC_TOKEN_ID, PAPER_MEDIA_TOKEN_ID),
      dtype="bfloat16",
      remat_policy="full",
      # NFNet-F6's forward over flamingo_3b's 44 images a v4 chip compiles (tanh GELU,
      # this 2-core machine) in 34-38 s 4 images at a time, 25 s 2 at a time, 21 s one at a
      # time. 4: at 1 or 2 the last stage's convs (10 x 10 positions an image) read each
      # weight byte for only ~100 or ~200 FLOPs, below v4's ~230 (memory bound); the run
      # time of none is measured.
      vision_chunk=4,
  )


def openflamingo(lm: dict, every: int) -> dict:
  """OpenFlamingo v2: CLIP ViT-L/14, its resampler, `lm` with xattn every `every` layers."""
  return dict(
      vision=clip_vit_l14(),
      resampler=openflamingo_resampler(),
      lm=lm,
      xattn=openflamingo_xattn(every=every),
      media_token_id=OPENFLAMINGO_MEDIA_TOKEN_ID,
      eoc_token_id=OPENFLAMINGO_EOC_TOKEN_ID,
      trainable_token_ids=(OPENFLAMINGO_EOC_TOKEN_ID, OPENFLAMINGO_MEDIA_TOKEN_ID),
      dtype="bfloat16",
      remat_policy="full",
  )


# ---------------------------------------------------------------- training data

# The paper's mixture (§3; Table 6 ablation batch sizes): name → (batch, weight λ, shapes).
PAPER_MIXTURE = dict(
    m3w=(256, 1.0, dict(seq_len=256, max_images=5)),
    align=(512, 0.2, dict(seq_len=32)),
    ltip=(512, 0.2, dict(seq_len=64)),
    vtp=(64, 0.03, dict(seq_len=32, num_frames=8)),
)


def paper_data(source: str = "random", batch_sizes: dict | None = None) -> dict:
  """The paper's training mixture. source='random': random batches of its shapes (320 px
  images, 256 tokens with up to 5 images for M3W, 8-frame clips for VTP): the config
  starts anywhere, for smoke runs, benchmarks and train_compile.py. source='prepared':
  the datasets prepared with `python -m flamingo_jax.data.prepare`; set each `path` (and
  the LM's `tokenizer`) on the command line, e.g. --config.data.m3w.path=/data/m3w.
  `batch_sizes`: name → batch, replacing the paper's 256 / 512 / 512 / 64."""
  if source not in ("random", "prepared"):
    raise ValueError(f"paper_data: source {source!r}; choose 'random' or 'prepared'")
  out = {}
  for name, (batch, weight, shapes) in PAPER_MIXTURE.items():
    batch = (batch_sizes or {}).get(name, batch)
    if source == "random":
      out[name] = dict(source="random", batch_size=batch, weight=weight, image_size=320,
                       **{"max_images": 1, "num_frames": 1, **shapes})
    else:
      kind = {"m3w": dict(kind="mmc4"), "vtp": dict(kind="video")}.get(name, {})
      out[name] = dict(source="prepared", path="", tokenizer="", rules="paper",
                       image_mode="paper", image_size=320, batch_size=batch, weight=weight,
                       **kind, **shapes)
  return out


def openflamingo_data() -> dict:
  """OpenFlamingo's mixture: MMC4 (256 tokens, up to 6 images, weight 1) and LAION-2B pairs
  (32 tokens, weight 0.2; as webdataset shards, OpenFlamingo's format), with its labelling
  rules and CLIP preprocessing. The kinds fix the batch shapes (train_compile.py). The batch sizes
  are a starting point for a pod, not theirs (theirs were per GPU)."""
  prepared = lambda **kw: dict(source="prepared", path="", tokenizer="", rules="openflamingo",
                               image_mode="clip", image_size=224, **kw)
  return dict(
      mmc4=prepared(batch_size=512, weight=1.0, seq_len=256, max_images=6, kind="mmc4"),
      laion=prepared(batch_size=1024, weight=0.2, seq_len=32, kind="webdataset"),
  )
