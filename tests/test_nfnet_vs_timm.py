"""Our NFNet vs a tiny random timm NormFreeNet built like dm_nfnet_f*, float32."""
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from timm.models.nfnet import NfCfg, NormFreeNet

from flamingo_jax import vision
from flamingo_jax.config import ConfigError, NFNetConfig
from flamingo_jax.convert import vision as convert
from flamingo_jax.convert.state_dict import CheckpointMismatchError, check_tree
from flamingo_jax.vision.nfnet import NFStage, standardize_weight
from parity import assert_parity, relative_error

DEPTHS, WIDTHS, STEM, GROUP = (1, 2, 2, 1), (32, 64, 96, 128), 32, 16
# dm_nfnet_f*'s NfCfg (timm _dm_nfnet_cfg), shrunk.
TIMM_CFG = NfCfg(
    depths=DEPTHS, channels=WIDTHS, stem_type="deep_quad", stem_chs=STEM, group_size=GROUP,
    bottle_ratio=0.5, extra_conv=True, gamma_in_act=True, same_padding=True, skipinit=True,
    num_features=2 * WIDTHS[-1], act_layer="gelu", attn_layer="se", attn_kwargs=dict(rd_ratio=0.5))
CONFIG = NFNetConfig(variant="F0", image_size=72, depths=DEPTHS, widths=WIDTHS, stem_width=STEM,
                     group_width=GROUP)
# Non-square, and odd grids in the later stages: exercises TF-'SAME' padding and the
# ceil-mode average pool of the shortcut.
H, W = 72, 56


@pytest.fixture(scope="module")
def timm_model():
  torch.manual_seed(0)
  model = NormFreeNet(TIMM_CFG, num_classes=10)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("skipinit_gain"):  # init 0 would hide every residual branch
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      else:
        p.add_(0.1 * torch.randn(p.shape, generator=g))
  return model.eval()


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).normal(size=(2, H, W, 3)).astype(np.float32)


def _expected_params(config, images):
  model = vision.build(config)
  return model, nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), images))["params"]


@pytest.fixture(scope="module")
def timm_features(timm_model, images):
  with torch.no_grad():
    out = timm_model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2))
  n, c, h, w = out.shape
  return out.permute(0, 2, 3, 1).reshape(n, h * w, c).numpy()


def test_nfnet_matches_timm(timm_model, images, timm_features):
  params = convert.nfnet_params_from_timm(timm_model.state_dict(), CONFIG)
  model, expected = _expected_params(CONFIG, images)
  check_tree(params, expected)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, images))
  assert ours.shape == (2, 3 * 2, CONFIG.out_dim)
  print(f"NFNet vs timm: max rel err {relative_error(ours, timm_features):.2e}")
  assert_parity(ours, timm_features)


def test_stochastic_depth_drops_whole_examples_only_when_not_deterministic():
  # One stage (transition block + 2 scanned blocks) keeps the compile small.
  config = NFNetConfig(**{**CONFIG.__dict__, "stochastic_depth_rate": 0.5})
  x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 6, 6, 16)), jnp.float32)
  betas = jnp.array([1.0, 0.9, 0.8])
  shapes = nn.unbox(jax.eval_shape(NFStage(config, 32, 2).init, jax.random.PRNGKey(0), x, betas, betas))
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) + 1, shapes)

  @jax.jit
  def run(rates, key):
    frozen = NFStage(config, 32, 2, deterministic=True).apply(params, x, betas, rates)
    dropped = NFStage(config, 32, 2, deterministic=False).apply(
        params, x, betas, rates, rngs={"dropout": key})
    # Reference for rate 1 everywhere: every residual branch gone, only the shortcut left.
    no_branch = jax.tree_util.tree_map_with_path(
        lambda p, v: 0 * v if "skip_gain" in jax.tree_util.keystr(p) else v, params)
    shortcut_only = NFStage(config, 32, 2).apply(no_branch, x, betas, rates)
    return frozen, dropped, shortcut_only

  key = jax.random.PRNGKey(3)
  frozen, dropped, _ = run(jnp.array([0.5, 0.0, 0.0]), key)
  same = np.abs(frozen - dropped).max(axis=(1, 2, 3)) <= 1e-5 * np.abs(frozen).max()
  assert 0 < same.sum() < len(same)  # whole examples dropped, by the rng
  _, dropped, shortcut_only = run(jnp.array([1.0, 1.0, 1.0]), key)  # scanned blocks too
  assert_parity(dropped, shortcut_only, rtol=1e-5)
  frozen0, dropped0, _ = run(jnp.zeros(3), key)
  assert_parity(dropped0, frozen0, rtol=1e-5)


