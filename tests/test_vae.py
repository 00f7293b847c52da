"""SD-VAE: parity with diffusers' AutoencoderKL (fixtures written by its own code, run by
tests/parity/make_vae_fixtures.py; no torch here), size, and bad folders."""

import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import numpy as safetensors_numpy

from sgjax import sharding
from sgjax.models import vae

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parity", "fixtures", "vae")
VAE_DIR = os.path.join(FIXTURES, "vae")


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def test_encode_and_decode_match_diffusers():
  with np.load(os.path.join(FIXTURES, "vae_io.npz")) as f:
    data = {k: f[k] for k in f.files}
  model = vae.load(VAE_DIR)
  mean, std = model.encode(nhwc(data["images"]))
  chex.assert_trees_all_close((mean, std), (nhwc(data["mean"]), nhwc(data["std"])), atol=1e-5,
                              rtol=0)
  decoded = model.decode(nhwc(data["latents"]))
  chex.assert_trees_all_close(decoded, nhwc(data["decoded"]), atol=1e-5, rtol=0)
  assert np.abs(data["decoded"]).max() > 0.5 and np.ptp(data["std"]) > 0.1  # not trivial
  # Sharded over 8 devices, in bf16 too (float32 norms and posterior).
  encode, decode = vae.batch_codec(model, sharding.make_mesh("data"))
  images = np.concatenate([nhwc(data["images"])] * 4)
  chex.assert_trees_all_close(encode(images)[0][:2], mean, rtol=1e-6, atol=1e-5)
  bf16 = vae.load(VAE_DIR, dtype="bfloat16")
  error = np.abs(np.asarray(bf16.decode(nhwc(data["latents"]))) - nhwc(data["decoded"])).max()
  assert error < 0.1, error


def test_sd_vae_architecture_has_diffusers_parameter_count():
  # diffusers.AutoencoderKL with sd-vae-ft-ema's config.json: 83,653,863 parameters.
  abstract = nnx.eval_shape(lambda: vae.AutoencoderKL(vae.VAEConfig(), rngs=nnx.Rngs(0)))
  assert sum(p.size for p in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == 83_653_863
  assert vae.VAEConfig().downsample_factor == 8


def _copy(tmp_path):
  folder = str(tmp_path / "vae")
  shutil.copytree(VAE_DIR, folder)
  return folder


def test_bad_vae_folders_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no diffusion_pytorch_model.safetensors"):
    os.makedirs(tmp_path / "empty")
    shutil.copy(os.path.join(VAE_DIR, "config.json"), tmp_path / "empty")
    vae.load(str(tmp_path / "empty"))
  folder = _copy(tmp_path)
  weights_file = os.path.join(folder, vae.WEIGHTS_FILE)
  weights = safetensors_numpy.load_file(weights_file)
  weights["encoder.extra.weight"] = np.zeros(2, np.float32)
  del weights["decoder.conv_out.bias"]
  safetensors_numpy.save_file(weights, weights_file)
  with pytest.raises(ValueError, match=r"unexpected keys: \['encoder.extra.weight'\]\n"
                                       r"  missing keys: \['decoder.conv_out.bias'\]"):
    vae.load(folder)
  with open(os.path.join(folder, vae.CONFIG_FILE)) as f:
    config = json.load(f)
  config["use_quant_conv"] = False
  with open(os.path.join(folder, vae.CONFIG_FILE), "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="use_quant_conv=False is not supported"):
    vae.read_config(folder)


def test_legacy_attention_names_load():
  weights = safetensors_numpy.load_file(os.path.join(VAE_DIR, vae.WEIGHTS_FILE))
  legacy = {}
  for key, value in weights.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      key = key.replace(f".{new}.", f".{old}.")
    legacy[key] = value
  assert legacy.keys() != weights.keys()
  model, reference = vae.load(VAE_DIR), vae.load(VAE_DIR)
  vae.load_weights(model, legacy, "legacy")
  chex.assert_trees_all_equal(nnx.state(model, nnx.Param), nnx.state(reference, nnx.Param))
