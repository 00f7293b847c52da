"""Guidance sweeps: sample and evaluate a grid of settings, tabulate and plot them.

    python -m sgjax.sweep --workdir=runs/digits --metric=digits --seeds=0,1,2 \
        --grid='rule=none' --grid='rule=cfg;omega=1.5,2' \
        --grid='rule=sg;omega=1.5,2;gamma_strong=0,0.3;gamma_weak=0.6,0.8'

Each --grid is a Cartesian product of `field=v1,v2` parts over GuidanceConfig's fields
(rule, omega, gamma_strong, gamma_weak, schedule, gamma_strong_end, gamma_weak_end);
sg and cfg+sg given neither gamma take the paper's SG_FLOPS 0.5 / 0.9, an unset gamma is
otherwise 0, and combinations a rule forbids (gamma_strong >= gamma_weak for sg) are
skipped. Writes into OUT (default WORKDIR/sweep): one folder per setting and seed (samples,
sampling.json, metrics.json; finished ones are reused, so a sweep resumes), sweep.csv,
sweep.md, one FID heatmap over (gamma_strong, gamma_weak) per omega for each sparse rule,
and the metric against GFLOPs per image with the Pareto front marked.
"""

from __future__ import annotations

import csv
import itertools
import warnings

import numpy as np
from absl import app, flags, logging

from sgjax import checkpoint, config as config_lib, guidance as guidance_lib, logs, sample
from sgjax import cli, paths, sampling, stats
from sgjax.data import scenes
from sgjax.metrics import npz

FIELDS = {"rule": str, "omega": float, "gamma_strong": float, "gamma_weak": float,
          "schedule": str, "gamma_strong_end": float, "gamma_weak_end": float}
# Columns of sweep.csv / sweep.md besides the metrics.
SETTING_COLUMNS = ("rule", "omega", "gamma_strong", "gamma_weak", "schedule",
                   "gamma_strong_end", "gamma_weak_end")
LOWER_IS_BETTER = ("fid", "sfid")
# Per metric kind: the metrics sweep.md shows, and the (variety, fidelity) pair of its fronts.
METRICS = {"digits": ["fid", "class_accuracy", "diversity", "precision", "recall"],
           "adm": ["fid", "sfid", "inception_score", "precision", "recall"],
           "scenes": ["full", "digit", "colour", "relation", "count", "diversity"]}
FRONTS = {"digits": ("recall", "class_accuracy"), "adm": ("recall", "precision"),
          "scenes": ("diversity", "full")}


def parse_grid(spec: str) -> list[guidance_lib.GuidanceConfig]:
  """'rule=sg;omega=1.5,2;gamma_weak=0.6' -> the valid GuidanceConfigs of the product."""
  axes = {}
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    name, _, values = part.partition("=")
    if name not in FIELDS:
      raise ValueError(f"--grid={spec!r}: unknown field {name!r}; known: {sorted(FIELDS)}.")
    axes[name] = [FIELDS[name](v) for v in values.split(",") if v]
  if "rule" not in axes:
    raise ValueError(f"--grid={spec!r} names no rule (e.g. 'rule=sg;omega=1.5').")
  settings = []
  for values in itertools.product(*axes.values()):
    fields = dict(zip(axes, values))
    fields["gamma_strong"], fields["gamma_weak"] = guidance_lib.default_gammas(
        fields["rule"], fields.get("gamma_strong"), fields.get("gamma_weak"))
    setting = guidance_lib.GuidanceConfig(**fields)
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        settings.append(setting.validate())
    except ValueError as e:
      logging.info("skipping %s: %s", setting, e)
  return settings


def _done(folder: str, spec: dict) -> bool:
  """Whether `folder` holds results made exactly as `spec` says (spec.json is written last)."""
  path = paths.join(folder, "spec.json")
  if not paths.resolve(path).exists():
    return False
  if paths.read_json(path) == spec:
    return True
  logging.info("redoing %s: it was sampled or evaluated with other settings", folder)
  return False


