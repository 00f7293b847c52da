"""Training: the EMA, resume, sharding invariance, checkpoints across topologies, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from configs import digits
from sgjax import checkpoint, sharding, train, train_state
from sgjax import config as config_lib
from tests.helpers import losses, runlocal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fsdp_8_devices_match_1_device_and_checkpoints_move_between_them(tmp_path):
  config = runlocal(steps=8, ckpt_every=4)
  config.mesh.preset = "fsdp"
  one = jax.devices()[:1]
  reference = str(tmp_path / "eight")  # 8 devices throughout
  train.train(config, reference)
  expected = losses(reference)
  assert sorted(expected) == list(range(1, 9))
  # 1 device for 4 steps: the same losses as 8 devices; then resumed on 8 devices.
  up = str(tmp_path / "one_then_eight")
  train.train(_with(config, steps=4), up, devices=one)
  chex.assert_trees_all_close(np.array([losses(up)[s] for s in range(1, 5)]),
                              np.array([expected[s] for s in range(1, 5)]), rtol=0, atol=1e-5)
  train.train(config, up)
  # 8 devices for 4 steps, then resumed on 1 device.
  down = str(tmp_path / "eight_then_one")
  train.train(_with(config, steps=4), down)
  train.train(config, down, devices=one)
  for workdir in (up, down):
    got = losses(workdir)
    chex.assert_trees_all_close(np.array([got[s] for s in expected]),
                                np.array(list(expected.values())), rtol=0, atol=1e-5)
  model, saved_config, step = checkpoint.load_model(down)
  assert step == 8 and saved_config["model"]["width"] == config.model.width
  assert model.cfg.sparsity == "routing"


def test_checkpoint_trained_with_cudnn_attention_loads_with_xla_attention_off_gpu(tmp_path):
  config = digits.get_config("runlocal")
  config.model.update(dtype="bfloat16", attention="cudnn")
  model_cfg = config_lib.model_config(config.model)
  tx = train_state.make_optimizer(train_state.OptimConfig(lr=1e-3))
  _, _, shardings = train_state.abstract_state(model_cfg, tx, sharding.make_mesh("data"), "data")
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(3, train_state.init_state(model_cfg, tx, shardings), config.to_dict())
  ckpt.close()
  model, saved_config, step = checkpoint.load_model(str(tmp_path))
  assert step == 3 and saved_config["model"]["attention"] == "cudnn"
  assert model.cfg.attention == ("cudnn" if jax.default_backend() == "gpu" else "xla")
  labels = np.arange(4, dtype=np.int32)
  out = model(np.zeros((4, 8, 8, 1), np.float32), np.full((4,), 0.5, np.float32), labels)
  assert out.shape == (4, 8, 8, 1) and np.isfinite(np.asarray(out)).all()


@pytest.fixture(scope="module")
def saved_every_step(tmp_path_factory):
  """(config, workdir) of a 5-step run saved at every step, keeping the newest and the
  multiples of 2."""
  config = runlocal(steps=5, ckpt_every=1, keep_ckpts=1, keep_every=2)
  workdir = str(tmp_path_factory.mktemp("every_step") / "w")
  train.train(config, workdir)
  return config, workdir


def restored_state(config, workdir, step=None):
  """The whole train state (step, params, EMA, optimizer state) of checkpoint `step` (default:
  the newest) of a run of `config`, as numpy arrays."""
  model_cfg = config_lib.model_config(config.model)
  tx = train_state.make_optimizer(train_state.OptimConfig.from_train_config(config.train))
  _, abstract, _ = train_state.abstract_state(
      model_cfg, tx, sharding.make_mesh(config.mesh.preset), config.mesh.preset, config.seed)
  ckpt = checkpoint.Checkpointer(str(workdir), async_save=False)
  try:
    return jax.device_get(ckpt.restore(step or ckpt.latest_step(), abstract))
  finally:
    ckpt.close()


def _largest_gap(a, b) -> float:
  return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_each_train_step_moves_the_ema_by_one_minus_decay_toward_the_new_params(
    saved_every_step):
  config, workdir = saved_every_step
  decay = config.train.ema_decay
  before, after = restored_state(config, workdir, 4), restored_state(config, workdir, 5)
  # Step 5 moved the params, and the EMA lags them: old and new params, or decay and
  # 1 - decay, give different EMAs.
  assert _largest_gap(after["params"], before["params"]) > 1e-4
  assert _largest_gap(after["params"], before["ema"]) > 1e-3
  # ema_5 = decay * ema_4 + (1 - decay) * params_5, in float64.
  f64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
  expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, f64(before["ema"]),
                          f64(after["params"]))
  chex.assert_trees_all_close(f64(after["ema"]), expected, rtol=1e-6, atol=1e-7)


def test_load_model_gives_the_ema_weights_unless_asked_for_the_raw_params(saved_every_step):
  config, workdir = saved_every_step
  state = restored_state(config, workdir)
  weights = lambda model: jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  model, _, step = checkpoint.load_model(workdir)
  assert step == int(state["step"]) == 5
  chex.assert_trees_all_equal(weights(model), state["ema"])
  chex.assert_trees_all_equal(weights(checkpoint.load_model(workdir, ema=False)[0]),
                              state["params"])


def test_checkpoints_at_multiples_of_keep_every_outlive_keep_ckpts(saved_every_step, tmp_path):
  assert sorted(checkpoint.Checkpointer(saved_every_step[1]).all_steps()) == [2, 4, 5]
  with pytest.raises(ValueError, match="keep_every=3 must be 0 .* multiple of"):
    train.train(runlocal(ckpt_every=2, keep_every=3), str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists()


def _with(config, **train_overrides):
  config = config.copy_and_resolve_references()
  config.train.update(train_overrides)
  return config


def run_cli(workdir, *flags, wait=True):
  cmd = [sys.executable, "-m", "sgjax.train", "--config=configs/digits.py:runlocal",
         f"--workdir={workdir}", *flags]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if wait:
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out
  return proc


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted_run_bit_for_bit(tmp_path):
  steps = ["--config.train.steps=40", "--config.train.ckpt_every=1000"]
  code, out = run_cli(tmp_path / "straight", *steps)
  assert code == 0, out
  interrupted = tmp_path / "interrupted"
  proc = run_cli(interrupted, *steps, wait=False)
  metrics = interrupted / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 10):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == train.EXIT_PREEMPTED, out
  stopped_at = checkpoint.Checkpointer(str(interrupted)).latest_step()
  assert 10 <= stopped_at < 40, out  # saved where it stopped, not at a scheduled step
  code, out = run_cli(interrupted, *steps)
  assert code == 0, out
  resumed, reference = losses(interrupted), losses(tmp_path / "straight")
  assert sorted(resumed) == sorted(reference) == list(range(1, 41))
  assert [resumed[s] for s in reference] == [reference[s] for s in reference]
  # Not only the losses: params, EMA and optimizer state of step 40 are the same bits.
  config = runlocal(steps=40, ckpt_every=1000)
  final = restored_state(config, interrupted)
  assert int(final["step"]) == 40
  chex.assert_trees_all_equal(final, restored_state(config, tmp_path / "straight"))


def test_unknown_config_field_fails_before_training(tmp_path):
  code, out = run_cli(tmp_path / "w", "--config.train.bogus=1")
  assert code != 0 and "bogus" in out
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_missing_dataset_fails_fast_with_instructions(tmp_path):
  config = runlocal()
  config.data.update(source="latents", path=str(tmp_path / "nothing-*.array_record"))
  with pytest.raises(FileNotFoundError, match="matches no ArrayRecord shard"):
    train.train(config, str(tmp_path / "w"))


def test_data_that_does_not_fit_the_model_fails_before_training(tmp_path):
  config = runlocal()
  config.model.input_size = 16  # the digits are 8 x 8
  with pytest.raises(ValueError, match=r"images of shape \(8, 8, 1\).*takes \(16, 16, 1\)"):
    train.train(config, str(tmp_path / "size"))
  config = runlocal()
  config.model.num_classes = 7  # digits 7..9 would index past the embedding table
  with pytest.raises(ValueError, match=r"batch of step 1: labels in \[0, [789]\].*classes=7"):
    train.train(config, str(tmp_path / "labels"))
  assert not checkpoint.Checkpointer(str(tmp_path / "labels")).all_steps()


def test_batch_not_divisible_by_data_parallel_size_raises(tmp_path):
  config = runlocal(batch_size=12)  # 8 devices
  with pytest.raises(ValueError, match="train.batch_size=12 is not divisible"):
    train.train(config, str(tmp_path / "w"))


def test_workdir_of_another_model_is_refused_but_more_steps_resume(tmp_path):
  workdir = str(tmp_path / "w")
  train.train(runlocal(steps=2, ckpt_every=2), workdir)
  other = runlocal(steps=2, ckpt_every=2)
  other.model.width = 64
  with pytest.raises(ValueError, match="model.width: 32 -> 64"):
    train.train(other, workdir)
  other_data = runlocal(steps=2, ckpt_every=2)
  other_data.data.source = "tfds"
  with pytest.raises(ValueError, match="data.source"):
    train.train(other_data, workdir)
  train.train(runlocal(steps=4, ckpt_every=2), workdir)  # only train.steps changed
  assert sorted(losses(workdir)) == [1, 2, 3, 4]
  # The checkpoint's own config is the authority: a lost config.json changes nothing.
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(ValueError, match="model.width: 32 -> 64"):
    train.train(other, workdir)


def test_run_that_stopped_before_its_first_checkpoint_keeps_its_logs_from_another_run(
    tmp_path):
  workdir = str(tmp_path / "w")
  train.train(runlocal(steps=3, ckpt_every=100, log_every=1), workdir)
  for step in checkpoint.Checkpointer(workdir).all_steps():  # as if killed before any save
    shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(workdir), str(step)))
  other = digits.get_config("runlocal,sparsity=masking")
  with pytest.raises(ValueError, match="model.sparsity: 'routing' -> 'masking'"):
    train.train(other, workdir)
  assert sorted(losses(workdir)) == [1, 2, 3]  # its metrics are untouched
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["sparsity"] == "routing"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "w")
  # Warmup gives step 1 a zero learning rate; step 2's update (lr 5e29) blows the weights up
  # (their norm overflows) while step 2's loss is still finite.
  exploding = runlocal(steps=6, ckpt_every=1, lr=1e30)
  with pytest.raises(FloatingPointError, match=r"param_norm.*last good checkpoint \(step 1\)"):
    train.train(exploding, workdir)
  assert checkpoint.Checkpointer(workdir).latest_step() == 1
  # Resuming with a sane learning rate (an allowed change) continues from step 1.
  train.train(runlocal(steps=4, ckpt_every=1), workdir)
  assert sorted(losses(workdir)) == [1, 2, 3, 4]
