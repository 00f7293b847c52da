"""Orbax checkpoints of a run: params, EMA, optimizer state, config.

Layout: WORKDIR/checkpoints/<step>/{params,ema,opt_state,config}. The data position needs no
state of its own: it is a function of the step (see `sgjax.data.pipeline`). Orbax writes each
step into a temporary directory and renames it only when complete, so the latest visible
checkpoint is always whole; a run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from sgjax import config as config_lib
from sgjax import sharding, train_state
from sgjax.models import dit

STATE_ITEMS = ("params", "ema", "opt_state")


def local_path(path: str, flag: str) -> str:
  """`path` made absolute. URLs (gs://...) are refused: the plain file APIs used for logs and
  outputs would quietly turn them into local folders."""
  if "://" in path:
    raise ValueError(f"--{flag}={path!r}: URLs are not supported yet; use a path that every"
                     " host shares (a bucket mounted with gcsfuse, or NFS).")
  return os.path.abspath(path)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(local_path(workdir, "workdir"), "checkpoints")


def write_config_json(workdir: str, config_dict: dict) -> None:
  """WORKDIR/config.json, the resolved config of the run, replaced atomically."""
  path = os.path.join(workdir, "config.json")
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(config_dict, f, indent=2, default=list)
  os.replace(path + ".tmp", path)


class Checkpointer:
  """Saves and restores train states (async saves); keeps the newest `keep` and, when
  `keep_every` > 0, every step that is a multiple of it (e.g. the auxiliary model of AG)."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
               keep_every: int = 0):
    self._manager = ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: train_state.State, config_dict: dict) -> None:
    items = {name: ocp.args.StandardSave(state[name]) for name in STATE_ITEMS}
    items["config"] = ocp.args.JsonSave(config_dict)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract: train_state.State) -> train_state.State:
    """Restores into the shardings of `abstract` (any mesh and process count)."""
    items = {name: ocp.args.StandardRestore(abstract[name]) for name in STATE_ITEMS}
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    state = {name: restored[name] for name in STATE_ITEMS}
    step_sharding = abstract["step"].sharding
    state["step"] = jax.device_put(jax.numpy.asarray(step, jax.numpy.int32), step_sharding)
    return state

  def restore_item(self, step: int, name: str, abstract: Any) -> Any:
    return self._manager.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardRestore(abstract)}))[name]

  def restore_config(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def run_config(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """(the config checkpoint `step` (default: the latest) was trained with, its step), after
  checking that `workdir` holds that complete checkpoint; no weights are read."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise FileNotFoundError(f"--workdir={workdir!r} holds no checkpoints/ folder: train a"
                            " model there first (python -m sgjax.train --workdir=...).")
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"--workdir={workdir!r} holds no complete checkpoint yet.")
    step = max(steps) if step is None else step
    if step not in steps:
      raise FileNotFoundError(f"--step={step}: no checkpoint at that step in {workdir!r};"
                              f" available: {sorted(steps)}.")
    return ckpt.restore_config(step), step
  finally:
    ckpt.close()


def load_model(workdir: str, step: int | None = None, ema: bool = True,
               mesh: jax.sharding.Mesh | None = None,
               preset: str = "data") -> tuple[dit.DiT, dict, int]:
  """The model of a training run -> (model, config dict, step).

  Restores only the EMA (default) or raw parameters, sharded by `preset` over `mesh`
  (default: replicated over all devices, as sampling wants).
  """
  config, step = run_config(workdir, step)
  model_cfg = config_lib.model_config(config["model"])
  if model_cfg.attention == "cudnn" and jax.default_backend() != "gpu":
    # The kernel is a property of the machine, not of the weights.
    logging.info("model.attention='cudnn' needs an NVIDIA GPU; using 'xla' attention on %s"
                 " (same parameters, same function).", jax.default_backend())
    model_cfg = dataclasses.replace(model_cfg, attention="xla")
  mesh = mesh or sharding.make_mesh(preset)
  graphdef, abstract_params = nnx.split(nnx.eval_shape(
      train_state.make_model_fn(model_cfg, config["seed"])))
  shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh, preset))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nnx.to_pure_dict(abstract_params), shardings)
  ckpt = Checkpointer(workdir, async_save=False)
  params = ckpt.restore_item(step, "ema" if ema else "params", target)
  ckpt.close()
  return nnx.merge(graphdef, params), config, step
