"""Orbax checkpoints of a run: params, EMA, optimizer state, config.

Layout: WORKDIR/checkpoints/<step>/{params,ema,opt_state,config}. The data position needs no
state of its own: it is a function of the step (see `sgjax.data.pipeline`). Orbax writes each
step into a temporary directory and renames it only when complete (in an object store, where a
rename is a copy, it writes a `commit_success.txt` marker last), so a run killed mid-save
resumes from the previous one: orbax lists no unfinished step, and `unfinished_steps` names them.

A listed step can still be damaged afterwards (a truncated or deleted array file, a broken
config). Reading one raises `DamagedCheckpointError`, naming the step and the reason;
`Checkpointer.newest_intact` then falls back to the newest step that reads, and refuses with
the list of steps and their damage when none does. Nothing is deleted: training renames the
damaged steps it passes over to `<step>.damaged-<time>`, a name orbax ignores, so that it can
save those steps again.
"""

from __future__ import annotations

import dataclasses
import logging as py_logging
import os
import sys
import time
from typing import Any, Callable, TypeVar

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from sgjax import config as config_lib
from sgjax import paths, sharding, train_state
from sgjax.models import dit

STATE_ITEMS = ("params", "ema", "opt_state")
T = TypeVar("T")


def checkpoint_dir(workdir: str) -> str:
  return paths.join(workdir, "checkpoints")


def write_config_json(workdir: str, config_dict: dict) -> None:
  """WORKDIR/config.json, the resolved config of the run, replaced atomically."""
  paths.write_json(paths.join(workdir, "config.json"), config_dict, default=list)


class DamagedCheckpointError(ValueError):
  """A step that orbax lists as complete but that cannot be read back."""

  def __init__(self, step: int, directory: str, reason: str):
    super().__init__(f"the checkpoint at step {step} in {directory} cannot be read: {reason}")
    self.step, self.reason = step, reason