def run_sweep(workdir: str, settings: list[guidance_lib.GuidanceConfig], out: str, *,
              seeds=(0,), metric="digits", reference=None, inception_weights=None,
              steps=40, num_samples=500, batch_size=256, step=None, aux_workdir=None,
              aux_step=None, vae=None, prompts: list[str] | None = None,
              text_npz: str | None = None) -> list[dict]:
  """Samples + evaluates every setting and seed (reusing finished ones); one row each.

  Everything is checked before the first sample: the grid, the metric's files, the auxiliary
  model of ag rules and the checkpoints. A text-to-image run samples `prompts` (sample i
  takes prompt i mod P) instead of class-balanced labels; one trained on precomputed text
  takes their hidden states from `text_npz` (`sample.text_encoder`). A folder is reused
  only when it was made from the same checkpoints with the same steps, sample count, batch
  size, metric, reference and prompts.
  """
  if not settings:
    raise ValueError("the grid holds no valid setting (the log says why each combination was"
                     " skipped).")
  if not seeds:
    raise ValueError("--seeds is empty: give at least one sample seed, e.g. --seeds=0,1,2.")
  sample.check_sample_counts(num_samples, batch_size)
  npz.check_inputs(metric, reference, inception_weights)
  for setting in settings:
    sample.check_aux(setting, aux_workdir, aux_step)
  mesh = sample.sampling_mesh(batch_size)
  config, step = checkpoint.run_config(workdir, step)
  latent_scale = sample.latent_scale_of(config)
  decode = sample.latent_decoder(config, mesh, vae)
  if latent_scale is not None and decode is None:
    raise ValueError(f"--workdir={workdir!r} trained on VAE latents: its samples need the VAE"
                     " decoder before any metric; pass --vae=DIR (or train with"
                     " --config.data.vae=DIR).")
  model_cfg = config_lib.model_config(config["model"])
  encoder, prompts = sample.text_encoder(config, model_cfg, prompts, text_npz)
  spec = {"workdir": paths.join(workdir), "step": step, "steps": steps,
          "num_samples": num_samples, "batch_size": batch_size, "metric": metric,
          "reference": reference and paths.join(reference)}
  if prompts is not None:
    spec["prompts"] = prompts
  if text_npz is not None:
    spec["text_npz"] = {"path": paths.join(text_npz), "sha256": encoder.sha256}
  if latent_scale is not None:  # the decoder is part of what made the images
    spec["vae"] = paths.join(vae or config["data"]["vae"])
  aux_spec, aux_cfg = {}, None
  if any(setting.uses_aux for setting in settings):
    aux_config, aux_step = checkpoint.run_config(aux_workdir or workdir, aux_step)
    aux_cfg = config_lib.model_config(aux_config["model"])
    aux_spec = {"aux_workdir": paths.join(aux_workdir or workdir), "aux_step": aux_step}
  for setting in settings:  # token counts per step: raises on a setting the model cannot run
    sampling.make_plan(model_cfg, setting, steps=steps,
                       aux_cfg=aux_cfg if setting.uses_aux else None)
  models = {}
  rows = []
  for setting in settings:
    sampler, compiled = None, False
    setting_spec = {**spec, **(aux_spec if setting.uses_aux else {})}
    for seed in seeds:
      folder = paths.join(out, setting.slug, f"seed{seed}")
      if not _done(folder, setting_spec):
        if sampler is None:
          if setting.uses_aux not in models:
            models[setting.uses_aux] = sample.load_models(
                workdir, setting, mesh, step=step, aux_workdir=aux_workdir, aux_step=aux_step)
          model, aux_model, _, info = models[setting.uses_aux]
          sampler = sampling.Sampler(model, setting, steps=steps, aux_model=aux_model,
                                     mesh=mesh)
        sample.sample_to_dir(sampler, folder, num_samples=num_samples, batch_size=batch_size,
                             labels="balanced", seed=seed, compile_first=not compiled,
                             info={"workdir": paths.join(workdir), **info},
                             latent_scale=latent_scale, decode=decode, prompts=prompts,
                             encoder=encoder)
        compiled = True
        npz.evaluate_npz(paths.join(folder, "samples.npz"), reference, metric,
                         inception_weights, batch_size)
        paths.write_json(paths.join(folder, "spec.json"), setting_spec)
      rows.append(_row(setting, seed, folder))
  return rows


