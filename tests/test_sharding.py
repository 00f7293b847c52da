"""Mesh layouts: presets within a slice, data parallelism across slices."""

import contextlib
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgjax import sharding
from tests.helpers import batch, perturbed_model, tiny_config


def _fake_gpus(nodes: int, per_node: int):
  # One process per node; interleaved ids, as a global device list need not group nodes.
  return [types.SimpleNamespace(id=i, process_index=i % nodes, platform="gpu",
                                device_kind="fake")
          for i in range(nodes * per_node)]


@pytest.mark.parametrize("preset, tensor, shape", [
    ("data", 1, (8, 1, 1)), ("fsdp", 1, (2, 4, 1)), ("fsdp_tensor", 2, (2, 2, 2))])
def test_each_node_fills_its_own_rows_of_the_data_axis(preset, tensor, shape):
  grid = sharding.device_grid(preset, _fake_gpus(2, 4), tensor, dcn_data=2)
  assert grid.shape == shape
  node_of = np.vectorize(lambda d: d.process_index)(grid)
  rows = grid.shape[0] // 2
  assert (node_of[:rows] == 0).all() and (node_of[rows:] == 1).all()
  assert len({d.id for d in grid.flat}) == grid.size


def test_single_slice_meshes_have_the_preset_shapes():
  assert sharding.make_mesh("data").devices.shape == (8, 1, 1)
  assert sharding.make_mesh("fsdp").devices.shape == (1, 8, 1)
  mesh = sharding.make_mesh("fsdp_tensor", tensor=4)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize("kwargs, message", [
    (dict(preset="fsdp", dcn_data=2), r"mesh.dcn_data=2 must equal the number of processes"
                                      r" \(hosts\), 1"),
    (dict(preset="fsdp", dcn_data=3), "mesh.dcn_data=3 must be >= 1 and divide the 8"),
    (dict(preset="fsdp_tensor", tensor=3), "mesh.tensor=3 must be >= 1 and divide the 8"),
    (dict(preset="fsdp_tensor", tensor=4, dcn_data=4), "divide the 2 devices of each slice"),
    (dict(preset="data", tensor=2), "mesh.tensor=2 needs mesh.preset='fsdp_tensor'"),
])
def test_bad_meshes_are_refused_naming_the_setting(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(**kwargs)


def _collectives(mesh_set: bool) -> int:
  cfg = tiny_config("routing", width=64, num_heads=4)
  mesh = sharding.make_mesh("fsdp_tensor", tensor=2)
  graphdef, state = nnx.split(sharding.init_sharded(lambda: perturbed_model(cfg), mesh,
                                                    "fsdp_tensor"))
  x, t, y = (jax.device_put(a, sharding.batch_sharding(mesh)) for a in batch(cfg, 16))

  @jax.jit
  def grads(state, x, t, y, key):
    def loss(state):
      model = nnx.merge(graphdef, state)
      return jnp.mean(model(x, t, y, model.draw_subsets(key, 16)) ** 2)
    return jax.grad(loss)(state)

  with jax.set_mesh(mesh) if mesh_set else contextlib.nullcontext():
    hlo = grads.lower(state, x, t, y, jax.random.key(0)).compile().as_text()
  return len(re.findall(r" (?:all-gather|all-reduce|reduce-scatter|all-to-all|"
                        r"collective-permute)(?:-start)?\(", hlo))


def test_activation_constraints_cut_the_collectives_of_tensor_parallel_training():
  # Without them GSPMD splits residual-stream activations over `tensor` and keeps
  # re-gathering them; pinned at block boundaries, Megatron's all-reduces remain.
  assert _collectives(mesh_set=True) < 0.7 * _collectives(mesh_set=False)
