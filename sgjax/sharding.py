"""Meshes, logical-axis rules and sharded model initialisation.

The mesh always has the three axes ("data", "fsdp", "tensor"); presets decide their sizes and
how the model's logical parameter axes (see `sgjax/models/dit.py`) map onto them:

- "data":        pure data parallelism, parameters replicated; mesh (n, 1, 1).
- "fsdp":        parameters sharded over their `embed` axis (ZeRO-3 style); mesh (1, n, 1).
- "fsdp_tensor": fsdp plus Megatron-style tensor parallelism of attention heads, MLP hidden
                 and modulation outputs; mesh (1, n / tensor, tensor).

Batches are sharded over ("data", "fsdp") together, so every preset is data-parallel across
all non-tensor devices.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Every logical axis the models use; those a preset does not map stay replicated.
LOGICAL_AXES = ("embed", "mlp", "heads", "adaln", "classes", "patch", "freq")
_PRESET_RULES = {
    "data": {},
    "fsdp": {"embed": "fsdp"},
    "fsdp_tensor": {"embed": "fsdp", "mlp": "tensor", "heads": "tensor", "adaln": "tensor"},
}


def make_mesh(preset: str = "fsdp", tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all) for a preset."""
  _check_preset(preset)
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if preset != "fsdp_tensor" and tensor != 1:
    raise ValueError(f"mesh.tensor={tensor} needs mesh.preset='fsdp_tensor' (got {preset!r}).")
  if tensor < 1 or n % tensor:
    raise ValueError(f"mesh.tensor={tensor} must be >= 1 and divide the {n} devices.")
  shape = {"data": (n, 1, 1), "fsdp": (1, n, 1), "fsdp_tensor": (1, n // tensor, tensor)}
  # Auto axes: GSPMD propagates shardings through the model (JAX_NOTES: the default
  # Explicit axes reject classic sharded matmuls).
  return Mesh(np.asarray(devices).reshape(shape[preset]), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _check_preset(preset: str) -> None:
  if preset not in _PRESET_RULES:
    raise ValueError(f"mesh.preset={preset!r}: choose one of {sorted(_PRESET_RULES)}.")


def rules(preset: str) -> tuple[tuple[str, str | None], ...]:
  """(logical axis, mesh axis or None) for every logical axis, for `nnx.logical_axis_rules`."""
  _check_preset(preset)
  return tuple((name, _PRESET_RULES[preset].get(name)) for name in LOGICAL_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(abstract_state, mesh: Mesh, preset: str):
  """NamedShardings for an nnx State from the logical axes its variables carry."""
  with nnx.logical_axis_rules(rules(preset)):
    return nnx.get_named_sharding(abstract_state, mesh)


def init_sharded(make_module: Callable[[], nnx.Module], mesh: Mesh, preset: str) -> nnx.Module:
  """Builds a module straight into its shardings: abstract init -> shardings -> jitted init.

  Nothing is materialised on one device first, so this works for models larger than one
  device's memory.
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make_module))
  shardings = state_shardings(abstract_state, mesh, preset)
  state = jax.jit(lambda: nnx.state(make_module()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)
