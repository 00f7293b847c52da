"""Memory plan of a training run before renting the hardware: bytes per device.

    python -m sgjax.plan --config=configs/imagenet256.py:model=SiT-XL/2 --mesh=fsdp \
        --devices=8 --batch=256 --device_memory=80 [--config.model.remat=full]

Nothing is allocated and no real devices are needed: the train state comes from the same
`train_state.abstract_state` / `make_optimizer` that training uses, its shardings from
`sgjax.sharding`'s rules on an abstract mesh of N devices, and per-device bytes from each
array's PartitionSpec (a dimension split k ways holds ceil(dim / k) per device, as XLA pads).
Activations are the residuals autodiff keeps for the backward pass of one device's share of
the batch, traced abstractly (`jax.eval_shape` of `jax.vjp`): before XLA's fusion and buffer
reuse, and counted whole under tensor parallelism, so an upper-end estimate.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding
from ml_collections import config_flags

from sgjax import cli, config as config_lib, flow, sharding, train_state

FLAGS = flags.FLAGS
GIB = 2**30
# Rows of the table, in order; "total" is their sum.
ITEMS = ("params", "ema", "opt_state", "grads", "activations")


def abstract_mesh(preset: str, devices: int, tensor: int = 1,
                  dcn_data: int = 1) -> AbstractMesh:
  """The ("data", "fsdp", "tensor") mesh `sharding.make_mesh` would build over `devices`."""
  if devices < 1:
    raise ValueError(f"--devices={devices} must be positive.")
  ici, dcn = sharding.mesh_shapes(preset, devices, tensor, dcn_data)
  return AbstractMesh(tuple(i * d for i, d in zip(ici, dcn)), sharding.MESH_AXES,
                      axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES))


def shard_shape(shape: tuple[int, ...], named: NamedSharding) -> tuple[int, ...]:
  """One device's block of a global `shape` under `named` (uneven splits round up)."""
  sizes = dict(named.mesh.shape)
  out = list(shape)
  for dim, axes in enumerate(named.spec):
    if axes is None:
      continue
    ways = math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))
    out[dim] = -(-shape[dim] // ways)
  return tuple(out)


def tree_bytes(tree: Any, per_device: bool) -> int:
  """Bytes of a tree of ShapeDtypeStructs: whole, or per device from their shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = shard_shape(leaf.shape, leaf.sharding) if per_device else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def activation_bytes(graphdef, params: Any, model_cfg, loss_cfg: flow.LossConfig,
                     batch: int) -> int:
  """Residuals saved by autodiff of the training loss for a batch of `batch` images, minus
  the parameters themselves (counted elsewhere)."""

  def residuals(params, images, labels, key):
    _, vjp_fn = jax.vjp(lambda p: flow.loss_fn(nnx.merge(graphdef, p), images, labels, key,
                                               loss_cfg), params)
    param_ids = {id(p) for p in jax.tree.leaves(params)}
    return [r for r in jax.tree.leaves(vjp_fn) if id(r) not in param_ids]

  images = jax.ShapeDtypeStruct(
      (batch, model_cfg.input_size, model_cfg.input_size, model_cfg.in_channels), jnp.float32)
  if model_cfg.text_conditioned:  # a caption's hidden states and mask
    labels = {"text": jax.ShapeDtypeStruct(
                  (batch, model_cfg.text_length, model_cfg.text_width), jnp.float32),
              "mask": jax.ShapeDtypeStruct((batch, model_cfg.text_length), jnp.bool_)}
  else:
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  plain = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), params)
  saved = jax.eval_shape(residuals, plain, images, labels, key)
  return sum(math.prod(r.shape) * np.dtype(r.dtype).itemsize for r in saved)


def make_plan(config, *, preset: str | None = None, devices: int = 8, tensor: int | None = None,
              dcn_data: int | None = None, batch: int | None = None,
              device_memory_gib: float | None = None,
              activations: bool = True) -> dict[str, Any]:
  """The memory plan of training `config` (an ml_collections config) on `devices` devices.

  preset / tensor / dcn_data / batch default to the config's mesh.preset, mesh.tensor,
  mesh.dcn_data and train.batch_size. Returns a JSON-able dict; bytes are per device unless
  named `global`.
  """
  preset = preset or config.mesh.preset
  tensor = tensor if tensor is not None else (config.mesh.tensor if preset == "fsdp_tensor"
                                              else 1)
  dcn_data = dcn_data or config.mesh.dcn_data
  batch = batch or config.train.batch_size
  model_cfg = config_lib.model_config(config.model)
  loss_cfg = flow.LossConfig(**config.flow).validate()
  mesh = abstract_mesh(preset, devices, tensor, dcn_data)
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch % data_parallel:
    raise ValueError(f"--batch={batch} is not divisible by the data-parallel size"
                     f" {data_parallel} (mesh {dict(mesh.shape)}).")
  tx = train_state.make_optimizer(train_state.OptimConfig.from_train_config(config.train))
  # cuDNN's attention kernel cannot be traced off a GPU. The parameters are the same with
  # XLA's, whose attention keeps the [N, N] scores that cuDNN's does not, so with
  # attention='cudnn' the activations below are an upper bound.
  traced_cfg = dataclasses.replace(model_cfg, attention="xla")
  graphdef, abstract, _ = train_state.abstract_state(traced_cfg, tx, mesh, preset, config.seed)

  per_device = {name: tree_bytes(abstract[name], True) for name in ("params", "ema",
                                                                    "opt_state")}
  per_device["grads"] = per_device["params"]  # same shapes and shardings as params
  per_device["activations"] = (activation_bytes(graphdef, abstract["params"], model_cfg,
                                                loss_cfg, batch // data_parallel)
                               if activations else 0)
  total = sum(per_device.values())
  num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(abstract["params"]))
  plan = {
      "config": {"model": config.model.name, "sparsity": model_cfg.sparsity,
                 "dtype": model_cfg.dtype, "remat": model_cfg.remat,
                 "attention": model_cfg.attention},
      "mesh": {"preset": preset, "devices": devices, "shape": dict(mesh.shape)},
      "batch": {"global": batch, "per_device": batch // data_parallel},
      "num_params": num_params,
      "global_bytes": {name: tree_bytes(abstract[name], False)
                       for name in ("params", "ema", "opt_state")},
      "per_device_bytes": {**per_device, "total": total},
      "uneven": sorted(_uneven(abstract["params"])),
      "device_memory_bytes": None, "fits": None,
  }
  if device_memory_gib is not None:
    plan["device_memory_bytes"] = int(device_memory_gib * GIB)
    plan["fits"] = total <= plan["device_memory_bytes"]
  return plan


def _uneven(params: Any) -> list[str]:
  """Parameters whose sharded dimension does not divide evenly (XLA pads them)."""
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    sizes = dict(leaf.sharding.mesh.shape)
    for dim, axes in enumerate(leaf.sharding.spec):
      if axes is not None:
        ways = math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))
        if leaf.shape[dim] % ways:
          out.append(jax.tree_util.keystr(path))
  return out


def format_table(plan: dict[str, Any]) -> str:
  mesh, batch = plan["mesh"], plan["batch"]
  cfg = plan["config"]
  lines = [f"{cfg['model']} ({cfg['sparsity']}, compute {cfg['dtype']}, remat"
           f" {cfg['remat']}, attention {cfg['attention']}): {plan['num_params'] / 1e6:.1f}M"
           " parameters",
           f"mesh {mesh['preset']} {mesh['shape']} on {mesh['devices']} devices; batch"
           f" {batch['global']} ({batch['per_device']} per device)",
           f"{'per device':<14}{'GiB':>10}{'global GiB':>12}"]
  for name in ITEMS + ("total",):
    global_bytes = plan["global_bytes"].get(name)
    lines.append(f"{name:<14}{plan['per_device_bytes'][name] / GIB:>10.3f}"
                 + (f"{global_bytes / GIB:>12.3f}" if global_bytes is not None else ""))
  if plan["uneven"]:
    lines.append(f"padded (uneven split): {len(plan['uneven'])} arrays, e.g."
                 f" {plan['uneven'][0]}")
  if plan["fits"] is not None:
    lines.append(f"device memory {plan['device_memory_bytes'] / GIB:.1f} GiB: "
                 + ("fits" if plan["fits"] else "EXCEEDS device memory: use more devices,"
                    " --mesh=fsdp / fsdp_tensor, --config.model.remat=full, or a smaller"
                    " --batch"))
  return "\n".join(lines)


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Config file: configs/NAME.py[:arg].",
                                  lock_config=True)
  flags.DEFINE_enum("mesh", None, ["data", "fsdp", "fsdp_tensor"],
                    "Mesh preset (default: the config's mesh.preset).")
  flags.DEFINE_integer("tensor", None, "Tensor-parallel size for --mesh=fsdp_tensor.")
  flags.DEFINE_integer("dcn_data", None, "Slices joined by DCN (multi-slice TPU), data-parallel"
                       " across (default: the config's mesh.dcn_data).")
  flags.DEFINE_integer("devices", 8, "Number of devices.")
  flags.DEFINE_integer("batch", None, "Global batch size (default: train.batch_size).")
  flags.DEFINE_float("device_memory", None, "Memory of one device in GiB, to flag overflow.")
  flags.DEFINE_bool("activations", True, "Estimate activations (traces the model, seconds).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  plan = make_plan(FLAGS.config, preset=FLAGS.mesh, devices=FLAGS.devices, tensor=FLAGS.tensor,
                   dcn_data=FLAGS.dcn_data, batch=FLAGS.batch,
                   device_memory_gib=FLAGS.device_memory,
                   activations=FLAGS.activations)
  print(format_table(plan))
  print(json.dumps(plan))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  cli.run(main)
