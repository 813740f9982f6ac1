"""Configs: published parameter counts, the summary CLI, and config errors that name the field."""
import json
import os
import subprocess
import sys

import pytest

from config_files import ROOT, load_config
from flamingo_jax import summary
from flamingo_jax.config import ConfigError, FlamingoConfig

# (config, published total, published trainable, tolerance): the paper's Tables 4-5 within
# 3%; OpenFlamingo's trainable counts (embeddings aside) within 0.5%.
PUBLISHED = [
    ("flamingo_3b", 3.2e9, 1.4e9, 0.03),
    ("flamingo_9b", 9.3e9, 1.8e9, 0.03),
    ("flamingo_80b", 80e9, 10.2e9, 0.03),
    ("openflamingo_3b", None, 944.0e6, 0.005),
    ("openflamingo_4b", None, 960.8e6, 0.005),
    ("openflamingo_9b", None, 1178.8e6, 0.005),
]


@pytest.mark.parametrize("name,total,trainable,tol", PUBLISHED)
def test_published_parameter_counts(name, total, trainable, tol):
  config = load_config(name)
  counts = summary.count(FlamingoConfig.from_dict(config.model), tuple(config.trainable))
  assert counts["trainable"] == pytest.approx(trainable, rel=tol)
  if total is not None:
    assert counts["total"] == pytest.approx(total, rel=tol)
  assert counts["total"] == counts["trainable"] + counts["frozen"]
  parts = counts["components"]
  assert parts["vision"]["trainable"] == parts["lm"]["trainable"] == 0
  assert parts["resampler"]["frozen"] == parts["xattn"]["frozen"] == 0
  # Of the embeddings only the new tokens' rows train (at most 2 rows in and 2 out).
  assert parts["embeddings"]["trainable"] <= 4 * config.model.lm.d_model


def test_vision_towers_match_reference_counts():
  # NFNet-F6 (paper: 435M); CLIP ViT-L/14 tower 303,966,208 less its unused output
  # projection (1024 x 768) and final LayerNorm (2 x 1024).
  nfnet = summary.count(FlamingoConfig.from_dict(load_config("flamingo_3b").model))
  assert nfnet["components"]["vision"]["total"] == pytest.approx(435e6, rel=0.005)
  vit = summary.count(FlamingoConfig.from_dict(load_config("openflamingo_3b").model))
  assert vit["components"]["vision"]["total"] == 303_966_208 - 1024 * 768 - 2 * 1024
  assert vit["components"]["resampler"]["total"] == 63_019_008


def test_summary_cli_json():
  out = subprocess.run([sys.executable, "-m", "flamingo_jax.summary", "--config",
                        os.path.join(ROOT, "configs", "tiny.py"), "--json"],
                       capture_output=True, text=True, check=True, cwd=ROOT)
  counts = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(counts) == {"total", "trainable", "frozen", "components"}
  assert set(counts["components"]) == set(summary.COMPONENTS)
  assert counts["total"] == counts["trainable"] + counts["frozen"] > 0


def _tiny_with(**changes):
  model = load_config("tiny").model.to_dict()
  for dotted, value in changes.items():
    *parents, leaf = dotted.split("__")
    node = model
    for p in parents:
      node = node[p]
    node[leaf] = value
  return model


@pytest.mark.parametrize("change,field", [
    (dict(xattn__every=9), "xattn.every"),
    (dict(xattn__placement="middle"), "xattn.placement"),
    (dict(lm__num_heads=5), "lm.num_heads"),
    (dict(lm__num_kv_heads=3), "lm.num_kv_heads"),
    (dict(lm__family="gpt2"), "lm.family"),
    (dict(vision__num_heads=3), "vision.num_heads"),
    (dict(vision__patch_size=7), "vision.patch_size"),
    (dict(vision__kind="resnet"), "vision.kind"),
    (dict(resampler__activation="swish"), "resampler.activation"),
    (dict(xattn__heads=4), "xattn.heads"),
    (dict(media_token_id=1000), "media_token_id"),
    (dict(dtype="float8"), "dtype"),
    (dict(vision_chunk=-1), "vision_chunk"),
])
def test_bad_config_names_the_field(change, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    FlamingoConfig.from_dict(_tiny_with(**change))
