"""sgjax.bench end to end on a tiny model: its tables, ratios and trace are consistent."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from sgjax import bench, checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_interleaved_timing_calls_each_setting_once_per_round():
  calls = []
  times = bench.time_interleaved({"a": lambda: calls.append("a"),
                                  "b": lambda: calls.append("b")}, repeats=3)
  assert calls == ["a", "b", "b", "a", "a", "b"]
  assert [len(v) for v in times.values()] == [3, 3]


@pytest.mark.slow
def test_bench_writes_consistent_tables_and_a_profile(tmp_path):
  out = subprocess.run(
      # dense last: speedups refer to it wherever it comes.
      [sys.executable, "-m", "sgjax.bench", "--suite=all", "--modes=routing,dense",
       "--model=DiT-S/8", "--input_size=16", "--batch=4", "--sample_batch=4",
       "--sample_steps=2", "--repeats=2", "--steps_per_repeat=1", "--matmul_size=64",
       "--settings=unguided,sg_flops", "--forward_gammas=0.5,0.9", f"--out={tmp_path}",
       f"--profile_dir={tmp_path / 'trace'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr[-3000:]
  (path,) = glob.glob(str(tmp_path / "bench-*.json"))
  with open(path) as f:
    result = json.load(f)
  assert result["platform"] == "cpu" and result["flags"]["model"] == "DiT-S/8"
  routed, dense = result["train"]
  assert (dense["sparsity"], routed["sparsity"]) == ("dense", "routing")
  assert routed["compiled_tflops_per_step"] < dense["compiled_tflops_per_step"]
  assert routed["speedup_efficiency"] == pytest.approx(routed["speedup_measured"]
                                                      / routed["speedup_predicted"])
  assert dense["program_memory_gib"] > 0 and routed["program_memory_gib"] > 0
  assert routed["images_per_s"] == pytest.approx(4 / routed["step_s"])
  assert routed["speedup_measured"] == pytest.approx(dense["step_s"] / routed["step_s"])
  unguided, sg = result["sample"]
  assert sg["setting"] == "sg_flops" and sg["nfe"] == 2 * unguided["nfe"] == 4
  assert sg["efficiency_vs_unguided"] == pytest.approx(sg["speedup_vs_unguided"]
                                                       / sg["predicted_vs_unguided"])
  assert unguided["batch_min_s"] <= unguided["batch_s"] <= unguided["batch_max_s"]
  assert sg["speedup_vs_unguided"] == pytest.approx(unguided["batch_s"] / sg["batch_s"])
  forward = result["forward"]
  assert [row["gamma"] for row in forward] == [0.0, 0.5, 0.9]
  assert forward[0]["gflops_per_image"] > forward[1]["gflops_per_image"] > forward[2][
      "gflops_per_image"]
  with open(path[:-len(".json")] + ".md") as f:
    table = f.read()
  assert "### Training (batch 4)" in table and "| sg_flops |" in table
  assert "### One pass per sampling step at each sparsity rate" in table
  assert glob.glob(str(tmp_path / "trace" / "**" / "*.xplane.pb"), recursive=True)


def fake_train(cfg, batch):
  """compile_train's stand-in (a model's step takes a minute to compile here): a train state
  of 0.75 MiB whose step adds 1 to every entry, donating the state as the real one does."""
  del cfg, batch
  state = {name: {"w": jnp.zeros((256, 256))} for name in checkpoint.STATE_ITEMS}
  step = jax.jit(lambda state, data: (jax.tree.map(lambda w: w + 1, state), {}),
                 donate_argnums=0)
  return step, state, None, {}


def test_io_suite_times_checkpointing_steps_and_the_input_pipeline(tmp_path, monkeypatch):
  monkeypatch.setattr(bench, "model_config", lambda args, sparsity: None)
  monkeypatch.setattr(bench, "compile_train", fake_train)
  args = {"model": "fake", "input_size": 8, "in_channels": 4, "batch": 8, "repeats": 2,
          "checkpoint_dir": str(tmp_path / "ckpt"), "loader_workers": ["0", "1"],
          "loader_threads": ["0", "2"], "loader_records": 64, "loader_batches": 3}
  # grain's worker processes read its absl flags, which app.run parses in the bench itself.
  parsed = flags.FLAGS.is_parsed()
  flags.FLAGS.mark_as_parsed()
  try:
    checkpoints, loader = bench.run_io_suite(args)
  finally:
    if not parsed:
      flags.FLAGS.unparse_flags()
  none, sync, async_ = checkpoints
  assert [row["save"] for row in checkpoints] == ["none", "sync", "async"]
  for row in checkpoints:
    assert 0 < row["step_min_s"] <= row["step_s"] <= row["step_max_s"]
    assert row["next_step_s"] > 0 and row["state_gib"] > 0
    assert row["vs_plain_step"] == pytest.approx(row["step_s"] / none["step_s"])
  # A sync checkpoint is written when save() returns; an async one is waited for after.
  assert none["written_s"] is None
  assert sync["written_s"] >= sync["step_s"] and async_["written_s"] >= async_["step_s"]
  # The newest 2 checkpoints are kept, complete, each holding the state of its step although
  # the next step donated that state while an async save was writing it: the k-th
  # checkpointing step (of any setting) saves the state after 2k - 1 steps.
  target = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32,
                                      sharding=jax.sharding.SingleDeviceSharding(
                                          jax.devices()[0]))}
  for save in ("sync", "async"):
    saved = checkpoint.Checkpointer(str(tmp_path / "ckpt" / save))
    assert len(saved.all_steps()) == 2
    for step in saved.all_steps():
      for name in checkpoint.STATE_ITEMS:
        assert np.all(np.asarray(saved.restore_item(step, name, target)["w"]) == 2 * step - 1)
    saved.close()
  train, *settings = loader
  assert train["batches_per_s"] == pytest.approx(1 / none["step_s"])
  assert [(row["num_workers"], row["read_threads"]) for row in settings] == [
      (0, 0), (0, 2), (1, 0), (1, 2)]
  for row in settings:
    assert row["same_batches"] and row["first_batch_s"] > 0
    assert row["batches_min_per_s"] <= row["batches_per_s"] <= row["batches_max_per_s"]
    assert row["images_per_s"] == pytest.approx(8 * row["batches_per_s"])
    assert row["vs_train_step"] == pytest.approx(row["batches_per_s"] * none["step_s"])
