"""Meshes, logical-axis rules and sharded model initialisation.

The mesh always has the three axes ("data", "fsdp", "tensor"); presets decide their sizes and
how the model's logical parameter axes (see `sgjax/models/dit.py`) map onto them:

- "data":        pure data parallelism, parameters replicated; mesh (n, 1, 1).
- "fsdp":        parameters sharded over their `embed` axis (ZeRO-3 style); mesh (1, n, 1).
- "fsdp_tensor": fsdp plus Megatron-style tensor parallelism of attention heads, MLP hidden
                 and modulation outputs; mesh (1, n / tensor, tensor).

On multi-slice TPU pods (or several hosts over a slow network), `mesh.dcn_data` slices make
the "data" axis span the slices and the preset lay out each slice (see `mesh_shapes`).

Batches are sharded over ("data", "fsdp") together, so every preset is data-parallel across
all non-tensor devices.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Every logical axis the models use; those a preset does not map stay replicated.
LOGICAL_AXES = ("embed", "mlp", "heads", "adaln", "classes", "patch", "freq", "text")
_PRESET_RULES = {
    "data": {},
    "fsdp": {"embed": "fsdp"},
    "fsdp_tensor": {"embed": "fsdp", "mlp": "tensor", "heads": "tensor", "adaln": "tensor"},
}


def mesh_shapes(preset: str, num_devices: int, tensor: int = 1,
                dcn_data: int = 1) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
  """(shape within a slice, shape across slices) of the mesh; the mesh's shape is their
  elementwise product.

  `dcn_data` > 1 splits the devices into that many slices joined by the data-centre network
  (DCN): the "data" axis spans the slices, and the preset lays out each slice's devices,
  which talk over the fast interconnect (ICI). Only data parallelism, whose gradient
  all-reduce happens once per step, crosses the slow links.
  """
  _check_preset(preset)
  if preset != "fsdp_tensor" and tensor != 1:
    raise ValueError(f"mesh.tensor={tensor} needs mesh.preset='fsdp_tensor' (got {preset!r}).")
  if dcn_data < 1 or num_devices % dcn_data:
    raise ValueError(f"mesh.dcn_data={dcn_data} must be >= 1 and divide the {num_devices}"
                     " devices.")
  per_slice = num_devices // dcn_data
  if tensor < 1 or per_slice % tensor:
    raise ValueError(f"mesh.tensor={tensor} must be >= 1 and divide the {per_slice} devices"
                     " of each slice.")
  ici = {"data": (per_slice, 1, 1), "fsdp": (1, per_slice, 1),
         "fsdp_tensor": (1, per_slice // tensor, tensor)}[preset]
  return ici, (dcn_data, 1, 1)


def device_grid(preset: str, devices: Sequence, tensor: int = 1,
                dcn_data: int = 1) -> np.ndarray:
  """The devices arranged as the ("data", "fsdp", "tensor") mesh of a preset.

  Within a slice, `mesh_utils` follows the physical topology (TPU torus, GPU ids). Slices are
  TPU slices on TPUs and processes elsewhere (on GPU clusters: one process per node).
  """
  ici, dcn = mesh_shapes(preset, len(devices), tensor, dcn_data)
  if dcn_data == 1:
    return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  granule = "slice_index" if devices[0].platform == "tpu" else "process_index"
  found = len({getattr(d, granule) for d in devices})
  if found != dcn_data:
    what = "TPU slices" if granule == "slice_index" else "processes (hosts)"
    raise ValueError(f"mesh.dcn_data={dcn_data} must equal the number of {what}, {found}.")
  return mesh_utils.create_hybrid_device_mesh(
      ici, dcn, devices, process_is_granule=granule == "process_index",
      allow_split_physical_axes=True)


def make_mesh(preset: str = "fsdp", tensor: int = 1,
              devices: Sequence[jax.Device] | None = None, dcn_data: int = 1) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all) for a preset."""
  devices = list(jax.devices() if devices is None else devices)
  # Auto axes: GSPMD propagates shardings through the model (JAX_NOTES: the default
  # Explicit axes reject classic sharded matmuls).
  return Mesh(device_grid(preset, devices, tensor, dcn_data), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _check_preset(preset: str) -> None:
  if preset not in _PRESET_RULES:
    raise ValueError(f"mesh.preset={preset!r}: choose one of {sorted(_PRESET_RULES)}.")


def rules(preset: str) -> tuple[tuple[str, str | None], ...]:
  """(logical axis, mesh axis or None) for every logical axis, for `nnx.logical_axis_rules`."""
  _check_preset(preset)
  return tuple((name, _PRESET_RULES[preset].get(name)) for name in LOGICAL_AXES)


def constrain(x: jax.Array, *spec) -> jax.Array:
  """Pins an activation to PartitionSpec(*spec) while tracing under `jax.set_mesh` with
  sgjax's mesh axes; without such a mesh (one device, tests) returns `x` unchanged.

  GSPMD alone may shard activations in ways that cost extra collectives (e.g. gathering a
  whole batch, or splitting the residual stream over `tensor`); the models pin the residual
  stream, conditioning and head/MLP-hidden activations at block boundaries.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or tuple(mesh.axis_names) != MESH_AXES:
    return x
  return jax.lax.with_sharding_constraint(x, P(*spec))


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