def _row(setting, seed, folder) -> dict:
  sampled = paths.read_json(paths.join(folder, "sampling.json"))
  measured = paths.read_json(paths.join(folder, "metrics.json"))
  row = {name: getattr(setting, name) for name in SETTING_COLUMNS}
  row.update(slug=setting.slug, seed=seed, gflops_true=sampled["gflops_true"],
             gflops_paper=sampled["gflops_paper"], nfe=sampled["nfe"],
             images_per_s=sampled["images_per_s"])
  row.update({k: v for k, v in measured.items() if isinstance(v, (int, float))
              and not k.startswith("num_") and k != "seconds"})
  return row


def aggregate(rows: list[dict]) -> list[dict]:
  """Mean, standard deviation and 95% interval half-width (`_ci`) over seeds per setting."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(tuple(row[c] for c in SETTING_COLUMNS), []).append(row)
  out = []
  for key, group in groups.items():
    entry = dict(zip(SETTING_COLUMNS, key))
    entry["seeds"] = len(group)
    for name in group[0]:
      if name in SETTING_COLUMNS or name == "seed":
        continue
      if isinstance(group[0][name], str):
        entry[name] = group[0][name]
        continue
      values = np.asarray([r[name] for r in group], np.float64)
      entry[name], entry[name + "_ci"] = stats.interval(values)
      entry[name + "_std"] = float(values.std())
    out.append(entry)
  return out


def label(entry: dict) -> str:
  """'sg omega=2 gamma=0.5/0.9', 'cfg omega=2', 'none'."""
  if entry["rule"] == "none":
    text = "none" + (f" gamma={entry['gamma_strong']:g}" if entry["gamma_strong"] else "")
  else:
    text = f"{entry['rule']} omega={entry['omega']:g}"
    if entry["gamma_strong"] or entry["gamma_weak"]:
      text += f" gamma={entry['gamma_strong']:g}/{entry['gamma_weak']:g}"
  if entry["schedule"] != "constant":
    # An end rate left unset keeps the start rate (GuidanceConfig.end_gammas).
    strong, weak = (entry[f"gamma_{b}_end"] if entry[f"gamma_{b}_end"] is not None
                    else entry[f"gamma_{b}"] for b in ("strong", "weak"))
    text += f" -> {strong:g}/{weak:g} ({entry['schedule']})"
  return text


def pareto_front(entries: list[dict], metric: str) -> list[dict]:
  """Settings no other setting beats on both GFLOPs and the metric."""
  sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
  front, best = [], np.inf
  for entry in sorted(entries, key=lambda e: (e["gflops_true"], sign * e[metric])):
    if sign * entry[metric] < best:
      front.append(entry)
      best = sign * entry[metric]
  return front


def write_table(entries: list[dict], path: str, metrics: list[str]) -> None:
  header = ["setting", *metrics, "GFLOPs/img/step (true)", "GFLOPs/img/step (paper)",
            "images/s"]
  lines = [f"Mean ± 95% interval over {entries[0]['seeds']} seed(s) (Student's t).", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for e in entries:
    cells = [label(e)] + [f"{e[m]:.3f} ± {e[m + '_ci']:.3f}" for m in metrics]
    cells += [f"{e['gflops_true']:.4f}", f"{e['gflops_paper']:.4f}",
              f"{e['images_per_s']:.1f} ± {e['images_per_s_ci']:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  paths.write_text(path, "\n".join(lines) + "\n")


def _pyplot():
  """matplotlib.pyplot on the file-only Agg backend (imported when a sweep plots)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot(entries: list[dict], out: str, metric: str) -> list[str]:
  """FID heatmaps over (gamma_strong, gamma_weak), one panel per omega, per sparse rule; and
  metric vs GFLOPs with the Pareto front. Returns the files written."""
  plt = _pyplot()
  written = []
  for rule in sorted({e["rule"] for e in entries if e["rule"] in ("sg", "cfg+sg", "ag+sg")}):
    chosen = [e for e in entries if e["rule"] == rule and e["schedule"] == "constant"]
    omegas = sorted({e["omega"] for e in chosen})
    strong = sorted({e["gamma_strong"] for e in chosen})
    weak = sorted({e["gamma_weak"] for e in chosen})
    if not chosen:
      continue
    fig, axes = plt.subplots(1, len(omegas), figsize=(3.2 * len(omegas) + 1, 3), squeeze=False)
    values = [e[metric] for e in chosen]
    for ax, omega in zip(axes[0], omegas):
      grid = np.full((len(strong), len(weak)), np.nan)
      for e in chosen:
        if e["omega"] == omega:
          grid[strong.index(e["gamma_strong"]), weak.index(e["gamma_weak"])] = e[metric]
      image = ax.imshow(grid, origin="lower", cmap="viridis_r", vmin=min(values),
                        vmax=max(values), aspect="auto")
      for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
          ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
      ax.set_xticks(range(len(weak)), [f"{g:g}" for g in weak])
      ax.set_yticks(range(len(strong)), [f"{g:g}" for g in strong])
      ax.set_xlabel("gamma_weak")
      ax.set_ylabel("gamma_strong")
      ax.set_title(f"{rule}, omega={omega:g}")
    fig.colorbar(image, ax=axes[0].tolist(), label=metric)
    path = paths.join(out, f"heatmap_{rule.replace('+', '_')}_{metric}.png")
    paths.save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append(path)

  fig, ax = plt.subplots(figsize=(6, 4))
  for rule in sorted({e["rule"] for e in entries}):
    chosen = [e for e in entries if e["rule"] == rule]
    ax.errorbar([e["gflops_true"] for e in chosen], [e[metric] for e in chosen],
                yerr=[e[metric + "_ci"] for e in chosen], fmt="o", label=rule, capsize=2)
  front = pareto_front(entries, metric)
  ax.plot([e["gflops_true"] for e in front], [e[metric] for e in front], "k--", lw=1,
          label="Pareto front")
  ax.set_xlabel("GFLOPs per image per sampling step (true)")
  ax.set_ylabel(f"{metric} (95% interval)")
  ax.legend(fontsize=7)
  path = paths.join(out, f"pareto_{metric}.png")
  paths.save_figure(fig, path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return written + [path]


def _family(entry: dict) -> str:
  """A setting's label without its omega: the points of one guidance front."""
  return label({**entry, "omega": 0.0}).replace(" omega=0", "")


def plot_front(entries: list[dict], out: str, variety: str, fidelity: str) -> str:
  """Fidelity against variety: one line per guidance family over its omegas (each point
  labelled with omega), the dense unguided setting as a star; 95% intervals on both axes."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for entry in entries:
    if entry["rule"] == "none" and not entry["gamma_strong"]:
      ax.errorbar(entry[variety], entry[fidelity], xerr=entry[variety + "_ci"],
                  yerr=entry[fidelity + "_ci"], fmt="k*", ms=10, capsize=2, label="unguided")
  families: dict[str, list[dict]] = {}
  for entry in entries:
    if entry["rule"] != "none":
      families.setdefault(_family(entry), []).append(entry)
  for name, chosen in families.items():
    chosen = sorted(chosen, key=lambda e: e["omega"])
    ax.errorbar([e[variety] for e in chosen], [e[fidelity] for e in chosen],
                xerr=[e[variety + "_ci"] for e in chosen],
                yerr=[e[fidelity + "_ci"] for e in chosen], fmt="o-", capsize=2, label=name)
    for e in chosen:
      ax.annotate(f"{e['omega']:g}", (e[variety], e[fidelity]), fontsize=6,
                  textcoords="offset points", xytext=(3, 3))
  ax.set_xlabel(f"{variety} (variety)")
  ax.set_ylabel(f"{fidelity} (fidelity)")
  ax.set_title("guidance fronts over omega (95% intervals)", fontsize=9)
  ax.legend(fontsize=7)
  path = paths.join(out, f"front_{fidelity}_vs_{variety}.png")
  paths.save_figure(fig, path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_sparsity(entries: list[dict], out: str, metrics: list[str]) -> str | None:
  """Unguided sampling's metrics against its sparsity rate (the strong branch alone), one
  panel per metric with 95% intervals; None unless the sweep has two or more such rates."""
  chosen = sorted((e for e in entries if e["rule"] == "none" and e["schedule"] == "constant"),
                  key=lambda e: e["gamma_strong"])
  if len(chosen) < 2:
    return None
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(metrics), figsize=(2.8 * len(metrics), 2.8), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    ax.errorbar([e["gamma_strong"] for e in chosen], [e[metric] for e in chosen],
                yerr=[e[metric + "_ci"] for e in chosen], fmt="o-", capsize=2)
    ax.set_xlabel("gamma (unguided)")
    ax.set_title(metric, fontsize=9)
  fig.tight_layout()
  path = paths.join(out, "sparsity_unguided.png")
  paths.save_figure(fig, path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def write_outputs(rows: list[dict], out: str, metrics: list[str],
                  front: tuple[str, str] | None = None) -> list[dict]:
  """sweep.csv, sweep.md, sweep.json and the plots; `front` = (variety, fidelity) metrics."""
  with paths.open_write(paths.join(out, "sweep.csv"), "w") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  entries = aggregate(rows)
  metrics = [m for m in metrics if m in entries[0]]
  write_table(entries, paths.join(out, "sweep.md"), metrics)
  paths.write_json(paths.join(out, "sweep.json"), entries)
  plot(entries, out, metrics[0])
  plot_sparsity(entries, out, metrics)
  if front is not None and set(front) <= set(entries[0]):
    plot_front(entries, out, *front)
  return entries


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags of this entry point (defined only when it runs, so modules import cleanly)."""
  flags.DEFINE_string("workdir", None, "Training run to sample from.")
  flags.DEFINE_multi_string("grid", None, "Grid spec, e.g. 'rule=sg;omega=1.5,2;gamma_weak=0.8'.")
  flags.DEFINE_list("seeds", ["0"], "Sample seeds; metrics are averaged over them.")
  flags.DEFINE_enum("metric", "digits", list(npz.METRICS), "Metrics to compute.")
  flags.DEFINE_string("reference", None, "Reference batch (.npz) for --metric=adm.")
  flags.DEFINE_string("inception_weights", None, "Inception weights for --metric=adm.")
  flags.DEFINE_integer("steps", 40, "Euler steps.")
  flags.DEFINE_integer("num_samples", 500, "Samples per setting and seed.")
  flags.DEFINE_integer("batch_size", 256, "Samples per batch (divisible by the device count).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_string("aux_workdir", None, "ag rules: run of the auxiliary model.")
  flags.DEFINE_integer("aux_step", None, "ag rules: checkpoint step of the auxiliary model.")
  flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/sweep).")
  flags.DEFINE_string("vae", None, "Runs on VAE latents: the VAE folder that decodes the"
                      " samples (default: the run's data.vae).")
  flags.DEFINE_string("prompts_file", None, "Text-to-image runs: captions, one a line (default"
                      " with --metric=scenes: num_samples / 4 random scene captions, 4 samples"
                      " each).")
  flags.DEFINE_string("text_npz", None, "Runs trained on precomputed text: the prompts' hidden"
                      " states (text, mask, captions; launch/embed_captions_hf.py).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  settings = [s for spec in FLAGS.grid for s in parse_grid(spec)]
  out = FLAGS.out or paths.join(FLAGS.workdir, "sweep")
  prompts = sample.read_prompts(None, FLAGS.prompts_file)
  if prompts is None and FLAGS.metric == "scenes":
    prompts = scenes.prompt_set(max(1, FLAGS.num_samples // 4), seed=0)
  rows = run_sweep(FLAGS.workdir, settings, out, seeds=[int(s) for s in FLAGS.seeds],
                   metric=FLAGS.metric, reference=FLAGS.reference,
                   inception_weights=FLAGS.inception_weights, steps=FLAGS.steps,
                   num_samples=FLAGS.num_samples, batch_size=FLAGS.batch_size,
                   step=FLAGS.step, aux_workdir=FLAGS.aux_workdir, aux_step=FLAGS.aux_step,
                   vae=FLAGS.vae, prompts=prompts, text_npz=FLAGS.text_npz)
  write_outputs(rows, out, METRICS[FLAGS.metric], FRONTS[FLAGS.metric])
  print(paths.read_text(paths.join(out, "sweep.md")))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir", "grid"])
  cli.run(main)
