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

from sgjax import cli, logs, paths, scenes_report, sweep


def write_report(run: str, train_seconds: float, sweep_seconds: float) -> str:
  config = paths.read_json(paths.join(run, "model", "config.json"))
  last = json.loads(logs.read_jsonl(paths.join(run, "model", "metrics.jsonl"))[-1])
  table = paths.read_text(paths.join(run, "compare", "sweep.md"))
  model, train = config["model"], config["train"]
  entries = paths.read_json(paths.join(run, "compare", "sweep.json"))
  grids = "\n".join(f"- {sweep.label(e)}: [grid](compare/{e['slug']}/seed0/grid.png)"
                    for e in entries)
  heatmaps = sorted(p.name for p in paths.resolve(run).joinpath("heatmap").glob("*.png"))
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
      "Each row: 200 class-balanced samples per seed, 40 Euler steps, EMA weights; mean ± std"
      " over 3 seeds. Metrics come from a digits classifier (99% held-out accuracy):"
      " digits-FID of its features against the 297 held-out digits (lower is better; real"
      " training digits score about 4.3), class accuracy of the samples, diversity (mean"
      " pairwise feature distance relative to the held-out digits), precision and recall"
      " (k = 3). GFLOPs are per image per sampling step.",
      "",
      table,
      "Sample grids (seed 0):",
      "",
      grids,
      "",
      "SG over (gamma_strong, gamma_weak), seed 0: " + ", ".join(
          f"[{name}](heatmap/{name})" for name in heatmaps),
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
