"""Intervals over seeds, paired differences, and the sweep outputs and demo report built on them."""

import json

import chex
import numpy as np
import pytest
from scipy import stats as scipy_stats

from sgjax import paths, report, scenes_report, stats, sweep

SEEDS = (0, 1, 2)


def test_interval_is_students_t_over_the_values():
  # 2 degrees of freedom: mean ± 4.303 * s / sqrt(3), s the sample std (ddof 1).
  mean, half = stats.interval([0.1, 0.2, 0.3])
  chex.assert_trees_all_close((mean, half), (0.2, 4.302653 * 0.1 / 3**0.5), rtol=1e-6)
  assert stats.interval([0.7]) == (0.7, 0.0)
  assert stats.fmt([1.0, 2.0, 3.0, 4.0], digits=2) == "2.50 ± 2.05"  # 3.182 * 1.291 / 2


def test_paired_differences_cancel_what_the_seeds_share_and_need_a_shared_seed():
  rows = {"a": {s: {"fid": v} for s, v in enumerate([5.0, 9.0, 7.0])},
          "b": {s: {"fid": v + 0.5} for s, v in enumerate([5.0, 9.0, 7.0])},
          "c": {5: {"fid": 1.0}}}
  # A constant offset has no spread, whatever the seeds' own spread (4 on each side).
  assert stats.differences(rows, "b", "a", "fid") == [0.5, 0.5, 0.5]
  assert stats.fmt(stats.differences(rows, "b", "a", "fid")) == "0.500 ± 0.000"
  rows["b"].pop(1)  # only the seeds both have are paired
  assert stats.differences(rows, "b", "a", "fid") == [0.5, 0.5]
  with pytest.raises(ValueError, match="share no seed.*same --seeds"):
    stats.differences(rows, "c", "a", "fid")


def _setting(spec):
  (setting,) = sweep.parse_grid(spec)
  return setting


def _rows(settings, metric_of, metrics=sweep.METRICS["digits"]):
  """One sweep row per setting and seed, as run_sweep returns them (no sampling)."""
  rows = []
  for setting in settings:
    for seed in SEEDS:
      row = {name: getattr(setting, name) for name in sweep.SETTING_COLUMNS}
      row.update(slug=setting.slug, seed=seed, gflops_true=1.0 + setting.omega,
                 gflops_paper=0.5, nfe=40, images_per_s=10.0 + seed)
      row.update({m: metric_of(setting, seed, m) for m in metrics})
      rows.append(row)
  return rows


