"""How the digits demo's seed spread shrinks with the sample count N, to choose N.

    .venv/bin/python -m benchmarks.demo_spread runs/demo

Re-scores the samples of a `bash launch/local.sh` run (RUN/compare/<setting>/seed<S>/) at N
(every sample of a seed) and at N / 2 (each half of a seed on its own: twice the pairs), and
prints, per setting and metric, the standard deviation over seeds of the metric itself and of
its paired difference with unguided sampling (same seed, same half), next to the mean
difference. A paired difference is resolved when its standard deviation is well below its
mean: 3 seeds give a 95% interval of about ± 2.5 standard deviations.
"""

import sys

import numpy as np

from sgjax import paths, stats, sweep
from sgjax.metrics import digits

METRICS = ("fid", "class_accuracy", "recall")


def scores(compare: str, slug: str, seed: int) -> dict[str, list[dict]]:
  """{'N': [metrics of every sample], 'N/2': [metrics of each half]} of one setting's seed."""
  with paths.resolve(paths.join(compare, slug, f"seed{seed}", "samples.npz")).open("rb") as f:
    data = np.load(f)
    images, labels = data["arr_0"], data["arr_1"]
  half = len(images) // 2
  parts = {"N": [slice(None)], "N/2": [slice(0, half), slice(half, 2 * half)]}
  return {n: [digits.metrics(images[part], labels[part]) for part in slices]
          for n, slices in parts.items()}


def main(run: str) -> None:
  compare = paths.join(run, "compare")
  rows = stats.read_rows(paths.join(compare, "sweep.csv"))
  first = stats.first_rows(rows)
  base = stats.unguided_base(rows, f"{compare}/sweep.csv")
  got = {slug: {seed: scores(compare, slug, seed) for seed in sorted(by_seed)}
         for slug, by_seed in rows.items()}
  for n in ("N", "N/2"):
    count = next(iter(got[base].values()))[n][0]["num_samples"]
    print(f"\n{n} = {count} samples per seed (sd over seeds; difference vs unguided: mean,"
          " sd)\n")
    print("| setting | " + " | ".join(METRICS) + " |\n|" + "---|" * (len(METRICS) + 1))
    for slug in rows:
      cells = []
      for metric in METRICS:
        values = np.array([m[metric] for seed in got[slug] for m in got[slug][seed][n]])
        base_values = np.array([m[metric] for seed in got[base] for m in got[base][seed][n]])
        diff = values - base_values
        cells.append(f"sd {values.std(ddof=1):.3f}" + ("" if slug == base else
                     f"; {diff.mean():+.3f}, sd {diff.std(ddof=1):.3f}"))
      print(f"| {sweep.label(first[slug])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
