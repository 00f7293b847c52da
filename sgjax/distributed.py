"""Multi-process JAX: one `initialize()` for TPU pods, SLURM GPU clusters and local runs.

Every process of a multi-host job runs the same command; this module tells JAX how the
processes find each other, before any JAX computation. Modes (`--distributed`):

- `auto` (default): `local` when a coordinator is given (flags or SGJAX_* variables); else
  `slurm` inside an `srun` step of several tasks; else `tpu` on a Cloud TPU VM; else `none`.
- `local`: an explicit coordinator, e.g. several CPU processes on one machine
  (`launch/multiprocess_local.sh` sets SGJAX_COORDINATOR=localhost:PORT,
  SGJAX_NUM_PROCESSES, SGJAX_PROCESS_ID).
- `slurm`: process id and count from SLURM_PROCID / SLURM_STEP_NUM_TASKS (or SLURM_NTASKS);
  the coordinator is the step's first node (SLURM_STEP_NODELIST) unless given.
- `tpu`: `jax.distributed.initialize()` with no arguments; JAX reads the TPU VM's metadata.
- `none`: a single process.

Flags override SGJAX_* variables. Only process 0 writes run files (config.json, metrics,
samples); orbax coordinates multi-host checkpoints itself.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import flags, logging

MODES = ("auto", "none", "local", "slurm", "tpu")
# SLURM's default port choice follows JAX's: the ephemeral range, varied by job id so that
# two jobs sharing a node do not collide.
_SLURM_PORT_BASE = 65535 - 2**12 + 1


@dataclasses.dataclass(frozen=True)
class Spec:
  """How this process joins the job; `mode == "none"` means a single process."""

  mode: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  def initialize_kwargs(self) -> dict[str, Any]:
    kwargs = {"coordinator_address": self.coordinator, "num_processes": self.num_processes,
              "process_id": self.process_id,
              "local_device_ids": None if self.local_device_ids is None
              else list(self.local_device_ids)}
    return {k: v for k, v in kwargs.items() if v is not None}


def define_flags() -> None:
  """The distributed flags of an entry point (idempotent)."""
  if "distributed" in flags.FLAGS:
    return
  flags.DEFINE_enum("distributed", "auto", MODES,
                    "How processes find each other: auto | none | local | slurm | tpu.")
  flags.DEFINE_string("coordinator", None,
                      "host:port of process 0 (env SGJAX_COORDINATOR); local/slurm modes.")
  flags.DEFINE_integer("num_processes", None, "Number of processes (env SGJAX_NUM_PROCESSES).")
  flags.DEFINE_integer("process_id", None, "This process's index (env SGJAX_PROCESS_ID).")
  flags.DEFINE_list("local_device_ids", None,
                    "Devices this process uses, e.g. 0 for one GPU per process"
                    " (env SGJAX_LOCAL_DEVICE_IDS).")
  flags.DEFINE_integer("distributed_timeout", 300,
                       "Seconds to wait for all processes to join before failing.")


def initialize_from_flags() -> Spec:
  """`initialize` with the values of `define_flags`' flags."""
  f = flags.FLAGS
  spec = resolve(f.distributed, coordinator=f.coordinator, num_processes=f.num_processes,
                 process_id=f.process_id, local_device_ids=f.local_device_ids)
  return initialize(spec, timeout_s=f.distributed_timeout)


