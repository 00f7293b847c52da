"""Intervals over sampling seeds, and paired differences between the settings of a sweep.

A sweep samples every setting with the same seeds; a seed fixes the initial noise and the
labels (or prompts), so two settings' metrics at one seed share whatever that noise makes
easy or hard. Their difference, seed by seed, cancels that shared part: a paired difference
is far tighter than the two settings' own intervals, and it is what a claim "A beats B" needs.

Intervals are 95% Student-t intervals over the seeds (3 seeds: mean ± 2.48 std).
"""

from __future__ import annotations

import csv

import numpy as np
from scipy import stats

from sgjax import paths


def interval(values) -> tuple[float, float]:
  """(mean, half-width of the 95% Student-t interval) of a sample; width 0 for one value."""
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return float(values.mean()), 0.0
  half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
  return float(values.mean()), float(half)


def fmt(values, digits: int = 3) -> str:
  """'mean ± half-width' of `values`' 95% interval."""
  mean, half = interval(values)
  return f"{mean:.{digits}f} ± {half:.{digits}f}"


def read_rows(path: str) -> dict[str, dict[int, dict]]:
  """sweep.csv -> {slug: {seed: row}}, numbers parsed, empty cells None."""
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


def first_rows(rows) -> dict[str, dict]:
  """{slug: the row of its first seed}: the setting's columns, the same for every seed."""
  return {slug: next(iter(by_seed.values())) for slug, by_seed in rows.items()}


def unguided_base(rows, where: str) -> str:
  """The slug of the dense unguided setting (rule none, gamma 0) that the others compare with."""
  base = next((slug for slug, row in first_rows(rows).items()
               if row["rule"] == "none" and not row["gamma_strong"]), None)
  if base is None:
    raise ValueError(f"{where} has no unguided dense setting (rule=none, gamma 0) to compare"
                     " the others with; add --grid='rule=none'.")
  return base


def differences(rows, slug: str, base: str, metric: str) -> list[float]:
  """slug's metric minus base's, seed by seed, over the seeds both were sampled with."""
  seeds = sorted(set(rows[slug]) & set(rows[base]))
  if not seeds:
    raise ValueError(f"settings {slug!r} and {base!r} share no seed: a paired difference"
                     " needs both sampled with the same --seeds.")
  return [rows[slug][s][metric] - rows[base][s][metric] for s in seeds]


def summary_table(rows, metrics, names, extra=()) -> list[str]:
  """Markdown rows: each setting's metrics as mean ± 95% interval over its seeds.

  `extra` holds (header, function of the setting's first row) columns, e.g. GFLOPs.
  """
  lines = ["| setting | " + " | ".join([*metrics, *(h for h, _ in extra)]) + " |",
           "|" + "---|" * (len(metrics) + len(extra) + 1)]
  for slug, by_seed in rows.items():
    first = next(iter(by_seed.values()))
    cells = [fmt([r[m] for r in by_seed.values()]) if first.get(m) is not None else "-"
             for m in metrics]
    cells += [cell(first) for _, cell in extra]
    lines.append(f"| {names[slug]} | " + " | ".join(cells) + " |")
  return lines


def paired_table(rows, names, base: str, metrics, skip=()) -> list[str]:
  """Markdown rows: every setting but `base` and `skip`, minus `base`, per metric."""
  lines = ["| setting | " + " | ".join(f"{m} - ({names[base]})" for m in metrics) + " |",
           "|" + "---|" * (len(metrics) + 1)]
  for slug in rows:
    if slug != base and slug not in skip:
      lines.append(f"| {names[slug]} | " + " | ".join(
          fmt(differences(rows, slug, base, m)) for m in metrics) + " |")
  return lines
