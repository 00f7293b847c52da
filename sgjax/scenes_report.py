"""The report of `launch/t2i_demo.sh`: RUN/report.md from its sweep over guidance settings
(`python -m sgjax.report --run=runs/t2i_demo` writes it for a text-to-image run).

Every number is a mean over the sampling seeds with a 95% interval (Student's t over the
seeds); each guided setting is also compared with unguided sampling and with CFG as paired
differences (same seed: same noise and prompts), which cancel what the seeds share.
"""

from __future__ import annotations

import csv
import datetime
import os

import jax
import numpy as np
from scipy import stats

from sgjax import logs, paths, sweep
from sgjax.metrics import scenes

METRICS = ("full", "digit", "colour", "relation", "count", "diversity")


def interval(values) -> tuple[float, float]:
  """(mean, half-width of the 95% Student-t interval) of a sample; 0 width for one value."""
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return float(values.mean()), 0.0
  half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
  return float(values.mean()), float(half)


def _fmt(values) -> str:
  mean, half = interval(values)
  return f"{mean:.3f} ± {half:.3f}"


def _rows(path: str) -> dict[str, dict[int, dict]]:
  """slug -> seed -> row of sweep.csv (numbers parsed)."""
  out: dict[str, dict[int, dict]] = {}
  with paths.resolve(path).open() as f:
    for row in csv.DictReader(f):
      parsed = {}
      for key, value in row.items():
        try:
          parsed[key] = float(value)
        except ValueError:
          parsed[key] = value if value else None
      out.setdefault(row["slug"], {})[int(parsed["seed"])] = parsed
  return out


def paired(rows, slug: str, base: str, metric: str) -> str:
  """slug - base over the seeds both have, as mean ± 95% interval."""
  seeds = sorted(set(rows[slug]) & set(rows[base]))
  return _fmt([rows[slug][s][metric] - rows[base][s][metric] for s in seeds])


def write_report(run: str, train_seconds: float, sweep_seconds: float) -> str:
  config = paths.read_json(paths.join(run, "model", "config.json"))
  rows = _rows(paths.join(run, "compare", "sweep.csv"))
  first = {slug: next(iter(by_seed.values())) for slug, by_seed in rows.items()}
  names = {slug: sweep.label(row) for slug, row in first.items()}
  base = next(slug for slug, row in first.items()
              if row["rule"] == "none" and not row["gamma_strong"])
  cfg_slugs = [slug for slug, row in first.items() if row["rule"] == "cfg"]
  seeds = len(rows[base])
  chance = scenes.chance()

  table = ["| setting | " + " | ".join(METRICS) + " | GFLOPs/img/step |",
           "|" + "---|" * (len(METRICS) + 2)]
  for slug, by_seed in rows.items():
    cells = [_fmt([r[m] for r in by_seed.values()]) if m in first[slug] else "-"
             for m in METRICS]
    table.append(f"| {names[slug]} | " + " | ".join(cells)
                 + f" | {first[slug]['gflops_true']:.4f} |")
  diffs = ["| setting | full - unguided | diversity - unguided | full - "
           + (names[cfg_slugs[0]] if cfg_slugs else "CFG") + " | diversity - same |",
           "|---|---|---|---|---|"]
  for slug in rows:
    if slug == base or first[slug]["rule"] == "none":
      continue
    versus_cfg = ([paired(rows, slug, cfg_slugs[0], m) for m in ("full", "diversity")]
                  if cfg_slugs and slug != cfg_slugs[0] else ["-", "-"])
    diffs.append(f"| {names[slug]} | {paired(rows, slug, base, 'full')} |"
                 f" {paired(rows, slug, base, 'diversity')} | " + " | ".join(versus_cfg) + " |")
  model, train = config["model"], config["train"]
  lines = [
      "# sgjax text-to-image demo: compositional digit scenes",
      "",
      f"Run on {datetime.date.today().isoformat()}, {logs.cpu_name()} ({os.cpu_count()}"
      f" cores), jax {jax.__version__} on {jax.devices()[0].platform}, by"
      " `bash launch/t2i_demo.sh`.",
      "",
      f"Model: TR-DiT, {model['depth']} blocks, width {model['width']}, routed"
      f" {model['routes']} (start, end, gamma), patch {model['patch_size']} on"
      f" {model['input_size']}x{model['input_size']}x{model['in_channels']} scenes, the"
      f" built-in word encoder; {train['steps']} steps at batch {train['batch_size']}"
      f" ({train_seconds:.0f} s). Sampling and evaluation: {sweep_seconds:.0f} s.",
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
