"""The sampling command, guidance sweeps and the demo report, on a tiny trained run."""

import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from configs import digits, imagenet256
from sgjax import checkpoint, config as config_lib, flops
from sgjax import guidance as guidance_lib, report, sample, sweep, train
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step digits run: RUN/model holds its checkpoint."""
  root = tmp_path_factory.mktemp("demo")
  config = digits.get_config("runlocal")
  config.train.update(steps=4, ckpt_every=4)
  train.train(config, str(root / "model"))
  return root


def sg(**overrides):
  fields = dict(rule="sg", omega=2.0, gamma_strong=0.0, gamma_weak=0.5)
  return guidance_lib.GuidanceConfig(**{**fields, **overrides})


def test_sample_writes_grid_npz_and_report_deterministically(run, tmp_path):
  a = sample.run(str(run / "model"), sg(), str(tmp_path / "a"), steps=4, num_samples=20,
                 batch_size=16, seed=3)
  sample.run(str(run / "model"), sg(), str(tmp_path / "b"), steps=4, num_samples=20,
             batch_size=16, seed=3)
  c = sample.run(str(run / "model"), sg(), str(tmp_path / "c"), steps=4, num_samples=20,
                 batch_size=16, seed=4)
  load = lambda d: np.load(tmp_path / d / "samples.npz")
  images, labels = load("a")["arr_0"], load("a")["arr_1"]
  chex.assert_shape(images, (20, 8, 8, 1))
  chex.assert_type(images, np.uint8)
  chex.assert_trees_all_equal(labels, np.arange(20) % 10)  # balanced by default
  chex.assert_trees_all_equal(images, load("b")["arr_0"])
  assert not np.array_equal(images, load("c")["arr_0"])
  assert (tmp_path / "a" / "grid.png").stat().st_size > 0
  with open(tmp_path / "a" / "sampling.json") as f:
    saved = json.load(f)
  assert saved["guidance"]["rule"] == "sg" and saved["nfe"] == 8 and saved["step"] == 4
  assert saved["images_per_s"] > 0 and saved["wall_s"] > 0
  unguided = sample.run(str(run / "model"), guidance_lib.GuidanceConfig(rule="none"),
                        str(tmp_path / "none"), steps=4, num_samples=16, batch_size=16)
  # The FLOPs reported are those of the 4 steps run, on the run's architecture: 4 dense
  # passes unguided; 4 SG steps (strong and weak branch) guided.
  model_cfg = config_lib.model_config(checkpoint.run_config(str(run / "model"))[0]["model"])
  dense_pass = flops.forward_flops(model_cfg, 0.0).true / 1e9
  assert unguided["trajectory_gflops_true"] == pytest.approx(4 * dense_pass)
  sg_step = flops.guided_step_flops(model_cfg, sg()).true / 1e9
  assert dense_pass < sg_step < 2 * dense_pass
  assert a["gflops_true"] == pytest.approx(sg_step)
  assert c["trajectory_gflops_true"] == pytest.approx(4 * sg_step)


def test_sample_rejects_bad_input(run, tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    sample.run(str(tmp_path / "empty"), sg(), str(tmp_path / "o"))
  with pytest.raises(ValueError, match="gamma_strong"):
    sample.run(str(run / "model"), sg(gamma_weak=0.0), str(tmp_path / "o"))
  with pytest.raises(ValueError, match="aux"):
    sample.run(str(run / "model"), guidance_lib.GuidanceConfig(rule="ag"), str(tmp_path / "o"))
  with pytest.raises(ValueError, match="batch_size=12"):
    sample.run(str(run / "model"), sg(), str(tmp_path / "o"), batch_size=12)
  out = subprocess.run([sys.executable, "-m", "sgjax.sample", f"--workdir={run / 'model'}",
                        "--guidance=sparse"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "XLA_FLAGS": ""}, timeout=120)
  assert out.returncode != 0 and "sparse" in out.stderr


def test_prompts_for_a_class_conditional_run_are_refused(run, tmp_path):
  with pytest.raises(ValueError, match="class-conditional .* --labels"):
    sample.run(str(run / "model"), sg(), str(tmp_path / "o"), prompts=["a red 3"])


def test_sample_command_defaults_sg_to_the_papers_gammas_and_reports_user_errors(run, tmp_path):
  small = [f"--workdir={run / 'model'}", "--steps=2", "--num_samples=8", "--batch_size=8"]
  result = helpers.run_command("sgjax.sample", *small, "--guidance=sg", f"--out={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "sampling.json") as f:
    used = json.load(f)["guidance"]
  assert (used["rule"], used["gamma_strong"], used["gamma_weak"]) == ("sg", 0.5, 0.9)
  assert "SG_FLOPS rates gamma_strong=0.5, gamma_weak=0.9" in result.stderr
  result = helpers.run_command("sgjax.sample", *small, "--num_samples=0",
                               f"--out={tmp_path / 'none'}")
  assert helpers.user_error_line(result, "sgjax.sample") == (
      "sgjax.sample: error: --num_samples=0 must be >= 1.")


def test_non_finite_samples_are_counted_and_nothing_is_written(run, tmp_path):
  out = tmp_path / "diverged"
  result = helpers.run_command("sgjax.sample", f"--workdir={run / 'model'}", "--guidance=cfg",
                               "--omega=1e30", "--steps=2", "--num_samples=10",
                               "--batch_size=8", f"--out={out}")
  line = helpers.user_error_line(result, "sgjax.sample")
  assert "10 of 10 samples hold NaN or inf" in line and "omega=1e+30" in line
  assert not out.exists()
  # The count is of samples, not of values or batches, and leaves out the batch's padding.
  finite = np.zeros((4, 8, 8, 1), np.float32)
  padded = finite.copy()
  padded[0, 1, 2, 0], padded[1, :, :, 0], padded[3, 0, 0, 0] = np.inf, np.nan, np.nan
  with pytest.raises(FloatingPointError, match=r"^2 of 6 samples .* \(the first: sample 4\)"):
    sample.check_finite([finite, padded], 6, sg())
  sample.check_finite([finite, padded[2:]], 5, sg())  # only padding is NaN: no error


def test_parse_grid_expands_products_and_skips_forbidden_settings():
  settings = sweep.parse_grid("rule=sg;omega=1.5,2;gamma_strong=0,0.5;gamma_weak=0.5,0.8")
  pairs = {(s.omega, s.gamma_strong, s.gamma_weak) for s in settings}
  assert len(settings) == 6 and (1.5, 0.5, 0.5) not in pairs and (2.0, 0.5, 0.8) in pairs
  # sg and cfg+sg given no gamma take the paper's SG_FLOPS 0.5 / 0.9; other rules stay dense.
  gammas = {s.rule: (s.gamma_strong, s.gamma_weak)
            for s in sweep.parse_grid("rule=sg,cfg+sg,cfg,none;omega=2")}
  assert gammas == {"sg": (0.5, 0.9), "cfg+sg": (0.5, 0.9), "cfg": (0, 0), "none": (0, 0)}
  assert [(s.gamma_strong, s.gamma_weak) for s in sweep.parse_grid("rule=sg;gamma_weak=0.6")
          ] == [(0.0, 0.6)]
  with pytest.raises(ValueError, match="unknown field 'omgea'"):
    sweep.parse_grid("rule=sg;omgea=2")


def test_pareto_front_keeps_only_undominated_settings():
  entries = [dict(gflops_true=1.0, fid=5.0), dict(gflops_true=2.0, fid=6.0),
             dict(gflops_true=2.0, fid=3.0), dict(gflops_true=3.0, fid=4.0)]
  front = sweep.pareto_front(entries, "fid")
  assert [(e["gflops_true"], e["fid"]) for e in front] == [(1.0, 5.0), (2.0, 3.0)]
  accuracy = [dict(gflops_true=1.0, class_accuracy=0.5), dict(gflops_true=2.0,
                                                              class_accuracy=0.4)]
  assert sweep.pareto_front(accuracy, "class_accuracy") == accuracy[:1]


def test_sweep_resumes_and_report_fills_every_row(run):
  kwargs = dict(seeds=(0, 1), steps=3, num_samples=20, batch_size=16)
  settings = sweep.parse_grid("rule=none") + sweep.parse_grid(
      "rule=sg;omega=2;gamma_strong=0,0.3;gamma_weak=0.6")
  rows = sweep.run_sweep(str(run / "model"), settings, str(run / "compare"), **kwargs)
  assert len(rows) == 6 and all(0 <= r["class_accuracy"] <= 1 for r in rows)
  first = run / "compare" / settings[1].slug / "seed0" / "samples.npz"
  stamp = first.stat().st_mtime_ns
  again = sweep.run_sweep(str(run / "model"), settings, str(run / "compare"), **kwargs)
  assert first.stat().st_mtime_ns == stamp and again == rows  # nothing recomputed
  metrics = ["fid", "class_accuracy", "diversity", "precision", "recall"]
  entries = sweep.write_outputs(rows, str(run / "compare"), metrics)
  assert len(entries) == 3 and all(e["seeds"] == 2 for e in entries)
  sweep.write_outputs(rows, str(run / "heatmap"), metrics)
  for name in ("sweep.csv", "sweep.md", "sweep.json", "pareto_fid.png", "heatmap_sg_fid.png"):
    assert (run / "compare" / name).exists(), name
  path = report.write_report(str(run), train_seconds=12.0, sweep_seconds=34.0)
  text = open(path).read()
  for entry in entries:
    assert sweep.label(entry) in text
  assert "nan" not in text.lower() and "Training took 12 s" in text
  # Another sample count: that folder is redone, not reused.
  sweep.run_sweep(str(run / "model"), settings[1:2], str(run / "compare"),
                  **{**kwargs, "seeds": (0,), "num_samples": 16})
  assert first.stat().st_mtime_ns != stamp


def test_sweep_checks_every_input_before_sampling(run, tmp_path, monkeypatch):
  model, out = str(run / "model"), str(tmp_path / "sweep")
  monkeypatch.setattr(sample, "load_models",
                      lambda *args, **kwargs: pytest.fail("a model was loaded before a check"))
  cases = [([], {}, "no valid setting"),
           (sweep.parse_grid("rule=none"), dict(metric="adm"), "needs a reference"),
           (sweep.parse_grid("rule=ag;omega=2"), {}, "needs --aux_workdir"),
           ([sg(gamma_strong=0.5, gamma_weak=0.51)], {}, "keep 32 and 32 of 64 tokens"),
           (sweep.parse_grid("rule=none"), dict(num_samples=0), "--num_samples=0 must be >= 1"),
           (sweep.parse_grid("rule=none"), dict(seeds=()), "--seeds is empty")]
  for settings, kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      sweep.run_sweep(model, settings, out, batch_size=16, **kwargs)
  with pytest.raises(FileNotFoundError, match="--step=7"):
    sweep.run_sweep(model, sweep.parse_grid("rule=none"), out, batch_size=16, step=7)
  assert not os.path.exists(out)


def test_run_on_vae_latents_without_a_vae_samples_latents_and_sweeps_ask_for_it(tmp_path):
  shard = str(tmp_path / "train-00000.array_record")
  rng = np.random.default_rng(0)
  helpers.write_latent_shard(shard, rng.standard_normal((16, 8, 8, 4)).astype(np.float16),
                             np.arange(16) % 10)
  config = imagenet256.get_config("runlocal")
  config.data.update(source="latents", path=shard)
  config.train.update(steps=2, ckpt_every=2)
  workdir, out = str(tmp_path / "run"), str(tmp_path / "sg")
  train.train(config, workdir)
  summary = sample.run(workdir, sg(), out, steps=2, num_samples=10, batch_size=8, seed=1)
  assert sorted(os.listdir(out)) == ["latents.npz", "sampling.json"]
  assert summary["output"] == "latents"
  latents, labels = np.load(os.path.join(out, "latents.npz")).values()
  chex.assert_shape(latents, (10, 8, 8, 4))
  chex.assert_type(latents, np.float32)
  chex.assert_trees_all_equal(labels, np.arange(10))  # balanced: classes 0, 1, 2, ...
  # The barely trained model returns near its initial N(0, 1) noise, in the model's units
  # (latents x 0.18215); the file holds the VAE's units.
  assert 4.0 < latents.std() < 7.0
  with pytest.raises(ValueError, match="trained on VAE latents.*pass --vae=DIR"):
    sweep.run_sweep(workdir, sweep.parse_grid("rule=none"), str(tmp_path / "sweep"),
                    batch_size=8)
  assert not os.path.exists(tmp_path / "sweep")


def test_sweep_labels_name_unset_schedule_ends_by_their_start_rate():
  entry = dict(rule="sg", omega=2.0, gamma_strong=0.2, gamma_weak=0.6, schedule="cosine",
               gamma_strong_end=None, gamma_weak_end=0.0)
  assert sweep.label(entry) == "sg omega=2 gamma=0.2/0.6 -> 0.2/0 (cosine)"
