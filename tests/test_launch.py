"""launch/ scripts: --dry-run prints the exact commands; the local launcher runs, fails fast
and passes signals on."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(ROOT, "launch", "multiprocess_local.sh")
TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")
_NO_CLUSTER = ("SLURM_", "TPU_", "SGJAX_")


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(_NO_CLUSTER)}
  return {**env, **extra}


def run(script, *args, env=None, timeout=60):
  return subprocess.run(["bash", script, *args], cwd=ROOT, env=env or _env(),
                        capture_output=True, text=True, timeout=timeout)


def commands(stdout: str) -> list[list[str]]:
  return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


# ---------------------------------------------------------------- multiprocess_local.sh

def test_local_dry_run_gives_each_process_the_coordinator_and_its_id():
  out = run(LOCAL, "--dry-run", "--cpu-devices=4", "--port=23456", "3", sys.executable, "-m",
            "sgjax.train", "--workdir=/tmp/a b", env=_env(XLA_FLAGS="--xla_x=1"
                                                     " --xla_force_host_platform_device_count=8"))
  assert out.returncode == 0, out.stderr
  lines = commands(out.stdout)
  assert len(lines) == 3
  for i, cmd in enumerate(lines):
    assert cmd[0] == "env"
    assert cmd[-4:] == [sys.executable, "-m", "sgjax.train", "--workdir=/tmp/a b"]
    assert {"SGJAX_COORDINATOR=localhost:23456", "SGJAX_NUM_PROCESSES=3",
            f"SGJAX_PROCESS_ID={i}", "JAX_PLATFORMS=cpu",
            "XLA_FLAGS=--xla_x=1 --xla_force_host_platform_device_count=4"} <= set(cmd)


def test_local_runs_every_process_and_picks_a_free_port():
  # One write() per process: both share the pipe, and print() may split a line in two.
  script = ("import os; os.write(1, f\"rank {os.environ['SGJAX_PROCESS_ID']}"
            " {os.environ['SGJAX_COORDINATOR']}\\n\".encode())")
  out = run(LOCAL, "2", sys.executable, "-c", script)
  assert out.returncode == 0, out.stderr
  ranks = sorted(line.split()[1] for line in out.stdout.splitlines() if line.startswith("rank"))
  ports = {line.split()[2] for line in out.stdout.splitlines() if line.startswith("rank")}
  assert ranks == ["0", "1"] and len(ports) == 1 and ports.pop().startswith("localhost:")


def test_local_failure_stops_the_others_and_returns_its_status(tmp_path):
  script = ("import os, sys, time\n"
            "if os.environ['SGJAX_PROCESS_ID'] == '1': sys.exit(3)\n"
            "time.sleep(120)\n")
  start = time.time()
  out = run(LOCAL, f"--log-dir={tmp_path}", "2", sys.executable, "-c", script, timeout=60)
  assert out.returncode == 3, out.stderr
  assert time.time() - start < 30
  assert "process 1" in out.stderr and "stopping the other 1" in out.stderr
  assert sorted(os.listdir(tmp_path)) == ["process_0.log", "process_1.log"]


def test_local_passes_one_sigterm_to_each_process_and_lets_each_finish_its_checkpoint(
    tmp_path):
  # Each process counts the SIGTERMs it gets (training aborts without a checkpoint on a
  # second one), then exits as training does after saving (status 75); process 0 takes
  # longer, and the early exit of process 1 must not get it stopped.
  script = ("import os, signal, time\n"
            "got = []\n"
            "signal.signal(signal.SIGTERM, lambda *a: got.append(1))\n"
            "open(os.environ['OUT'] + '.ready' + os.environ['SGJAX_PROCESS_ID'], 'w').close()\n"
            "deadline = time.time() + 60\n"
            "while not got and time.time() < deadline: time.sleep(0.05)\n"
            "time.sleep(3 if os.environ['SGJAX_PROCESS_ID'] == '0' else 1)\n"
            "open(os.environ['OUT'] + os.environ['SGJAX_PROCESS_ID'], 'w').write(str(len(got)))\n"
            "raise SystemExit(75)\n")
  out_prefix = str(tmp_path / "count")
  proc = subprocess.Popen(["bash", LOCAL, "2", sys.executable, "-c", script], cwd=ROOT,
                          env=_env(OUT=out_prefix), start_new_session=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 30
    while not all(os.path.exists(f"{out_prefix}.ready{i}") for i in range(2)):
      assert proc.poll() is None and time.time() < deadline, proc.communicate()
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 75, err
  for i in range(2):
    with open(f"{out_prefix}{i}") as f:
      assert f.read() == "1"


@pytest.mark.parametrize("args, message", [
    (["2"], "expected N and a command"), (["two", "echo"], "N=two must be a positive"),
    (["--bogus", "2", "echo"], "unknown option --bogus")])
def test_local_usage_errors(args, message):
  out = run(LOCAL, *args)
  assert out.returncode == 2 and message in out.stderr


# ---------------------------------------------------------------- tpu_pod.sh

def test_tpu_dry_run_create_setup_run_stop_delete():
  where = ["--name=pod1", "--zone=us-east5-a", "--project=proj", "--type=v5p-64"]
  create = commands(run(TPU, "--dry-run", *where, "--spot", "create").stdout)
  assert create == [["gcloud", "compute", "tpus", "tpu-vm", "create", "pod1",
                     "--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-64",
                     "--version=tpu-ubuntu2204-base", "--spot"]]

  setup = run(TPU, "--dry-run", *where, "setup").stdout.splitlines()
  assert setup[0].startswith(f"git -C {ROOT} ls-files") and "| tar --null -czf" in setup[0]
  scp, ssh = shlex.split(setup[1]), shlex.split(setup[2])
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"]
  remote = next(a for a in ssh if a.startswith("--command="))
  assert "bash launch/setup.sh" in remote and "jax[tpu]" in remote

  (train,) = commands(run(TPU, "--dry-run", *where, "run", "--",
                          "--config=configs/imagenet256.py:model=SiT-XL/2",
                          "--config.data.path=gs://b/latents/train-*").stdout)
  assert train[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"]
  assert "--worker=all" in train
  remote = shlex.split(next(a for a in train if a.startswith("--command="))[10:])
  assert remote[:3] == ["cd", "~/sgjax", "&&"]
  assert remote[3:] == [".venv/bin/python", "-m", "sgjax.train", "--distributed=tpu",
                        "--config=configs/imagenet256.py:model=SiT-XL/2",
                        "--config.data.path=gs://b/latents/train-*"]

  (stop,) = commands(run(TPU, "--dry-run", *where, "stop").stdout)
  assert "--worker=all" in stop and "pkill -TERM" in stop[-1]
  (delete,) = commands(run(TPU, "--dry-run", *where, "delete").stdout)
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod1",
                    "--zone=us-east5-a", "--project=proj", "--quiet"]


def test_tpu_dry_run_runs_nothing_and_bad_actions_fail():
  out = run(TPU, "--dry-run", "create", env=_env(PATH="/nonexistent:/usr/bin:/bin"))
  assert out.returncode == 0 and out.stdout.startswith("gcloud compute tpus tpu-vm create")
  bad = run(TPU, "--dry-run", "launch")
  assert bad.returncode == 2 and "unknown action launch" in bad.stderr
  extra = run(TPU, "--dry-run", "create", "--", "--workdir=x")
  assert extra.returncode == 2 and "only 'run' takes arguments" in extra.stderr


# ---------------------------------------------------------------- slurm_gpu.sbatch

def test_slurm_dry_run_outside_a_job_shows_the_submission_and_the_step():
  out = run(SLURM, "--dry-run", "--config=configs/imagenet256.py:model=SiT-XL/2",
            "--workdir=/shared/run")
  assert out.returncode == 0, out.stderr
  sbatch, srun = commands(out.stdout)
  assert sbatch == ["sbatch", f"--chdir={ROOT}", f"--export=ALL,SGJAX_ROOT={ROOT}", SLURM,
                    "--module=sgjax.train",
                    "--config=configs/imagenet256.py:model=SiT-XL/2", "--workdir=/shared/run"]
  assert srun == ["srun", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-task=1",
                  "--kill-on-bad-exit=1", f"{ROOT}/.venv/bin/python", "-m", "sgjax.train",
                  "--distributed=slurm", "--config=configs/imagenet256.py:model=SiT-XL/2",
                  "--workdir=/shared/run"]


def test_slurm_dry_run_inside_a_job_uses_its_allocation():
  env = _env(SLURM_JOB_ID="77", SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NUM_NODES="4",
             SLURM_NTASKS_PER_NODE="4(x4)")
  out = run(SLURM, "--dry-run", "--module=sgjax.sample", "--workdir=/shared/run", env=env)
  assert out.returncode == 0, out.stderr
  assert commands(out.stdout) == [[
      "srun", "--nodes=4", "--ntasks-per-node=4", "--gpus-per-task=1", "--kill-on-bad-exit=1",
      f"{ROOT}/.venv/bin/python", "-m", "sgjax.sample", "--distributed=slurm",
      "--workdir=/shared/run"]]


@pytest.mark.parametrize("status", [75, 0, 1])
def test_slurm_job_requeues_itself_only_when_training_stopped_with_a_checkpoint(
    tmp_path, status):
  # SLURM's commands replaced by scripts that log their arguments; srun exits with `status`
  # (75: sgjax.train stopped on SLURM's SIGTERM after saving).
  bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
  bin_dir.mkdir()
  for name, code in (("srun", status), ("scontrol", 0)):
    (bin_dir / name).write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> {log}\nexit {code}\n')
    (bin_dir / name).chmod(0o755)
  env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77", SGJAX_ROOT=ROOT,
             SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="2")
  # Started outside the repository, as a job that the script submitted from elsewhere.
  out = subprocess.run(["bash", SLURM, "--workdir=/shared/run"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == status, out.stderr
  calls = log.read_text().splitlines()
  assert calls[0].startswith("srun ") and calls[0].endswith(
      f"{ROOT}/.venv/bin/python -m sgjax.train --distributed=slurm --workdir=/shared/run")
  assert calls[1:] == (["scontrol requeue 77"] if status == 75 else [])


def test_slurm_header_asks_for_a_checkpoint_before_the_time_limit():
  with open(SLURM) as f:
    header = [line.strip() for line in f if line.startswith("#SBATCH")]
  assert "#SBATCH --signal=TERM@300" in header and "#SBATCH --requeue" in header


# ---------------------------------------------------------------- bench_gpu.sh

def test_gpu_bench_dry_run_gives_commands_the_benchmark_accepts():
  script = os.path.join(ROOT, "launch", "bench_gpu.sh")
  out = run(script, "--dry-run", "--out=/tmp/gpu bench", env=_env(PYTHON="py"))
  assert out.returncode == 0, out.stderr
  cmds = commands(out.stdout)
  assert [c[:3] for c in cmds] == [["py", "-m", "sgjax.bench"]] * 3
  # sgjax.bench's own flag parser reads each command (an unknown flag would fail here).
  parse = ("import json, sys\nfrom absl import flags\nfrom sgjax import bench\n"
           "bench.define_flags()\nfor argv in json.loads(sys.argv[1]):\n"
           "  flags.FLAGS.unparse_flags()\n  flags.FLAGS(['bench', *argv])\n"
           "  print(json.dumps(flags.FLAGS.flag_values_dict()))\n")
  parsed = subprocess.run([sys.executable, "-c", parse, json.dumps([c[3:] for c in cmds])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
  values = [json.loads(line) for line in parsed.stdout.splitlines()]
  assert [(v["suite"], v["attention"], v["out"]) for v in values] == [
      ("train", "xla", "/tmp/gpu bench"), ("train", "cudnn", "/tmp/gpu bench"),
      ("sample", "xla", "/tmp/gpu bench")]
  assert all(v["model"] == "SiT-XL/2" and v["dtype"] == "bfloat16" for v in values)
  assert values[2]["sample_steps"] == 40 and values[2]["sample_batch"] >= 64
  assert {"unguided", "cfg", "sg_flops", "sg_fid"} <= set(values[2]["settings"])
  assert len(commands(run(script, "--dry-run", "--only=sample").stdout)) == 1
  bad = run(script, "--dry-run", "--only=train-xla,oops")
  assert bad.returncode == 2 and "oops" in bad.stderr and not bad.stdout