def test_sweep_outputs_and_demo_report_carry_intervals_and_paired_differences(tmp_path):
  settings = [_setting(spec) for spec in (
      "rule=none", "rule=none;gamma_strong=0.5", "rule=cfg;omega=1.5", "rule=cfg;omega=3",
      "rule=sg;omega=4;gamma_strong=0;gamma_weak=0.7")]
  seed_effect = {0: 3.0, 1: 7.0, 2: 5.0}  # what a seed's noise does to every setting alike
  offsets = {s.slug: 0.1 * i for i, s in enumerate(settings)}

  def metric_of(setting, seed, metric):
    del metric
    return seed_effect[seed] + offsets[setting.slug]

  rows = _rows(settings, metric_of)
  run = tmp_path / "demo"
  entries = sweep.write_outputs(rows, str(run / "compare"), sweep.METRICS["digits"],
                                sweep.FRONTS["digits"])
  for name in ("sweep.csv", "sweep.md", "pareto_fid.png", "sparsity_unguided.png",
               "front_class_accuracy_vs_recall.png"):
    assert (run / "compare" / name).stat().st_size > 0, name
  for setting, entry in zip(settings, entries):
    values = [metric_of(setting, seed, "fid") for seed in SEEDS]
    low, high = scipy_stats.t.interval(0.95, 2, loc=np.mean(values),
                                       scale=scipy_stats.sem(values))
    chex.assert_trees_all_close((entry["fid"], entry["fid_ci"]),
                                ((low + high) / 2, (high - low) / 2), rtol=1e-9)
  # The report reads sweep.csv back, with the run's config, last loss and sample spec.
  (run / "model").mkdir()
  (run / "model" / "config.json").write_text(json.dumps({
      "model": dict(depth=2, width=8, sparsity="routing", routes=[[1, 2, 0.5]],
                    patch_size=2, input_size=8),
      "train": dict(steps=5, batch_size=4)}))
  (run / "model" / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 0.25}) + "\n")
  for seed in SEEDS:
    paths.write_json(str(run / "compare" / settings[0].slug / f"seed{seed}" / "spec.json"),
                     {"num_samples": 7, "steps": 9})
  text = open(report.write_report(str(run), train_seconds=12.0, sweep_seconds=34.0)).read()
  assert "7 class-balanced samples per seed, 9 Euler steps" in text and "3 seeds" in text
  summary, versus_base = text.split("Paired differences")
  versus_base, versus_cfg, versus_cfg3 = versus_base.split("Against cfg omega=")
  # A setting's own interval holds the seeds' spread (sd 2: ± 4.303 * 2 / sqrt(3)) ...
  assert "| sg omega=4 gamma=0/0.7 | 5.400 ± 4.968 | 5.400 ± 4.968 |" in summary
  # ... its paired difference with unguided only its offset: the seeds' effect cancels.
  assert "| sg omega=4 gamma=0/0.7 | " + " | ".join(["0.400 ± 0.000"] * 4) + " |" in versus_base
  assert "| none gamma=0.5 | 0.100 ± 0.000" in versus_base  # sparsity alone, claim (i)
  # Against each CFG setting in turn, the unguided settings left out.
  assert versus_cfg.startswith("1.5:") and versus_cfg3.startswith("3:")
  assert "| sg omega=4 gamma=0/0.7 | 0.200 ± 0.000" in versus_cfg
  assert "| cfg omega=3 | 0.100 ± 0.000" in versus_cfg and "| none" not in versus_cfg
  assert "| sg omega=4 gamma=0/0.7 | 0.100 ± 0.000" in versus_cfg3
  assert "| cfg omega=1.5 | -0.100 ± 0.000" in versus_cfg3 and "| none" not in versus_cfg3
  for name in ("front_class_accuracy_vs_recall.png", "pareto_fid.png", "sparsity_unguided.png"):
    assert f"(compare/{name})" in text
  assert "nan" not in text.lower()


@pytest.mark.parametrize("pos_embed", ["sincos", None])
def test_text_to_image_report_names_the_model_and_pairs_full_digit_and_diversity(
    tmp_path, pos_embed):
  settings = [_setting(spec) for spec in (
      "rule=none", "rule=none;gamma_strong=0.5", "rule=cfg;omega=1.5",
      "rule=sg;omega=4;gamma_strong=0;gamma_weak=0.7")]
  seed_effect = {0: 0.3, 1: 0.5, 2: 0.4}
  offsets = {s.slug: 0.01 * i for i, s in enumerate(settings)}
  rows = _rows(settings, lambda setting, seed, _: seed_effect[seed] + offsets[setting.slug],
               sweep.METRICS["scenes"])
  run = tmp_path / "t2i"
  sweep.write_outputs(rows, str(run / "compare"), sweep.METRICS["scenes"],
                      sweep.FRONTS["scenes"])
  model = dict(depth=2, width=8, num_heads=2, routes=[[1, 2, 0.5]], patch_size=2,
               input_size=16, in_channels=3, pos_embed=pos_embed)
  if pos_embed is None:  # a run written before the field existed
    del model["pos_embed"]
  paths.write_json(str(run / "model" / "config.json"), {
      "seed": 7, "model": model, "train": dict(steps=5, batch_size=4)})
  text = paths.read_text(scenes_report.write_report(str(run), train_seconds=12.0,
                                                    sweep_seconds=34.0))
  positions = "RoPE + sin-cos table" if pos_embed else "RoPE"
  assert f"2 heads, positions: {positions}, routed" in text
  assert "5 steps at batch 4, training seed 7 (12 s)" in text
  versus_none, versus_cfg = text.split("Paired differences")[1].split("\n\n| setting")[1:3]
  assert "| full - (none) | digit - (none) | diversity - (none) |" in versus_none
  assert "| sg omega=4 gamma=0/0.7 | " + " | ".join(["0.030 ± 0.000"] * 3) + " |" in versus_none
  assert "| sg omega=4 gamma=0/0.7 | " + " | ".join(["0.010 ± 0.000"] * 3) + " |" in versus_cfg
  assert "| none gamma=0.5" not in versus_cfg
