"""The report of `launch/local.sh` (and of `launch/t2i_demo.sh`, through
`sgjax.scenes_report`): RUN/report.md from its sweeps.

    python -m sgjax.report --run=runs/demo --train_seconds=250 --sweep_seconds=400
"""

from __future__ import annotations

import datetime
import json
import os

import jax
from absl import flags

from sgjax import cli, logs, paths, scenes_report, stats, sweep

METRICS = sweep.METRICS["digits"]
# The metrics compared pairwise: quality, fidelity and the variety guidance trades away.
PAIRED = ("fid", "class_accuracy", "recall", "diversity")


def write_report(run: str, train_seconds: float, sweep_seconds: float) -> str:
  config = paths.read_json(paths.join(run, "model", "config.json"))
  last = json.loads(logs.read_jsonl(paths.join(run, "model", "metrics.jsonl"))[-1])
  compare = paths.join(run, "compare")
  rows = stats.read_rows(paths.join(compare, "sweep.csv"))
  first = stats.first_rows(rows)
  names = {slug: sweep.label(row) for slug, row in first.items()}
  base = stats.unguided_base(rows, f"{compare}/sweep.csv")
  unguided = [slug for slug, row in first.items() if row["rule"] == "none"]
  cfgs = [slug for slug, row in first.items() if row["rule"] == "cfg"]
  spec = paths.read_json(paths.join(compare, base, f"seed{min(rows[base])}",
                                    "spec.json"))
  table = stats.summary_table(rows, METRICS, names, extra=[
      ("GFLOPs/img/step (true)", lambda row: f"{row['gflops_true']:.4f}"),
      ("GFLOPs/img/step (paper)", lambda row: f"{row['gflops_paper']:.4f}")])
  versus_base = stats.paired_table(rows, names, base, PAIRED)
  versus_cfg = [line for cfg in cfgs for line in (
      f"Against {names[cfg]}:", "", *stats.paired_table(rows, names, cfg, PAIRED,
                                                        skip=unguided), "")]
  figures = [name for name in ("front_class_accuracy_vs_recall.png", "pareto_fid.png",
                               "sparsity_unguided.png")
             if paths.resolve(paths.join(compare, name)).exists()]
  model, train = config["model"], config["train"]
  lines = [
      "# sgjax demo: guidance on the bundled digits",
      "",
      f"Run on {datetime.date.today().isoformat()}, {logs.cpu_name()} ({os.cpu_count()} cores),"
      f" jax {jax.__version__} on {jax.devices()[0].platform}, by `bash launch/local.sh`.",
      "",
      f"Model: {model['depth']} blocks, width {model['width']}, {model['sparsity']}"
      f" {model['routes']} (start, end, gamma), patch {model['patch_size']} on"
      f" {model['input_size']}x{model['input_size']} digits; {train['steps']} steps at batch"
      f" {train['batch_size']}, final training loss"
      f" {last['loss']:.3f}. Training took {train_seconds:.0f} s, sampling and evaluating"
      f" every setting below {sweep_seconds:.0f} s.",
      "",
      f"Each setting: {spec['num_samples']} class-balanced samples per seed, {spec['steps']}"
      f" Euler steps, EMA weights, {len(rows[base])} seeds; a seed fixes the noise and labels,"
      " the same for every setting. Mean ± 95% interval over the seeds (Student's t)."
      " Metrics come from a digits classifier: digits-FID of its features against the"
      " held-out digits (lower is better), class accuracy of the samples, diversity (mean"
      " pairwise feature distance relative to the held-out digits), precision and recall"
      " (k = 3). GFLOPs are per image per sampling step.",
      "",
      *table,
      "",
      "Paired differences (the same seed's noise and labels), mean ± 95% interval over the"
      " seeds; an interval that contains 0 is no evidence of a difference. Against unguided"
      " sampling (the unguided rows at gamma > 0 are inference-time sparsity alone, the"
      " paper's claim (i)):",
      "",
      *versus_base,
      "",
      *versus_cfg,
      *(f"![{name}](compare/{name})" for name in figures),
      "",
      "Sample grids (seed 0): " + ", ".join(
          f"[{names[slug]}](compare/{slug}/seed{min(rows[slug])}/grid.png)"
          for slug in rows),
      "",
  ]
  path = paths.join(run, "report.md")
  paths.write_text(path, "\n".join(lines))
  return path


def define_flags() -> None:
  flags.DEFINE_string("run", "runs/demo", "Folder of a launch/local.sh or t2i_demo.sh run.")
  flags.DEFINE_float("train_seconds", 0.0, "Wall time of the training, for the report.")
  flags.DEFINE_float("sweep_seconds", 0.0, "Wall time of sampling + evaluation.")


def main(argv):
  del argv
  config = paths.read_json(paths.join(flags.FLAGS.run, "model", "config.json"))
  text_to_image = config["model"].get("arch") == "trdit"
  write = scenes_report.write_report if text_to_image else write_report
  print(write(flags.FLAGS.run, flags.FLAGS.train_seconds, flags.FLAGS.sweep_seconds))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
