"""sgjax.plan: per-device bytes from an abstract mesh equal what training allocates."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import digits, imagenet256
from sgjax import config as config_lib, plan, sharding, train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE_ITEMS = ("params", "ema", "opt_state")


def _real_state(config, preset, tensor=1):
  model_cfg = config_lib.model_config(config.model)
  tx = train_state.make_optimizer(train_state.OptimConfig.from_train_config(config.train))
  mesh = sharding.make_mesh(preset, tensor)  # the 8 fake CPU devices
  return model_cfg, tx, train_state.abstract_state(model_cfg, tx, mesh, preset, config.seed)


def _nbytes(leaf_shape, dtype):
  return math.prod(leaf_shape) * np.dtype(dtype).itemsize


@pytest.mark.parametrize("preset, tensor", [("data", 1), ("fsdp", 1), ("fsdp_tensor", 2)])
def test_state_bytes_match_the_abstract_state_on_real_devices_exactly(preset, tensor):
  config = digits.get_config("runlocal")
  got = plan.make_plan(config, preset=preset, devices=8, tensor=tensor, activations=False)
  _, _, (_, abstract, _) = _real_state(config, preset, tensor)
  for name in STATE_ITEMS:
    leaves = jax.tree.leaves(abstract[name])
    assert got["global_bytes"][name] == sum(_nbytes(l.shape, l.dtype) for l in leaves)
    assert got["per_device_bytes"][name] == sum(
        _nbytes(l.sharding.shard_shape(l.shape), l.dtype) for l in leaves), name
  assert got["per_device_bytes"]["grads"] == got["per_device_bytes"]["params"]
  assert got["num_params"] == sum(math.prod(l.shape) for l in jax.tree.leaves(
      abstract["params"]))
  if preset == "data":
    assert got["per_device_bytes"]["params"] == got["global_bytes"]["params"]
  else:  # most parameters are split: far less than a full copy per device
    assert got["per_device_bytes"]["params"] < got["global_bytes"]["params"] / 2


def test_plan_matches_the_buffers_a_fresh_train_state_allocates():
  config = digits.get_config("runlocal")
  got = plan.make_plan(config, preset="fsdp", devices=8, activations=False)
  model_cfg, tx, (_, _, shardings) = _real_state(config, "fsdp")
  state = train_state.init_state(model_cfg, tx, shardings, config.seed)
  device = jax.devices()[0]
  for name in STATE_ITEMS:
    on_device = sum(shard.data.nbytes for leaf in jax.tree.leaves(state[name])
                    for shard in leaf.addressable_shards if shard.device == device)
    assert got["per_device_bytes"][name] == on_device, name


def test_sharding_specs_on_the_abstract_mesh_equal_the_real_ones():
  config = digits.get_config("runlocal")
  model_cfg, tx, (_, real, _) = _real_state(config, "fsdp_tensor", 2)
  mesh = plan.abstract_mesh("fsdp_tensor", 8, 2)
  _, abstract, _ = train_state.abstract_state(model_cfg, tx, mesh, "fsdp_tensor", config.seed)
  for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
    assert a.sharding.spec == r.sharding.spec
    assert plan.shard_shape(a.shape, a.sharding) == r.sharding.shard_shape(r.shape)


def test_sit_xl_fsdp_numbers_and_memory_flag():
  config = imagenet256.get_config("model=SiT-XL/2")
  got = plan.make_plan(config, preset="fsdp", devices=8, batch=256, device_memory_gib=1.0,
                       activations=False)
  assert 670e6 < got["num_params"] < 680e6  # SiT-XL/2: 675M
  assert got["global_bytes"]["params"] == 4 * got["num_params"]  # float32 parameters
  assert got["global_bytes"]["opt_state"] > 2 * got["global_bytes"]["params"]  # Adam mu, nu
  assert got["batch"] == {"global": 256, "per_device": 32}
  assert got["fits"] is False
  assert "EXCEEDS device memory" in plan.format_table(got)


def test_activation_estimate_grows_with_the_per_device_batch():
  config = digits.get_config("runlocal")
  small = plan.make_plan(config, preset="fsdp", devices=8, batch=32)
  large = plan.make_plan(config, preset="fsdp", devices=8, batch=64)
  a, b = small["per_device_bytes"]["activations"], large["per_device_bytes"]["activations"]
  assert 0 < a and 1.8 * a < b <= 2 * a
  assert small["per_device_bytes"]["total"] == sum(small["per_device_bytes"][k]
                                                   for k in plan.ITEMS)


def test_remat_shrinks_the_activation_estimate_and_nothing_else():
  plans = {}
  for remat in ("none", "dots", "full"):
    config = digits.get_config("runlocal")
    config.model.remat = remat
    plans[remat] = plan.make_plan(config, preset="fsdp", devices=8, batch=64)
  acts = {k: p["per_device_bytes"]["activations"] for k, p in plans.items()}
  assert 0 < acts["full"] < acts["dots"] < acts["none"]
  assert acts["full"] < acts["none"] / 3
  for k in ("params", "ema", "opt_state", "grads"):
    assert len({p["per_device_bytes"][k] for p in plans.values()}) == 1


def test_cudnn_attention_plans_off_gpu_with_the_xla_trace_as_upper_bound():
  plans = {}
  for attention in ("xla", "cudnn"):
    config = digits.get_config("runlocal")
    config.model.update(dtype="bfloat16", attention=attention)
    plans[attention] = plan.make_plan(config, preset="fsdp", devices=8, batch=64)
  assert plans["cudnn"]["config"]["attention"] == "cudnn"
  assert plans["cudnn"]["per_device_bytes"] == plans["xla"]["per_device_bytes"]
  assert "attention cudnn" in plan.format_table(plans["cudnn"])


def test_slices_replicate_the_fsdp_shards_across_the_data_axis():
  config = digits.get_config("runlocal")
  one = plan.make_plan(config, preset="fsdp", devices=8, batch=64, activations=False)
  two = plan.make_plan(config, preset="fsdp", devices=16, dcn_data=2, batch=64,
                       activations=False)
  assert two["mesh"]["shape"] == {"data": 2, "fsdp": 8, "tensor": 1}
  assert two["per_device_bytes"] == one["per_device_bytes"]  # 8-way shards in each slice
  assert two["batch"]["per_device"] == one["batch"]["per_device"] // 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(preset="fsdp", devices=8, batch=12), "--batch=12 is not divisible"),
    (dict(preset="fsdp", devices=8, tensor=2), "mesh.tensor=2 needs mesh.preset='fsdp_tensor'"),
    (dict(preset="fsdp_tensor", devices=8, tensor=3), "mesh.tensor=3 must be >= 1 and divide"),
    (dict(preset="fsdp", devices=8, dcn_data=3), "mesh.dcn_data=3 must be >= 1 and divide"),
    (dict(preset="zero", devices=8), "mesh.preset='zero'"),
])
def test_bad_layouts_are_refused_with_the_flag_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    plan.make_plan(digits.get_config("runlocal"), activations=False, **kwargs)


def test_command_line_prints_a_table_and_json():
  out = subprocess.run(
      [sys.executable, "-m", "sgjax.plan", "--config=configs/digits.py:runlocal",
       "--mesh=fsdp", "--devices=16", "--batch=64", "--device_memory=0.001"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  assert result["mesh"] == {"preset": "fsdp", "devices": 16,
                            "shape": {"data": 1, "fsdp": 16, "tensor": 1}}
  assert result["fits"] is False and result["per_device_bytes"]["activations"] > 0
  assert any(line.startswith("opt_state") for line in lines)
  assert "EXCEEDS" in out.stdout