def test_f0_param_count_matches_timm_without_head():
  with torch.device("meta"):
    ref = timm.create_model("dm_nfnet_f0", pretrained=False)
  head = sum(p.numel() for n, p in ref.named_parameters() if n.startswith("head.fc."))
  want = sum(p.numel() for p in ref.parameters()) - head
  config = convert.nfnet_config_from_timm("timm/dm_nfnet_f0.dm_in1k")
  assert config.stage_depths == (1, 2, 6, 3) and config.image_size == 256
  shapes = jax.eval_shape(vision.build(config).init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == want


def test_variant_depths():
  assert NFNetConfig(variant="F6").stage_depths == (7, 14, 42, 21)
  assert NFNetConfig(variant="F7").stage_depths == (8, 16, 48, 24)
  assert NFNetConfig().out_dim == 3072
  with pytest.raises(ConfigError, match="group_width"):
    NFNetConfig(widths=(32, 64, 96, 128), group_width=128).check()
  with pytest.raises(ValueError, match="nfnet_f0"):
    convert.nfnet_config_from_timm("nfnet_f0")


def test_mismatched_timm_state_dict_names_every_key(timm_model):
  sd = dict(timm_model.state_dict())
  del sd["stages.2.1.conv2b.gain"]
  sd["stages.0.0.attn_last.fc1.weight"] = torch.zeros(8, WIDTHS[0], 1, 1)
  sd["stages.3.0.extra.weight"] = torch.zeros(1)
  with pytest.raises(CheckpointMismatchError) as e:
    convert.nfnet_params_from_timm(sd, CONFIG)
  for key in ("stages.2.1.conv2b.gain", "stages.0.0.attn_last.fc1.weight", "stages.3.0.extra.weight"):
    assert key in str(e.value)
  # A deeper config than the checkpoint: the absent blocks are named.
  deeper = NFNetConfig(**{**CONFIG.__dict__, "depths": (1, 2, 3, 1)})
  with pytest.raises(CheckpointMismatchError, match=r"stages\.2\.2\.conv1\.weight"):
    convert.nfnet_params_from_timm(timm_model.state_dict(), deeper)


def _haiku_layout(timm_sd) -> dict:
  """timm dm_nfnet keys → DeepMind's Haiku names, written independently of the converter:
  Haiku numbers nf_block modules over the whole network, in order."""
  stem = {f"stem.conv{i + 1}": f"stem_conv{i}" for i in range(4)}
  conv = {"conv1": "conv0", "conv2": "conv1", "conv2b": "conv1b", "conv3": "conv2",
          "downsample.conv": "conv_shortcut"}
  blocks = sorted({tuple(int(i) for i in k.split(".")[1:3]) for k in timm_sd if k.startswith("stages.")})
  order = {sb: ("nf_block" if n == 0 else f"nf_block_{n}") for n, sb in enumerate(blocks)}
  out = {}
  for key, t in timm_sd.items():
    t = t.numpy()
    module, param = key.rsplit(".", 1)
    if module == "head.fc":
      out[f"NFNet/~/linear/{'w' if param == 'weight' else 'b'}"] = t.T
      continue
    if key.startswith("stages."):
      _, s, b, rest = module.split(".", 3) if module.count(".") >= 3 else (*module.split("."), "")
      prefix = f"NFNet/~/{order[(int(s), int(b))]}"
      if param == "skipinit_gain":
        out[f"{prefix}/skip_gain"] = t
        continue
      if rest.startswith("attn_last."):
        lin = {"fc1": "linear", "fc2": "linear_1"}[rest.split(".")[1]]
        name = f"{prefix}/~/squeeze_excite/~/{lin}"
        out[f"{name}/{'w' if param == 'weight' else 'b'}"] = t[:, :, 0, 0].T if t.ndim == 4 else t
        continue
      name = f"{prefix}/~/{conv[rest]}"
    else:
      name = f"NFNet/~/{stem.get(module, module)}"
    out[f"{name}/" + {"weight": "w", "bias": "bias", "gain": "gain"}[param]] = (
        t.transpose(2, 3, 1, 0) if param == "weight" else t.reshape(-1) if param == "gain" else t)
  return out


def test_haiku_layout_converts_to_the_same_params(timm_model, tmp_path):
  want = convert.nfnet_params_from_timm(timm_model.state_dict(), CONFIG)
  flat = _haiku_layout(timm_model.state_dict())
  np.savez(tmp_path / "flat.npz", **flat)
  nested = {}
  for key, v in flat.items():
    module, param = key.rsplit("/", 1)
    nested.setdefault(module, {})[param] = v
  with open(tmp_path / "F_haiku.npz", "wb") as f:  # DeepMind's files: pickles despite the name
    pickle.dump(nested, f)
  for source in (str(tmp_path / "flat.npz"), str(tmp_path / "F_haiku.npz"), nested):
    got = convert.nfnet_params_from_haiku(source, CONFIG)
    jax.tree.map(np.testing.assert_array_equal, got, want)
  del flat["NFNet/~/nf_block_3/~/conv1b/gain"]
  with pytest.raises(CheckpointMismatchError, match="nf_block_3/~/conv1b/gain"):
    convert.nfnet_params_from_haiku(flat, CONFIG)


def test_weight_standardization_formulas():
  w = np.random.default_rng(0).normal(size=(3, 3, 4, 5)).astype(np.float32) * 0.01
  gain = np.linspace(0.5, 1.5, 5).astype(np.float32)
  fan_in = 3 * 3 * 4
  mean, var = w.mean(axis=(0, 1, 2)), w.var(axis=(0, 1, 2))
  timm_ref = (w - mean) / np.sqrt(var + 1e-5) * gain / np.sqrt(fan_in)
  dm_ref = (w - mean) * gain / np.sqrt(np.maximum(var * fan_in, 1e-4))
  np.testing.assert_allclose(standardize_weight(w, gain, "timm"), timm_ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(standardize_weight(w, gain, "deepmind"), dm_ref, rtol=1e-5, atol=1e-7)
