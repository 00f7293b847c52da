"""The report of `launch/t2i_demo.sh`: RUN/report.md from its sweep over guidance settings
(`python -m sgjax.report --run=runs/t2i_demo` writes it for a text-to-image run).

Every number is a mean over the sampling seeds with a 95% interval (Student's t over the
seeds); each guided setting is also compared with unguided sampling and with CFG as paired
differences (same seed: same noise and prompts), which cancel what the seeds share.
"""

from __future__ import annotations

import datetime
import os

import jax

from sgjax import logs, paths, stats, sweep
from sgjax.metrics import scenes

METRICS = sweep.METRICS["scenes"]
PAIRED = ("full", "digit", "diversity")  # the metrics compared between settings


def write_report(run: str, train_seconds: float, sweep_seconds: float) -> str:
  config = paths.read_json(paths.join(run, "model", "config.json"))
  rows = stats.read_rows(paths.join(run, "compare", "sweep.csv"))
  first = stats.first_rows(rows)
  names = {slug: sweep.label(row) for slug, row in first.items()}
  base = stats.unguided_base(rows, f"{run}/compare/sweep.csv")
  unguided = [slug for slug, row in first.items() if row["rule"] == "none"]
  cfg = next((slug for slug, row in first.items() if row["rule"] == "cfg"), None)
  seeds = len(rows[base])
  chance = scenes.chance()
  table = stats.summary_table(rows, METRICS, names, extra=[
      ("GFLOPs/img/step", lambda row: f"{row['gflops_true']:.4f}")])
  diffs = stats.paired_table(rows, names, base, PAIRED, skip=unguided)
  if cfg is not None:
    diffs += ["", *stats.paired_table(rows, names, cfg, PAIRED, skip=unguided)]
  model, train = config["model"], config["train"]
  lines = [
      "# sgjax text-to-image demo: compositional digit scenes",
      "",
      f"Run on {datetime.date.today().isoformat()}, {logs.cpu_name()} ({os.cpu_count()}"
      f" cores), jax {jax.__version__} on {jax.devices()[0].platform}, by"
      " `bash launch/t2i_demo.sh`.",
      "",
      f"Model: TR-DiT, {model['depth']} blocks, width {model['width']},"
      f" {model['num_heads']} heads, positions: RoPE"
      f"{' + sin-cos table' if model.get('pos_embed') == 'sincos' else ''}, routed"
      f" {model['routes']} (start, end, gamma), patch {model['patch_size']} on"
      f" {model['input_size']}x{model['input_size']}x{model['in_channels']} scenes, the"
      f" built-in word encoder; {train['steps']} steps at batch {train['batch_size']}"
      f", training seed {config['seed']} ({train_seconds:.0f} s). Sampling and evaluation:"
      f" {sweep_seconds:.0f} s.",
      "",
      f"Each setting: the same prompts and noise per seed, {seeds} seeds; mean ± 95% interval"
      " over the seeds (Student's t). full: fraction of images right in both digits, both"
      " colours, the relation and the count; digit, colour: per-object accuracy; diversity:"
      " within-prompt feature spread relative to real scenes of the same captions (1 = as"
      " varied as real data). Chance (a generator that ignores the caption): full"
      f" {chance['full']:.4f}, digit {chance['digit']:.3f}, colour {chance['colour']:.3f},"
      f" relation {chance['relation']:.3f}.",
      "",
      *table,
      "",
      "Paired differences (same seed), mean ± 95% interval; an interval that contains 0 is no"
      " evidence of a difference:",
      "",
      *diffs,
      "",
      "Sample grids (seed 0): " + ", ".join(
          f"[{names[slug]}](compare/{slug}/seed0/grid.png)" for slug in rows),
      "",
  ]
  path = paths.join(run, "report.md")
  paths.write_text(path, "\n".join(lines))
  return path
