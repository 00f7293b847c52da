"""sgjax.bench end to end on a tiny model: its tables, ratios and trace are consistent."""

import glob
import json
import os
import subprocess
import sys

import pytest

from sgjax import bench

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