def initialize(spec: Spec | None = None, timeout_s: int = 300) -> Spec:
  """Joins the job described by `spec` (default: `resolve("auto")`); a no-op for a single
  process or when JAX is already initialised. Call before any JAX computation."""
  spec = resolve("auto") if spec is None else spec
  if spec.mode == "none":
    return spec
  if jax.distributed.is_initialized():
    logging.info("jax.distributed is already initialised; keeping it.")
    return spec
  logging.info("joining a %s job: %s", spec.mode, spec.initialize_kwargs() or "auto-detected")
  try:
    jax.distributed.initialize(**spec.initialize_kwargs(), initialization_timeout=timeout_s)
  except Exception as e:  # the raw errors do not say which setting was wrong
    raise RuntimeError(
        f"jax.distributed.initialize failed in --distributed={spec.mode} mode with {spec}:"
        f" {e}\nCheck that every process runs with the same coordinator and process count,"
        " that process ids are distinct in [0, num_processes), and that the coordinator's"
        " port is free and reachable; use --distributed=none for a single process.") from e
  logging.info("process %d of %d: %d local devices, %d in all", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return spec


def resolve(mode: str = "auto", *, coordinator: str | None = None,
            num_processes: int | None = None, process_id: int | None = None,
            local_device_ids: Sequence[int | str] | None = None,
            env: Mapping[str, str] | None = None) -> Spec:
  """The Spec for `mode` from explicit values, then SGJAX_* / SLURM / TPU variables in `env`
  (default: os.environ). Pure, so that every cluster's rules can be tested anywhere."""
  env = os.environ if env is None else env
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}: choose one of {', '.join(MODES)}.")
  coordinator = coordinator or env.get("SGJAX_COORDINATOR") or None
  num_processes = _int(num_processes, env, "SGJAX_NUM_PROCESSES")
  process_id = _int(process_id, env, "SGJAX_PROCESS_ID")
  if local_device_ids is None and env.get("SGJAX_LOCAL_DEVICE_IDS"):
    local_device_ids = env["SGJAX_LOCAL_DEVICE_IDS"].split(",")
  device_ids = None if local_device_ids is None else tuple(int(i) for i in local_device_ids)

  if mode == "auto":
    if coordinator or num_processes is not None or process_id is not None:
      mode = "local"
    elif "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
      mode = "slurm"
    elif _on_tpu_vm(env):
      mode = "tpu"
    else:
      return Spec("none")
  if mode == "none":
    return Spec("none")
  if mode == "tpu":
    return Spec("tpu", coordinator, num_processes, process_id, device_ids)
  if mode == "slurm":
    return _slurm(env, coordinator, num_processes, process_id, device_ids)

  missing = [name for name, value in (("--coordinator / SGJAX_COORDINATOR", coordinator),
                                      ("--num_processes / SGJAX_NUM_PROCESSES", num_processes),
                                      ("--process_id / SGJAX_PROCESS_ID", process_id))
             if value is None]
  if missing:
    raise ValueError(f"--distributed=local needs {', '.join(missing)} (every process gets"
                     " the same coordinator host:port and count, and its own id);"
                     " launch/multiprocess_local.sh sets them.")
  _check(coordinator, num_processes, process_id)
  return Spec("local", coordinator, num_processes, process_id, device_ids)


def _slurm(env, coordinator, num_processes, process_id, device_ids) -> Spec:
  def need(name: str) -> str:
    if name not in env:
      raise ValueError(f"--distributed=slurm: ${name} is not set; run the command under"
                       " `srun` inside an allocation (see launch/slurm_gpu.sbatch).")
    return env[name]

  if process_id is None:
    process_id = int(need("SLURM_PROCID"))
  if num_processes is None:
    num_processes = int(env.get("SLURM_STEP_NUM_TASKS") or need("SLURM_NTASKS"))
  if coordinator is None:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
      raise ValueError("--distributed=slurm: neither $SLURM_STEP_NODELIST nor"
                       " $SLURM_JOB_NODELIST is set; pass --coordinator=HOST:PORT.")
    port = env.get("SGJAX_COORDINATOR_PORT") or str(
        _SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % 2**12)
    coordinator = f"{first_host(nodelist)}:{port}"
  if device_ids is None and "SLURM_LOCALID" in env:
    # One process per GPU: when srun did not bind one GPU to each task, pick ours.
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    tasks_per_node = int(re.match(r"\d*", env.get("SLURM_NTASKS_PER_NODE", "1")).group() or 1)
    if len(visible) > 1 and tasks_per_node > 1:
      device_ids = (int(env["SLURM_LOCALID"]),)
  _check(coordinator, num_processes, process_id)
  return Spec("slurm", coordinator, num_processes, process_id, device_ids)


def first_host(nodelist: str) -> str:
  """The first host of a SLURM hostlist: 'gpu[003-005,9],cpu1' -> 'gpu003',
  'rack[1-2]-n[07-08]' -> 'rack1-n07'."""
  depth, end = 0, len(nodelist)
  for i, ch in enumerate(nodelist):  # the first top-level comma ends the first entry
    depth += {"[": 1, "]": -1}.get(ch, 0)
    if ch == "," and depth == 0:
      end = i
      break
  return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end])


def _check(coordinator: str, num_processes: int, process_id: int) -> None:
  if not re.fullmatch(r"[^\s:]+:\d+", coordinator):
    raise ValueError(f"coordinator={coordinator!r}: expected HOST:PORT, e.g. localhost:12355.")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} must lie in [0, num_processes={num_processes}).")


def _int(value: int | None, env: Mapping[str, str], name: str) -> int | None:
  if value is not None:
    return int(value)
  raw = env.get(name)
  if raw in (None, ""):
    return None
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"${name}={raw!r}: expected an integer.") from None


def _on_tpu_vm(env: Mapping[str, str]) -> bool:
  """A Cloud TPU VM: its worker variables, or TPU device files (v2-v4 /dev/accel*; v5+ vfio
  with libtpu installed)."""
  if any(name in env for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                                  "TPU_WORKER_ID", "TPU_ACCELERATOR_TYPE")):
    return True
  if glob.glob("/dev/accel[0-9]*"):
    return True
  if os.path.isdir("/dev/vfio") and glob.glob("/dev/vfio/[0-9]*"):
    import importlib.util  # pylint: disable=g-import-not-at-top
    return importlib.util.find_spec("libtpu") is not None
  return False


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host) array on every process, as numpy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
