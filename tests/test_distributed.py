"""Multi-process runs: 2 local processes x 4 CPU devices against 1 process x 8 devices.

The slow tests share one module fixture: a 2-process training run killed with SIGKILL, then
restarted (the way a preempted pod restarts) and stopped by SIGTERM to one process.
Processes run through launch/multiprocess_local.sh, in their own session, and are killed by
id on any failure.
"""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from configs import digits
from sgjax import checkpoint, distributed, guidance as guidance_lib, latents, sample, train
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "multiprocess_local.sh")
PROCESSES = 2


# ----------------------------------------------------------------------------------------
# resolve(): the rules of each cluster, checked without one.

def test_no_cluster_means_a_single_process():
  assert distributed.resolve("auto", env={}).mode == "none"
  assert distributed.resolve("none", env={"SGJAX_COORDINATOR": "h:1"}).mode == "none"


def test_explicit_coordinator_from_environment_and_flags():
  env = {"SGJAX_COORDINATOR": "localhost:1234", "SGJAX_NUM_PROCESSES": "2",
         "SGJAX_PROCESS_ID": "1"}
  spec = distributed.resolve("auto", env=env)
  assert spec == distributed.Spec("local", "localhost:1234", 2, 1)
  assert spec.initialize_kwargs() == {"coordinator_address": "localhost:1234",
                                      "num_processes": 2, "process_id": 1}
  # Flags win over the environment.
  assert distributed.resolve("auto", process_id=0, env=env).process_id == 0


@pytest.mark.parametrize("env, message", [
    ({"SGJAX_COORDINATOR": "localhost:1234"}, "SGJAX_NUM_PROCESSES"),
    ({"SGJAX_COORDINATOR": "localhost", "SGJAX_NUM_PROCESSES": "2",
      "SGJAX_PROCESS_ID": "0"}, "expected HOST:PORT"),
    ({"SGJAX_COORDINATOR": "h:1", "SGJAX_NUM_PROCESSES": "2", "SGJAX_PROCESS_ID": "2"},
     r"process_id=2 must lie in \[0, num_processes=2\)"),
    ({"SGJAX_NUM_PROCESSES": "two"}, "SGJAX_NUM_PROCESSES='two': expected an integer"),
])
def test_incomplete_or_bad_settings_name_the_problem(env, message):
  with pytest.raises(ValueError, match=message):
    distributed.resolve("auto", env=env)


def test_slurm_step_gives_ids_and_first_node_as_coordinator():
  env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "9", "SLURM_NTASKS": "16",
         "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
         "SLURM_STEP_NODELIST": "gpu[003-004,9],cpu1", "CUDA_VISIBLE_DEVICES": "1"}
  spec = distributed.resolve("auto", env=env)
  port = 65535 - 2**12 + 1 + 4242 % 2**12
  assert spec == distributed.Spec("slurm", f"gpu003:{port}", 16, 9, None)
  # All GPUs visible to each of several tasks per node: each task takes its own.
  shared = {**env, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_NTASKS_PER_NODE": "4",
            "SGJAX_COORDINATOR_PORT": "5000"}
  spec = distributed.resolve("slurm", env=shared)
  assert spec.local_device_ids == (1,) and spec.coordinator == "gpu003:5000"
  with pytest.raises(ValueError, match=r"\$SLURM_PROCID is not set"):
    distributed.resolve("slurm", env={})


@pytest.mark.parametrize("nodelist, first", [
    ("node7", "node7"), ("a1,b2", "a1"), ("gpu[003-005,9],cpu1", "gpu003"),
    ("rack[1-2]-n[07-08]", "rack1-n07"), ("n[12,3]", "n12")])
def test_first_host_of_slurm_hostlists(nodelist, first):
  assert distributed.first_host(nodelist) == first