def _reason(error: BaseException) -> str:
  """The root cause of an orbax / TensorStore error in one line: its type and first line,
  without the TensorStore spec (kilobytes of JSON) that TensorStore appends."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  lines = text.strip().splitlines()
  line = lines[0].split(" [tensorstore_spec")[0] if lines else ""
  return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _not_an_aborted_read(record: py_logging.LogRecord) -> bool:
  """A logging filter: False for asyncio's report of an orbax read task's unread failure."""
  message = str(record.msg)
  return not ("Task exception was never retrieved" in message and "orbax" in message)


def _quiet_aborted_reads() -> None:
  """Drops the tracebacks that trail a failed read (installed before the first read).

  When one array of a step fails, orbax's event loop stops while TensorStore still finishes
  the other reads: each then reports, through `sys.unraisablehook`, that it found the loop
  closed, and asyncio logs every other failed read task when it is collected. Dozens of
  tracebacks would surround the one clear message; these two kinds alone are dropped.
  """
  asyncio_logger = py_logging.getLogger("asyncio")
  asyncio_logger.addFilter(_not_an_aborted_read)  # once: logging skips a filter it holds
  previous = sys.unraisablehook
  if getattr(previous, "sgjax_quiet_aborted_reads", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)

  hook.sgjax_quiet_aborted_reads = True
  sys.unraisablehook = hook


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

  @property
  def directory(self) -> str:
    return os.fspath(self._manager.directory)

  def unfinished_steps(self) -> dict[int, str]:
    """{step: folder name} of saves that never completed, which orbax does not list: its
    temporary folders (<step>.orbax-checkpoint-tmp-<n>) on local paths, step folders without
    the commit marker (commit_success.txt) in object stores."""
    found = {}
    for tmp in ocp.path.step.all_temporary_paths(self._manager.directory):
      try:
        found[ocp.path.step.step_from_checkpoint_name(tmp.get().name)] = tmp.get().name
      except ValueError:  # a folder that is no step's
        continue
    return found

  def newest_intact(self, read: Callable[[int], T], *,
                    set_aside: bool = False) -> tuple[int | None, T | None]:
    """(step, read(step)) for the newest step that `read` reads; (None, None) without any.

    Steps are tried newest first. One whose read raises `DamagedCheckpointError` is logged
    with its reason and passed over; when none reads, raises ValueError naming every step and
    its damage. Any other error of `read` (a config of another run) propagates. With
    `set_aside` (training, which will save those steps again), the damaged steps newer than
    the one read are renamed to `<step>.damaged-<time>`: kept, but out of orbax's way.

    Every process must come to the same verdict: true when damage shows to all of them (a
    step's config, or arrays every process reads, as under the data-parallel preset).
    """
    for step, folder in sorted(self.unfinished_steps().items()):
      logging.warning("checkpoint step %d: its save never completed (%s in %s has no commit"
                      " marker); ignored. Delete that folder when convenient.", step, folder,
                      self.directory)
    damaged = {}
    for step in sorted(self.all_steps(), reverse=True):
      try:
        value = read(step)
      except DamagedCheckpointError as e:
        logging.warning("%s; passing over it.", e)
        damaged[step] = e.reason
        continue
      if damaged:
        logging.warning("step %d is the newest checkpoint that reads; passed over the damaged"
                        " steps %s.", step, sorted(damaged))
        if set_aside:
          self._set_aside(sorted(damaged))
      return step, value
    if damaged:
      raise ValueError(
          f"no checkpoint in {self.directory} can be read: "
          + "; ".join(f"step {s}: {reason}" for s, reason in damaged.items())
          + ". Move the damaged step folders out of that folder (training then starts"
          " afresh), or use another --workdir.")
    return None, None

  def _set_aside(self, steps: list[int]) -> None:
    """Renames damaged `steps` to <step>.damaged-<UTC time> on process 0, then rereads the
    step list everywhere: orbax refuses to save a step that it still lists."""
    directory = paths.resolve(self.directory)
    if jax.process_index() == 0:
      # No "_" in the name: orbax would read "<prefix>_<n>" as step n.
      stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
      for step in steps:
        target = directory / f"{step}.damaged-{stamp}"
        (directory / str(step)).rename(target)
        logging.warning("moved the damaged checkpoint of step %d aside to %s; delete it once"
                        " inspected.", step, target)
    ocp.multihost.sync_global_processes(f"sgjax_set_aside_{'-'.join(map(str, steps))}")
    self._manager.reload()

  def _restore(self, step: int, items: dict[str, Any]) -> dict[str, Any]:
    if step not in self.all_steps():
      raise FileNotFoundError(f"no complete checkpoint at step {step} in {self.directory};"
                              f" complete: {sorted(self.all_steps())}.")
    _quiet_aborted_reads()  # before: the trail starts while orbax is still unwinding
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # pylint: disable=broad-exception-caught
      # A damaged step shows as many types: ValueError and a bare Exception from TensorStore,
      # OSError, KeyError (a missing item), json's errors (a broken config).
      raise DamagedCheckpointError(step, self.directory, _reason(error)) from error

  def restore(self, step: int, abstract: train_state.State) -> train_state.State:
    """Restores into the shardings of `abstract` (any mesh and process count)."""
    restored = self._restore(
        step, {name: ocp.args.StandardRestore(abstract[name]) for name in STATE_ITEMS})
    state = {name: restored[name] for name in STATE_ITEMS}
    step_sharding = abstract["step"].sharding
    state["step"] = jax.device_put(jax.numpy.asarray(step, jax.numpy.int32), step_sharding)
    return state

  def restore_item(self, step: int, name: str, abstract: Any) -> Any:
    return self._restore(step, {name: ocp.args.StandardRestore(abstract)})[name]

  def restore_config(self, step: int) -> dict:
    return self._restore(step, {"config": ocp.args.JsonRestore()})["config"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _read_run(workdir: str, step: int | None,
              read: Callable[[Checkpointer, int], T]) -> tuple[T, int]:
  """(read(checkpointer, step), step) for checkpoint `step` of the run in `workdir`, or, when
  `step` is None, for the newest one that reads (the damaged ones on the way are logged)."""
  if not paths.resolve(checkpoint_dir(workdir)).is_dir():
    raise FileNotFoundError(f"--workdir={workdir!r} holds no checkpoints/ folder: train a"
                            " model there first (python -m sgjax.train --workdir=...).")
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    steps = sorted(ckpt.all_steps())
    if step is None:
      found, value = ckpt.newest_intact(lambda s: read(ckpt, s))
      if found is None:
        raise FileNotFoundError(f"--workdir={workdir!r} holds no complete checkpoint yet.")
      return value, found
    if step not in steps:
      unfinished = ckpt.unfinished_steps()
      why = (f"its save never completed ({unfinished[step]} has no commit marker)"
             if step in unfinished else "no checkpoint at that step")
      raise FileNotFoundError(f"--step={step}: {why} in {workdir!r}; complete checkpoints:"
                              f" {steps}.")
    try:
      return read(ckpt, step), step
    except DamagedCheckpointError as e:
      others = [s for s in steps if s != step]
      hint = f". Choose another step (the other complete checkpoints: {others})" if others else ""
      raise DamagedCheckpointError(step, ckpt.directory, e.reason + hint) from e
  finally:
    ckpt.close()


def run_config(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """(the config checkpoint `step` (default: the newest whose config reads) was trained with,
  its step), after checking that `workdir` holds that complete checkpoint; no weights are
  read, so damaged arrays show only when the model is loaded."""
  return _read_run(workdir, step, lambda ckpt, s: ckpt.restore_config(s))


def load_model(workdir: str, step: int | None = None, ema: bool = True,
               mesh: jax.sharding.Mesh | None = None,
               preset: str = "data") -> tuple[dit.DiT, dict, int]:
  """The model of a training run -> (model, config dict, step).

  Restores only the EMA (default) or raw parameters, sharded by `preset` over `mesh`
  (default: replicated over all devices, as sampling wants), of checkpoint `step` (default:
  the newest that reads; a damaged `step` raises DamagedCheckpointError).
  """
  mesh = mesh or sharding.make_mesh(preset)

  def read(ckpt: Checkpointer, step: int):
    config = ckpt.restore_config(step)
    model_cfg = config_lib.model_config(config["model"])
    if model_cfg.attention == "cudnn" and jax.default_backend() != "gpu":
      # The kernel is a property of the machine, not of the weights.
      logging.info("model.attention='cudnn' needs an NVIDIA GPU; using 'xla' attention on %s"
                   " (same parameters, same function).", jax.default_backend())
      model_cfg = dataclasses.replace(model_cfg, attention="xla")
    graphdef, abstract_params = nnx.split(nnx.eval_shape(
        train_state.make_model_fn(model_cfg, config["seed"])))
    shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh, preset))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_params), shardings)
    params = ckpt.restore_item(step, "ema" if ema else "params", target)
    return nnx.merge(graphdef, params), config

  (model, config), step = _read_run(workdir, step, read)
  return model, config, step
