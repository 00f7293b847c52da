"""Damaged checkpoints: training resumes from the newest one that reads, sampling names the
damaged step, nothing is deleted, and the command line says it in one line."""

import glob
import logging
import os
import shutil
import subprocess
import sys
import types

import chex
import pytest
from flax import nnx

from configs import digits
from sgjax import checkpoint, paths, sharding, train, train_state
from sgjax import config as config_lib
from tests.helpers import losses, runlocal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_dir(workdir, step):
  return os.path.join(checkpoint.checkpoint_dir(workdir), str(step))


def array_files(workdir, step, item):
  """The data files of one item (params, ema, opt_state) of a step: its OCDBT `d/` files."""
  files = glob.glob(os.path.join(step_dir(workdir, step), item, "**", "d", "*"), recursive=True)
  assert files, f"no data files under {step_dir(workdir, step)}/{item}"
  return files


def truncate_arrays(workdir, step, item):
  """Cuts every data file of `item` at `step` to half its size (a copy cut short)."""
  for path in array_files(workdir, step, item):
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, losses) of a 4-step run with checkpoints at steps 2 and 4: tests damage
  copies of it."""
  workdir = str(tmp_path_factory.mktemp("trained") / "w")
  train.train(runlocal(steps=4, ckpt_every=2), workdir)
  assert checkpoint.Checkpointer(workdir).all_steps() == [2, 4]
  return workdir, losses(workdir)


@pytest.fixture
def run(trained, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(trained[0], workdir)
  return workdir


def test_truncated_newest_checkpoint_is_set_aside_and_training_resumes_from_previous(
    trained, run, caplog):
  truncate_arrays(run, 4, "params")
  with caplog.at_level(logging.WARNING):
    train.train(runlocal(steps=6, ckpt_every=2), run)
  assert "the checkpoint at step 4 in" in caplog.text and "cannot be read" in caplog.text
  # Resumed from step 2: steps 3 and 4 repeat the undamaged run's losses bit for bit.
  resumed = losses(run)
  assert sorted(resumed) == list(range(1, 7))
  assert [resumed[s] for s in (1, 2, 3, 4)] == [trained[1][s] for s in (1, 2, 3, 4)]
  # Step 4 was saved again; the damaged one is kept aside, where orbax does not look.
  assert checkpoint.Checkpointer(run).all_steps() == [4, 6]
  aside = glob.glob(step_dir(run, 4) + ".damaged-*")
  assert len(aside) == 1 and sorted(os.listdir(aside[0])) == sorted(
      os.listdir(step_dir(trained[0], 4)))


def test_no_readable_checkpoint_is_refused_naming_each_step_and_its_damage(trained, run):
  os.truncate(os.path.join(step_dir(run, 4), "config", "metadata"), 10)  # broken JSON
  for path in array_files(run, 2, "opt_state"):  # array files gone
    os.remove(path)
  with pytest.raises(ValueError, match=r"no checkpoint in .* can be read: step 4: "
                     r"JSONDecodeError: .*; step 2: .*Move the damaged step folders"):
    train.train(runlocal(steps=6, ckpt_every=2), run)
  assert sorted(os.listdir(checkpoint.checkpoint_dir(run))) == ["2", "4"]  # nothing moved
  assert losses(run) == trained[1]  # nor the logs cut back


def test_sampling_names_a_damaged_step_and_by_default_takes_the_newest_that_reads(
    trained, run, caplog, monkeypatch):
  reported = []
  monkeypatch.setattr(sys, "unraisablehook", reported.append)
  truncate_arrays(run, 4, "ema")
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=r"step 4 .* cannot be read: .* other complete checkpoints: \[2\]"):
    checkpoint.load_model(run, step=4)
  with caplog.at_level(logging.WARNING):
    model, _, step = checkpoint.load_model(run)
  assert step == 2 and "step 4" in caplog.text
  reference, _, _ = checkpoint.load_model(trained[0], step=2)
  chex.assert_trees_all_equal(nnx.state(model), nnx.state(reference))
  # The reads that fail or finish after the reported one (they find orbax's event loop
  # closed) print no trail of tracebacks; other reports pass on.
  closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
  sys.unraisablehook(closed)
  sys.unraisablehook(other)
  assert reported == [other]
  caplog.clear()
  unretrieved = "Task exception was never retrieved\nfuture: <Task coro=<{}() defined at {}>>"
  logging.getLogger("asyncio").error(
      unretrieved.format("async_deserialize", "site-packages/orbax/checkpoint/serialization.py"))
  logging.getLogger("asyncio").error(unretrieved.format("mine", "app.py"))
  assert "async_deserialize" not in caplog.text and "mine()" in caplog.text


def test_unfinished_save_is_skipped_and_named(run, caplog):
  os.rename(step_dir(run, 4), step_dir(run, 4) + ".orbax-checkpoint-tmp-1234")  # killed mid-save
  with caplog.at_level(logging.WARNING):
    _, _, step = checkpoint.load_model(run)
  assert step == 2
  assert "checkpoint step 4: its save never completed" in caplog.text
  with pytest.raises(FileNotFoundError, match=r"--step=4: its save never completed"):
    checkpoint.run_config(run, step=4)


def test_object_store_step_without_commit_marker_is_an_unfinished_save(gcs_bucket, caplog):
  # In an object store a rename is a copy, so orbax marks a finished step with a file written
  # last (commit_success.txt) instead of renaming its temporary folder.
  workdir = f"{gcs_bucket}/runs/unfinished"
  config = digits.get_config("runlocal")
  model_cfg = config_lib.model_config(config.model)
  tx = train_state.make_optimizer(train_state.OptimConfig(lr=1e-3))
  _, _, shardings = train_state.abstract_state(model_cfg, tx, sharding.make_mesh("data"), "data")
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  for step in (2, 4):
    ckpt.save(step, train_state.init_state(model_cfg, tx, shardings, seed=step),
              config.to_dict())
  ckpt.close()
  (paths.resolve(checkpoint.checkpoint_dir(workdir)) / "4" / "commit_success.txt").unlink()
  with caplog.at_level(logging.WARNING):
    _, _, step = checkpoint.load_model(workdir)
  assert step == 2
  assert "checkpoint step 4: its save never completed" in caplog.text
  with pytest.raises(FileNotFoundError, match=r"--step=4: its save never completed"):
    checkpoint.run_config(workdir, step=4)


def test_sample_command_reports_a_damaged_step_in_one_line(run, tmp_path):
  truncate_arrays(run, 4, "ema")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  env.pop("SGJAX_TRACEBACK", None)
  proc = subprocess.run(
      [sys.executable, "-m", "sgjax.sample", f"--workdir={run}", "--step=4", "--guidance=none",
       "--num_samples=8", "--batch_size=8", "--steps=2", f"--out={tmp_path / 'out'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  assert "sgjax.sample: error: the checkpoint at step 4 in" in proc.stderr
  assert not (tmp_path / "out").exists()
