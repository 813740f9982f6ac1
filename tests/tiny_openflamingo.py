"""Tiny OpenFlamingo models built offline, saved the way OpenFlamingo's users get them.

`build(tmp, family)` writes to `tmp`:
  tokenizer/     a byte-level BPE trained here, as an HF tokenizer directory
  lm/            the frozen HF LM (config.json + weights), original vocabulary
  vision.pt      the open_clip CLIP state dict (text tower included, as released)
  checkpoint.pt  OpenFlamingo's trainable state dict, filtered as their training saves it
and returns the reference `open_flamingo.Flamingo` (eval mode, float32) with the
vision config and the tokenizer it used.

Importing this module needs torch, transformers, open_clip and open_flamingo (the
reference stack); tests import it through `pytest.importorskip`.
"""
import os

import numpy as np
import torch

# open_clip >= 2.23 layer-norms the returned patch tokens unless the final LN is applied
# after pooling; OpenFlamingo's weights expect the older, un-normalised tokens.
VISION_CFG = dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8,
                  final_ln_after_pool=True)
TEXT_CFG = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
CROSS_ATTN_EVERY = 2
LM_LAYERS = 4
LM_DIM = 64

_CORPUS = [
    "a photo of a cat sitting on a mat", "two dogs play in the park",
    "an image of a red car parked near the house", "the quick brown fox jumps over the lazy dog",
    "Question: what is in the picture? Short answer: a bird", "Output: a plate of food",
] * 4