def test_tpu_vm_is_detected_from_its_variables():
  spec = distributed.resolve("auto", env={"TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "0"})
  assert spec.mode == "tpu" and spec.initialize_kwargs() == {}


def test_bad_mode_is_refused():
  with pytest.raises(ValueError, match="--distributed='mpi'"):
    distributed.resolve("mpi", env={})


# ----------------------------------------------------------------------------------------
# Real processes.

def _children(pid: int) -> list[int]:
  """Every live descendant of `pid` (from /proc), deepest last."""
  parents = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        pass
  out, frontier = [], [pid]
  while frontier:
    frontier = [c for c, p in parents.items() if p in frontier]
    out += frontier
  return out


def _process_of_rank(launcher: subprocess.Popen, rank: int) -> int:
  for pid in _children(launcher.pid):
    try:
      with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        is_python = b"python" in f.read()
    except OSError:
      continue
    if is_python and env.get(b"SGJAX_PROCESS_ID") == str(rank).encode():
      return pid
  raise AssertionError(f"no live process with SGJAX_PROCESS_ID={rank}")


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _kill_all(launcher: subprocess.Popen) -> None:
  for pid in [launcher.pid] + _children(launcher.pid):
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  launcher.wait(timeout=30)


def _logs(log_dir) -> str:
  out = []
  for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
    with open(os.path.join(log_dir, name)) as f:
      lines = [l for l in f if "Gloo" not in l]
    out.append(f"--- {name}\n" + "".join(lines[-40:]))
  return "\n".join(out)


class Launch:
  """`launch/multiprocess_local.sh 2 python -m MODULE ...`, killed on any failure."""

  def __init__(self, log_dir, module: str, *flags: str):
    self.log_dir = str(log_dir)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    self.proc = subprocess.Popen(
        ["bash", LAUNCH, "--cpu-devices=4", f"--log-dir={self.log_dir}", str(PROCESSES),
         sys.executable, "-m", module, *flags],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)

  def wait(self, timeout: float) -> tuple[int, str]:
    try:
      out, _ = self.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      _kill_all(self.proc)
      raise AssertionError(f"timed out after {timeout}s\n{_logs(self.log_dir)}") from None
    return self.proc.returncode, out + _logs(self.log_dir)

  def kill(self) -> None:
    if self.proc.poll() is None:
      _kill_all(self.proc)


def config_for(steps: int):
  config = digits.get_config("runlocal")
  config.mesh.preset = "fsdp"  # parameters sharded across both processes
  config.train.update(steps=steps, ckpt_every=2, log_every=1)
  return config


def losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r["step"] for r in records]
  assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
  return {r["step"]: r["loss"] for r in records}


def _complete_steps(workdir) -> list[int]:
  folder = checkpoint.checkpoint_dir(workdir)
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(
      folder) else []


def _train_flags(workdir, steps: int, ckpt_every: int = 2) -> list[str]:
  return ["--config=configs/digits.py:runlocal", f"--workdir={workdir}",
          # fsdp within each process, data-parallel across the two (a 2-slice layout).
          "--config.mesh.preset=fsdp", "--config.mesh.dcn_data=2",
          f"--config.train.steps={steps}",
          f"--config.train.ckpt_every={ckpt_every}", "--config.train.log_every=1"]


def _wait_for(run: Launch, log_dir, done, what: str) -> None:
  deadline = time.time() + 300
  while not done():
    assert run.proc.poll() is None, run.wait(10)[1]
    assert time.time() < deadline, f"{what} not in time\n" + _logs(log_dir)
    time.sleep(0.1)


@pytest.fixture(scope="module")
def killed_and_restarted(tmp_path_factory):
  """A 2-process run SIGKILLed mid-run (the way a preempted pod dies), restarted with 2
  processes, the restart stopped by SIGTERM to one process after 2 more steps (the way one
  VM of a slice is reclaimed), and the 1-process reference to the step it stopped at."""
  tmp = tmp_path_factory.mktemp("two_process")
  workdir = str(tmp / "two")
  run = Launch(tmp / "logs_a", "sgjax.train", *_train_flags(workdir, 1000))
  try:
    _wait_for(run, tmp / "logs_a", lambda: any(s >= 4 for s in _complete_steps(workdir)),
              "a checkpoint at step 4")
    ranks = [_process_of_rank(run.proc, i) for i in range(PROCESSES)]
    os.kill(ranks[0], signal.SIGKILL)  # the coordinator, and the process that writes files
    code, out = run.wait(timeout=60)
  finally:
    run.kill()
  killed = {"code": code, "out": out, "survivors": [pid for pid in ranks if _alive(pid)]}
  restart_from = checkpoint.Checkpointer(workdir).latest_step()
  # metrics.jsonl may still hold the killed run's steps past the checkpoint: wait for the
  # restart's own log line 2 steps past it, then SIGTERM.
  run = Launch(tmp / "logs_b", "sgjax.train", *_train_flags(workdir, 1000))
  line, log = f"step {restart_from + 2}/1000 ", tmp / "logs_b" / "process_0.log"
  try:
    _wait_for(run, tmp / "logs_b", lambda: log.exists() and line in log.read_text(),
              f"the restart's '{line}'")
    os.kill(_process_of_rank(run.proc, 1), signal.SIGTERM)
    code, out = run.wait(timeout=120)
  finally:
    run.kill()
  last = checkpoint.Checkpointer(workdir).latest_step()
  preempted = {"code": code, "out": out, "logs": [
      (tmp / "logs_b" / f"process_{rank}.log").read_text() for rank in range(PROCESSES)]}
  reference = str(tmp / "one")
  train.train(config_for(last), reference)
  return dict(workdir=workdir, reference=reference, killed=killed, preempted=preempted,
              restart_from=restart_from, last=last, tmp=tmp)


@pytest.mark.slow
def test_sigkill_leaves_the_last_complete_checkpoint_restartable(killed_and_restarted):
  run = killed_and_restarted
  assert run["killed"]["code"] != 0, run["killed"]["out"]
  assert "stopping the other" in run["killed"]["out"], run["killed"]["out"]
  assert not run["killed"]["survivors"]
  assert run["restart_from"] >= 4
  # The restart resumed from that checkpoint and trained on: every step logged once.
  assert run["last"] >= run["restart_from"] + 2
  assert sorted(losses(run["workdir"])) == list(range(1, run["last"] + 1))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_one_step_with_its_checkpoint(
    killed_and_restarted):
  run = killed_and_restarted
  assert run["preempted"]["code"] == train.EXIT_PREEMPTED, run["preempted"]["out"]
  assert max(losses(run["workdir"])) == run["last"]
  for log in run["preempted"]["logs"]:
    assert f"stopped at step {run['last']} with a checkpoint" in log, run["preempted"]["out"]


@pytest.mark.slow
def test_two_processes_log_the_losses_of_one_process(killed_and_restarted):
  run = killed_and_restarted
  got, expected = losses(run["workdir"]), losses(run["reference"])
  assert sorted(got) == sorted(expected) == list(range(1, run["last"] + 1))
  chex.assert_trees_all_close(np.array([got[s] for s in expected]),
                              np.array(list(expected.values())), rtol=0, atol=1e-5)
  with open(os.path.join(run["workdir"], "config.json")) as f:
    assert json.load(f)["mesh"] == {"preset": "fsdp", "tensor": 1, "dcn_data": 2}


@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one_process_and_training_continues(
    killed_and_restarted):
  run = killed_and_restarted
  more = run["last"] + 2
  train.train(config_for(more), run["workdir"])  # resumes the 2-process checkpoint
  train.train(config_for(more), run["reference"])
  got, expected = losses(run["workdir"]), losses(run["reference"])
  chex.assert_trees_all_close(np.array([got[s] for s in range(1, more + 1)]),
                              np.array([expected[s] for s in range(1, more + 1)]), rtol=0,
                              atol=1e-5)


@pytest.mark.slow
def test_two_process_sampling_writes_the_images_of_one_process(killed_and_restarted):
  run = killed_and_restarted
  out_two, out_one = str(run["tmp"] / "samples_two"), str(run["tmp"] / "samples_one")
  common = dict(step=run["last"], steps=3, num_samples=20, batch_size=16, seed=3)
  code, log = Launch(run["tmp"] / "logs_sample", "sgjax.sample",
                     f"--workdir={run['workdir']}", f"--out={out_two}", "--guidance=sg",
                     "--omega=2", "--gamma_weak=0.5",
                     *(f"--{k}={v}" for k, v in common.items())).wait(180)
  assert code == 0, log
  sample.run(run["workdir"], guidance_lib.GuidanceConfig(rule="sg", omega=2.0, gamma_weak=0.5),
             out_one, **common)
  two, one = np.load(os.path.join(out_two, "samples.npz")), np.load(
      os.path.join(out_one, "samples.npz"))
  assert two["arr_0"].shape == (20, 8, 8, 1)
  chex.assert_trees_all_equal((two["arr_0"], two["arr_1"]), (one["arr_0"], one["arr_1"]))
  with open(os.path.join(out_two, "sampling.json")) as f:
    assert json.load(f)["devices"] == 8


@pytest.mark.slow
def test_two_processes_precompute_latents_each_image_once_as_one_process_does(tmp_path):
  source = helpers.image_folder(tmp_path / "images", per_class=9)
  vae_dir = os.path.join(ROOT, "tests", "parity", "fixtures", "vae", "vae")
  flags = [f"--source={source}", f"--vae={vae_dir}", "--resolution=16", "--shard_size=5",
           "--batch_size=8", "--flip"]
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  code, log = Launch(tmp_path / "logs", "sgjax.latents", f"--out={two}", *flags).wait(240)
  assert code == 0, log
  latents.precompute(source, vae_dir, one, resolution=16, shard_size=5, batch_size=8,
                     flip=True)
  # 18 readable images and their flips in 8 shards, split between the hosts.
  assert helpers.latent_records(two) == helpers.latent_records(one)
  assert sorted(helpers.latent_records(two)) == [(i, f) for i in range(18)
                                                 for f in (False, True)]
  chex.assert_trees_all_close(np.stack(helpers.latent_records(two, "mean")),
                              np.stack(helpers.latent_records(one, "mean")), rtol=0, atol=1e-5)
  with open(os.path.join(two, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["num_shards"] == 8 and manifest["num_unreadable"] == 1