def make_tokenizer(path: str):
  """A ~300-token byte-level BPE with an eos and no pad token (like GPT-NeoX / MPT)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_CORPUS, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                 bos_token="<|endoftext|>", unk_token="<|endoftext|>")
  fast.save_pretrained(path)
  return fast


def make_lm(family: str, vocab_size: int):
  import transformers as tf
  if family == "mpt":
    config = tf.MptConfig(d_model=LM_DIM, n_heads=4, n_layers=LM_LAYERS,
                          vocab_size=vocab_size, max_seq_len=64)
    attr = "transformer.blocks"
  elif family == "llama":
    config = tf.LlamaConfig(hidden_size=LM_DIM, intermediate_size=96, num_hidden_layers=LM_LAYERS,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                            max_position_embeddings=64, tie_word_embeddings=False)
    attr = "model.layers"
  elif family == "gpt_neox":
    config = tf.GPTNeoXConfig(hidden_size=LM_DIM, intermediate_size=128, num_hidden_layers=LM_LAYERS,
                              num_attention_heads=4, vocab_size=vocab_size, rotary_pct=0.5,
                              max_position_embeddings=64, tie_word_embeddings=False)
    attr = "gpt_neox.layers"
  else:
    raise ValueError(family)
  config._attn_implementation = "eager"
  lm = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  with torch.no_grad():  # HF inits some norms / biases to constants: randomise everything
    for p in lm.parameters():
      p.normal_(0, 0.5 if p.ndim == 1 else 0.1)
  return lm.float().eval(), attr


def _randomise(module: torch.nn.Module, scale: float = 0.2) -> None:
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "gate" in name:
        p.uniform_(0.5, 1.0)  # non-zero: the blocks must change the logits
      elif name.endswith("weight") and p.ndim == 1:  # LayerNorm scales
        p.normal_(1.0, 0.1)
      else:
        p.normal_(0, scale if p.ndim > 1 and "latents" not in name else 1.0)


def trainable_state_dict(model) -> dict:
  """OpenFlamingo's `filter_state_dict_to_trainable` rule (train_utils.py), re-derived: drop
  frozen parameters except those named `embed`, and the duplicate module paths."""
  sd = model.state_dict()
  for name, p in model.named_parameters():
    if "embed" in name or p.requires_grad:
      continue
    sd.pop(name, None)
  drop = ("lang_encoder.old_decoder_blocks", "lang_encoder.gated_cross_attn_layers", "vision_encoder")
  return {k: v for k, v in sd.items() if not any(d in k for d in drop)}


def build(tmp: str, family: str, seed: int = 0):
  """Writes the four artefacts to `tmp`; returns (reference Flamingo, vision model cfg, tokenizer)."""
  import open_clip
  from open_flamingo import Flamingo
  from open_flamingo.src.flamingo_lm import FlamingoLMMixin
  from open_flamingo.src.utils import extend_instance

  torch.manual_seed(seed)
  tokenizer = make_tokenizer(os.path.join(tmp, "tokenizer"))
  base_vocab = len(tokenizer)

  clip_cfg = dict(embed_dim=16, vision_cfg=dict(VISION_CFG), text_cfg=dict(TEXT_CFG))
  clip = open_clip.model.CLIP(**clip_cfg)
  with torch.no_grad():
    for name, p in clip.named_parameters():
      if name.endswith("weight") and p.ndim == 1:
        p.normal_(1.0, 0.1)
      else:
        p.normal_(0, 0.1 if p.ndim > 1 else 0.3)
  torch.save(clip.state_dict(), os.path.join(tmp, "vision.pt"))
  clip.visual.output_tokens = True

  lm, attr = make_lm(family, base_vocab)
  lm.save_pretrained(os.path.join(tmp, "lm"), safe_serialization=True)

  # What OpenFlamingo's factory does (re-stated, not imported, so the steps are visible).
  tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
  if tokenizer.pad_token is None:
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
  extend_instance(lm, FlamingoLMMixin)
  lm.set_decoder_layers_attr_name(attr)
  lm.resize_token_embeddings(len(tokenizer))
  model = Flamingo(clip, lm, tokenizer.encode("<|endofchunk|>")[-1], tokenizer.encode("<image>")[-1],
                   vis_dim=VISION_CFG["width"], cross_attn_every_n_layers=CROSS_ATTN_EVERY)
  model.requires_grad_(False)
  model.perceiver.requires_grad_(True)
  model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
  model.lang_encoder.get_input_embeddings().requires_grad_(True)

  # "Training": randomise everything trainable, the new token rows included.
  _randomise(model.perceiver)
  _randomise(model.lang_encoder.gated_cross_attn_layers)
  with torch.no_grad():
    model.lang_encoder.get_input_embeddings().weight.normal_(0, 0.1)
    out = model.lang_encoder.get_output_embeddings()
    if out.weight is not model.lang_encoder.get_input_embeddings().weight:
      # The new output rows are untrained and not saved for LMs whose output embedding is
      # not named `embed` (LLaMA's lm_head): HF's resize fills them with (about) the mean of
      # the old rows; the loader uses exactly that mean.
      out.weight[base_vocab:] = out.weight[:base_vocab].mean(0)
  model.float().eval()
  torch.save({"epoch": 0, "model_state_dict": trainable_state_dict(model)},
             os.path.join(tmp, "checkpoint.pt"))
  return model, clip_cfg, tokenizer


def batch(tokenizer, seed: int = 0):
  """Two rows, two interleaved images each, text before the first image, row 1 right-padded.
  Returns (input_ids, attention_mask) int64 numpy and images [B, M, F, H, W, C] float32."""
  rows = ["a photo<image>of a cat<|endofchunk|>then<image>two dogs play<|endofchunk|>",
          "Output:<image>a red car<|endofchunk|><image>food"]
  tokenizer.padding_side = "right"
  enc = tokenizer(rows, padding="longest", return_tensors="np")
  ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
  assert mask[1].min() == 0 and mask[0].min() == 1, "row 1 must be padded"
  size = VISION_CFG["image_size"]
  images = np.random.default_rng(seed).normal(size=(2, 2, 1, size, size, 3)).astype(np.float32)
  return ids, mask, images


def reference_logits(model, ids, mask, images) -> np.ndarray:
  vision_x = torch.from_numpy(images).permute(0, 1, 2, 5, 3, 4).contiguous()  # NHWC → NCHW
  with torch.no_grad():
    out = model(vision_x=vision_x, lang_x=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask))
  return out.logits.float().numpy()


def convert(root: str, family: str = "mpt"):
  """`build` into `root`, then the convert CLI into root/converted. Returns (reference
  Flamingo, tokenizer, the converted directory)."""
  import json

  from flamingo_jax.convert import openflamingo as of
  reference, clip_cfg, tokenizer = build(root, family)
  clip_json = os.path.join(root, "clip.json")
  with open(clip_json, "w") as f:
    json.dump(clip_cfg, f)
  out = os.path.join(root, "converted")
  of.main(["--checkpoint", f"{root}/checkpoint.pt", "--vision", f"{root}/vision.pt",
           "--vision_config", clip_json, "--lm", f"{root}/lm", "--tokenizer", f"{root}/tokenizer",
           "--cross_attn_every_n_layers", str(CROSS_ATTN_EVERY), "--output", out])
  return reference, tokenizer, out
