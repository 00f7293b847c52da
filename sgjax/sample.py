"""Sampling entry point: guided samples from a training run's checkpoint.

    python -m sgjax.sample --workdir=runs/digits --guidance=sg --omega=1.5 \
        --gamma_strong=0.5 --gamma_weak=0.8 --steps=40 --num_samples=100 --out=runs/digits/sg
    python -m sgjax.sample --workdir=runs/scenes --guidance=cfg+sg --omega=2.5 \
        --gamma_strong=0.2 --gamma_weak=0.7 --prompt="a red 3 left of a blue 7"

Writes OUT/grid.png (labelled), OUT/samples.npz (`arr_0` uint8 NHWC images, `arr_1` labels:
the ADM evaluation suite's format) and OUT/sampling.json (guidance, NFE, wall time without
compilation, images/s, GFLOPs per image of the whole trajectory in both conventions). A run
trained on VAE latents decodes its samples with its VAE (`--vae`, default the run's
`data.vae`) into the same files; `--save_latents`, or a run without a VAE, writes
OUT/latents.npz (`arr_0` float32 NHWC latents, unscaled as the decoder takes them, `arr_1`
labels). A text-to-image run samples from `--prompt` or `--prompts_file` (one caption a line;
sample i takes prompt i mod P); its `arr_1` holds each sample's prompt, and the grid is
captioned with them.
"""

from __future__ import annotations

import dataclasses
import textwrap
import time

import jax
import numpy as np
from absl import app, flags, logging

from sgjax import checkpoint, cli, distributed, guidance as guidance_lib, logs, paths
from sgjax import sampling, sharding
from sgjax.data import sources
from sgjax.models import vae as vae_lib
from sgjax.text import conditioning

FLAGS = flags.FLAGS


def define_guidance_flags(default_rule: str | None = "sg") -> None:
  """The guidance flags shared by `sgjax.sample` and `sgjax.flops`."""
  flags.DEFINE_enum("guidance", default_rule, list(guidance_lib.RULES), "Guidance rule.")
  flags.DEFINE_float("omega", 1.5, "Guidance scale (1 = no guidance).")
  flags.DEFINE_float("gamma_strong", None, "Sparsity rate of the strong branch (default 0;"
                     " 0.5 for sg and cfg+sg when neither gamma is given).")
  flags.DEFINE_float("gamma_weak", None, "Sparsity rate of the weak branch (default 0; 0.9 for"
                     " sg and cfg+sg when neither gamma is given).")
  flags.DEFINE_enum("schedule", "constant", list(guidance_lib.SCHEDULES), "Gamma schedule.")
  flags.DEFINE_float("gamma_strong_end", None, "cosine: strong-branch rate at the last step.")
  flags.DEFINE_float("gamma_weak_end", None, "cosine: weak-branch rate at the last step.")
  flags.DEFINE_integer("num_levels", 8, "cosine: number of quantised schedule levels; 0"
                       " follows the cosine exactly (each step its own K; more compilation).")
  flags.DEFINE_list("interval", None, "t_min,t_max: guide only steps starting inside this"
                    " interval of t (t = 0 noise, t = 1 data; an interval published with"
                    " t = 1 as noise, like REPA's, becomes 1 - t_max,1 - t_min).")


def guidance_from_flags() -> guidance_lib.GuidanceConfig:
  interval = None if not FLAGS.interval else tuple(float(v) for v in FLAGS.interval)
  gamma_strong, gamma_weak = guidance_lib.default_gammas(FLAGS.guidance, FLAGS.gamma_strong,
                                                         FLAGS.gamma_weak)
  if (FLAGS.guidance in guidance_lib.SPARSITY_GAP_RULES and FLAGS.gamma_strong is None
      and FLAGS.gamma_weak is None):
    logging.info("--guidance=%s without --gamma_strong/--gamma_weak: using the paper's"
                 " SG_FLOPS rates gamma_strong=%g, gamma_weak=%g", FLAGS.guidance, gamma_strong,
                 gamma_weak)
  return guidance_lib.GuidanceConfig(
      rule=FLAGS.guidance, omega=FLAGS.omega, gamma_strong=gamma_strong,
      gamma_weak=gamma_weak, schedule=FLAGS.schedule,
      gamma_strong_end=FLAGS.gamma_strong_end, gamma_weak_end=FLAGS.gamma_weak_end,
      num_levels=FLAGS.num_levels, interval=interval).validate()


def make_labels(spec: str, num_samples: int, num_classes: int, key: jax.Array) -> np.ndarray:
  """balanced (0, 1, 2, ... cycling), random (uniform, from `key`) or an explicit list."""
  if spec == "balanced":
    return np.arange(num_samples, dtype=np.int32) % num_classes
  if spec == "random":
    return np.asarray(jax.random.randint(key, (num_samples,), 0, num_classes), np.int32)
  try:
    given = np.asarray([int(v) for v in spec.split(",")], np.int32)
  except ValueError:
    raise ValueError(f"--labels={spec!r}: expected balanced, random or class ids like 3,1,4."
                     ) from None
  if given.min() < 0 or given.max() >= num_classes:
    raise ValueError(f"--labels={spec!r}: class ids must lie in [0, {num_classes}).")
  return np.resize(given, num_samples)


def save_grid(path: str, images: np.ndarray, labels: np.ndarray, columns: int = 10) -> None:
  """A PNG grid of uint8 NHWC images, each cell upscaled to at least 64 px (96 px with
  captions) under its label or caption (wrapped to the cell's width)."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  n, h, w, c = images.shape
  texts = [str(label) for label in labels]
  scale = max(1, (96 if max(map(len, texts), default=0) > 3 else 64) // max(h, w))
  cell_h, cell_w = h * scale, w * scale
  texts = ["\n".join(textwrap.wrap(text, max(1, cell_w // 6))) for text in texts]
  caption = 12 * max((text.count("\n") + 1 for text in texts), default=1)
  rows = -(-n // columns)
  grid = Image.new("RGB", (columns * (cell_w + 2), rows * (cell_h + caption + 2)), "white")
  draw = ImageDraw.Draw(grid)
  for i, (image, text) in enumerate(zip(images, texts)):
    tile = Image.fromarray(image[..., 0] if c == 1 else image).convert("RGB")
    x, y = (i % columns) * (cell_w + 2), (i // columns) * (cell_h + caption + 2)
    grid.paste(tile.resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y + caption))
    draw.multiline_text((x + 2, y), text, fill="black", spacing=1)
  paths.save_image(grid, path)


def preview_grid(model, mesh, path: str, *, seed: int = 0, steps: int = 20) -> None:
  """An unguided, class-balanced grid of up to 100 samples (2 per class for small label
  sets) written to `path` by process 0; every process takes part in the sampling."""
  devices = sharding.data_parallel_size(mesh)
  count = min(100, 2 * model.cfg.num_classes)
  count = -(-count // devices) * devices
  labels = np.arange(count, dtype=np.int32) % model.cfg.num_classes
  sampler = sampling.Sampler(model, guidance_lib.GuidanceConfig(rule="none"), steps=steps,
                             mesh=mesh)
  images = sources.to_uint8(distributed.to_host(sampler(labels, seed)))
  if distributed.is_primary():
    save_grid(path, images, labels)


def check_sample_counts(num_samples: int, batch_size: int) -> None:
  for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
    if value < 1:
      raise ValueError(f"--{name}={value} must be >= 1.")


def check_finite(batches: list[np.ndarray], num_samples: int,
                 guidance: guidance_lib.GuidanceConfig) -> None:
  """Raises FloatingPointError, saying how many are affected, unless the first `num_samples`
  samples of `batches` ([B, ...] each, in order) are finite: called before writing anything."""
  bad = np.concatenate([~np.isfinite(b.reshape(len(b), -1)).all(axis=1) for b in batches])
  bad = bad[:num_samples]
  if bad.any():
    raise FloatingPointError(
        f"{int(bad.sum())} of {num_samples} samples hold NaN or inf (the first: sample"
        f" {int(bad.argmax())}); nothing was written. Lower the guidance scale (omega="
        f"{guidance.omega:g}), or sample an earlier checkpoint (--step) if this one diverged.")


def sampling_mesh(batch_size: int):
  """All devices, data-parallel; checks that `batch_size` splits over them."""
  mesh = sharding.make_mesh("data")
  if batch_size % sharding.data_parallel_size(mesh):
    raise ValueError(f"--batch_size={batch_size} must be divisible by the"
                     f" {sharding.data_parallel_size(mesh)} devices.")
  return mesh


def check_aux(guidance: guidance_lib.GuidanceConfig, aux_workdir: str | None,
              aux_step: int | None) -> None:
  if guidance.uses_aux and aux_workdir is None and aux_step is None:
    raise ValueError(f"--guidance={guidance.rule} needs --aux_workdir and/or --aux_step"
                     " (the weaker auxiliary model, e.g. an early checkpoint).")


def load_models(workdir: str, guidance: guidance_lib.GuidanceConfig, mesh, *, step=None,
                ema=True, aux_workdir=None, aux_step=None):
  """(model, aux model or None, run config, {step, aux_step}) for a guidance rule."""
  check_aux(guidance, aux_workdir, aux_step)
  model, config, model_step = checkpoint.load_model(workdir, step, ema, mesh)
  aux_model = None
  if guidance.uses_aux:
    aux_model, _, aux_step = checkpoint.load_model(aux_workdir or workdir, aux_step, ema, mesh)
  return model, aux_model, config, {"step": model_step, "aux_step": aux_step}


def latent_scale_of(config: dict) -> float | None:
  """The scale of a run trained on VAE latents (its samples are latents), else None."""
  data = config["data"]
  return data["latent_scale"] if data["source"] == "latents" else None


def latent_decoder(config: dict, mesh, vae_dir: str | None = None):
  """For a run trained on VAE latents: a function from its samples (scaled latents) to images
  in [-1, 1], decoding with `vae_dir` or the run's `data.vae`; None for pixel runs and for
  latent runs that name no VAE."""
  scale = latent_scale_of(config)
  vae_dir = vae_dir or config["data"].get("vae") or None
  if scale is None or vae_dir is None:
    return None
  model = vae_lib.load(vae_dir)
  channels = config["model"]["in_channels"]
  if model.cfg.latent_channels != channels:
    raise ValueError(f"the VAE in {vae_dir!r} has {model.cfg.latent_channels} latent channels;"
                     f" the run's model takes {channels}: use the VAE its latents came from.")
  _, decode = vae_lib.batch_codec(model, mesh)
  return lambda samples: decode(np.asarray(samples) / np.float32(scale))


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str] | None:
  """The captions of --prompt (repeatable) and --prompts_file (one a line; blank lines
  skipped), in that order; None when neither is given."""
  if not prompts and not prompts_file:
    return None
  found = list(prompts or [])
  if prompts_file:
    from_file = [line.strip() for line in paths.read_text(prompts_file).splitlines()
                 if line.strip()]
    if not from_file:
      raise ValueError(f"--prompts_file={prompts_file!r} holds no prompt: write one caption a"
                       " line.")
    found += from_file
  return found


def sample_to_dir(sampler: sampling.Sampler, out: str, *, num_samples: int, batch_size: int,
                  labels: str, seed: int, info: dict, compile_first: bool = True,
                  latent_scale: float | None = None, decode=None,
                  save_latents: bool = False, prompts: list[str] | None = None,
                  encoder=None) -> dict:
  """Runs `sampler` and writes grid.png, samples.npz, sampling.json; returns the summary.

  A text-to-image sampler takes `prompts` (sample i gets prompt i mod P), encoded by the
  run's frozen `encoder`, instead of `labels`. With `latent_scale` the samples are latents
  of a VAE: `decode` (`latent_decoder`) turns them into the images; latents.npz holds them
  divided by the scale (as the decoder takes them) when there is no decoder, or with
  `save_latents`.

  Batches have a fixed shape (the last is padded), so images depend on the seed and
  batch_size but never on the device count. `compile_first` compiles the program before the
  timed loop (`compile_s`); pass False when this sampler has already run a batch of this size.
  """
  check_sample_counts(num_samples, batch_size)
  base = jax.random.key(seed)
  if prompts is None:
    all_labels = make_labels(labels, num_samples, sampler.model_cfg.num_classes,
                             jax.random.fold_in(base, 0))
  else:
    all_labels = np.asarray(prompts)[np.arange(num_samples) % len(prompts)]
  num_batches = -(-num_samples // batch_size)
  batches = np.resize(all_labels, num_batches * batch_size).reshape(num_batches, batch_size)
  if prompts is not None:  # captions -> hidden states once, outside the timed loop
    batches = [conditioning.encode_captions(encoder, list(batch)) for batch in batches]
  batch_key = lambda i: jax.random.fold_in(jax.random.fold_in(base, 1), i)

  compile_s = None
  if compile_first:
    start = time.perf_counter()
    sampler.compile(batches[0], batch_key(0))
    compile_s = time.perf_counter() - start
  start = time.perf_counter()
  # Multi-host: every process gathers the whole batch; process 0 alone writes the files.
  outputs = [distributed.to_host(sampler(labels_i, batch_key(i)))
             for i, labels_i in enumerate(batches)]
  wall_s = time.perf_counter() - start
  check_finite(outputs, num_samples, sampler.guidance)
  samples = np.concatenate(outputs)[:num_samples]
  decode_s = None
  if latent_scale is not None and decode is not None:
    start = time.perf_counter()  # uint8 at once: 50k float32 images at 256x256 are 39 GB
    decoded = [sources.to_uint8(distributed.to_host(decode(batch))) for batch in outputs]
    decode_s = time.perf_counter() - start
  kinds = []
  if latent_scale is None or decode is not None:
    kinds.append("images")
  if latent_scale is not None and (decode is None or save_latents):
    kinds.append("latents")

  if distributed.is_primary():
    if "images" in kinds:
      images = (sources.to_uint8(samples) if latent_scale is None
                else np.concatenate(decoded)[:num_samples])
      paths.save_npz(paths.join(out, "samples.npz"), images, all_labels)
      save_grid(paths.join(out, "grid.png"), images[:100], all_labels[:100])
    if "latents" in kinds:
      paths.save_npz(paths.join(out, "latents.npz"), samples / np.float32(latent_scale),
                     all_labels)
  summary = {
      **info, "output": "+".join(kinds), "decode_s": decode_s,
      "guidance": dataclasses.asdict(sampler.guidance), "num_samples": num_samples,
      "batch_size": batch_size, "seed": seed,
      "labels": labels if prompts is None else f"{len(prompts)} prompts",
      "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
      "wall_s": wall_s, "compile_s": compile_s,
      "images_per_s": num_batches * batch_size / wall_s,
      **sampler.plan.summary(),
  }
  if distributed.is_primary():
    paths.write_json(paths.join(out, "sampling.json"), summary)
  logging.info("%d samples in %.2fs (%.1f images/s, %.3f GFLOPs/image over the trajectory)"
               " -> %s", num_samples, wall_s, summary["images_per_s"],
               summary["trajectory_gflops_true"], out)
  return summary


def run(workdir: str, guidance: guidance_lib.GuidanceConfig, out: str, *, step=None,
        ema=True, aux_workdir=None, aux_step=None, steps=40, solver="euler", nested=False,
        num_samples=64, batch_size=64, labels="balanced", seed=0, vae=None,
        save_latents=False, prompts: list[str] | None = None,
        text_npz: str | None = None) -> dict:
  """The `python -m sgjax.sample` command as a function."""
  check_sample_counts(num_samples, batch_size)
  mesh = sampling_mesh(batch_size)
  model, aux_model, config, steps_info = load_models(
      workdir, guidance, mesh, step=step, ema=ema, aux_workdir=aux_workdir, aux_step=aux_step)
  encoder, prompts = text_encoder(config, model.cfg, prompts, text_npz)
  sampler = sampling.Sampler(model, guidance, steps=steps, solver=solver,
                             aux_model=aux_model, mesh=mesh, nested=nested)
  info = {"workdir": paths.join(workdir), "ema": ema, "nested": nested,
          "aux_workdir": aux_workdir and paths.join(aux_workdir), **steps_info}
  if text_npz is not None:
    info["text_npz"] = {"path": paths.join(text_npz), "sha256": encoder.sha256}
  decode = latent_decoder(config, mesh, vae)
  if latent_scale_of(config) is not None and decode is None:
    logging.info("no VAE given (--vae or data.vae): writing latents.npz, not images")
  return sample_to_dir(sampler, out, num_samples=num_samples, batch_size=batch_size,
                       labels=labels, seed=seed, info=info, latent_scale=latent_scale_of(config),
                       decode=decode, save_latents=save_latents, prompts=prompts,
                       encoder=encoder)


def text_encoder(config: dict, model_cfg, prompts: list[str] | None,
                 text_npz: str | None = None):
  """(the frozen encoder of a text-to-image run, its prompts); (None, None) for a
  class-conditional run. Checks that prompts are given exactly when the run takes them. A run
  trained on precomputed text takes its prompts' hidden states from `text_npz` (text, mask,
  captions: launch/embed_captions_hf.py writes them); its captions are the prompts unless
  `prompts` picks some of them."""
  if not model_cfg.text_conditioned:
    if prompts is not None or text_npz is not None:
      raise ValueError("--prompt/--prompts_file/--text_npz: this run is class-conditional"
                       " (model.arch='dit'); choose classes with --labels instead.")
    return None, None
  encoder = conditioning.make_encoder(config["text"], model_cfg)
  if encoder is None:  # trained on precomputed text
    if text_npz is None:
      raise ValueError("this run trained on precomputed text hidden states (text.encoder="
                       "'precomputed'): give the prompts' hidden states from the same encoder"
                       " with --text_npz=FILE (launch/embed_captions_hf.py writes it).")
    where = f"--text_npz={text_npz!r}"
    encoder = conditioning.load_hidden_states(text_npz, where)
    conditioning.check_batch({"text": encoder.text, "mask": encoder.mask}, model_cfg, where)
    prompts = list(encoder.captions) if prompts is None else prompts
    encoder.rows(prompts, where)  # refuses prompts without hidden states up front
    return encoder, prompts
  if text_npz is not None:
    raise ValueError(f"--text_npz: this run encodes its prompts with the built-in"
                     f" {config['text']['encoder']!r} encoder; give --prompt or --prompts_file.")
  if prompts is None:
    raise ValueError("this run is text-to-image (model.arch='trdit'): give --prompt=CAPTION"
                     " (repeatable) or --prompts_file=FILE.")
  encoder.tokenize(prompts)  # refuses unknown words and over-long captions up front
  return encoder, prompts


def define_flags() -> None:
  """Flags of this entry point (defined only when it runs, so modules import cleanly)."""
  flags.DEFINE_string("workdir", None, "Training run to sample from.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_bool("ema", True, "Use the EMA weights.")
  define_guidance_flags()
  flags.DEFINE_string("aux_workdir", None, "ag / ag+sg: run holding the auxiliary model.")
  flags.DEFINE_integer("aux_step", None, "ag / ag+sg: checkpoint step of the auxiliary model.")
  flags.DEFINE_integer("steps", 40, "Solver steps.")
  flags.DEFINE_enum("solver", "euler", ["euler", "heun"], "ODE solver.")
  flags.DEFINE_bool("nested", False, "Weak branch keeps a subset of the strong branch's tokens.")
  flags.DEFINE_integer("num_samples", 64, "Number of samples.")
  flags.DEFINE_integer("batch_size", 64, "Samples per batch (results depend on it, not on the"
                       " device count; must be divisible by the device count).")
  flags.DEFINE_string("labels", "balanced", "balanced | random | comma-separated class ids.")
  flags.DEFINE_multi_string("prompt", None, "Text-to-image runs: a caption (repeatable).")
  flags.DEFINE_string("prompts_file", None, "Text-to-image runs: a file of captions, one a"
                      " line.")
  flags.DEFINE_string("text_npz", None, "Runs trained on precomputed text: the prompts' hidden"
                      " states (text, mask, captions; launch/embed_captions_hf.py).")
  flags.DEFINE_integer("seed", 0, "Sample seed.")
  flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/samples/<setting>, e.g."
                      " samples/sg-w2-gs0.5-gw0.9).")
  flags.DEFINE_string("vae", None, "Runs on VAE latents: the diffusers AutoencoderKL folder"
                      " that decodes the samples (default: the run's data.vae).")
  flags.DEFINE_bool("save_latents", False, "Runs on VAE latents: also write latents.npz.")
  distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize_from_flags()  # multi-host jobs: before any JAX computation
  logs.quiet_libraries()
  guidance = guidance_from_flags()
  out = FLAGS.out or paths.join(FLAGS.workdir, "samples", guidance.slug)
  run(FLAGS.workdir, guidance, out, step=FLAGS.step, ema=FLAGS.ema,
      aux_workdir=FLAGS.aux_workdir, aux_step=FLAGS.aux_step, steps=FLAGS.steps,
      solver=FLAGS.solver, nested=FLAGS.nested, num_samples=FLAGS.num_samples,
      batch_size=FLAGS.batch_size, labels=FLAGS.labels, seed=FLAGS.seed, vae=FLAGS.vae,
      save_latents=FLAGS.save_latents, prompts=read_prompts(FLAGS.prompt, FLAGS.prompts_file),
      text_npz=FLAGS.text_npz)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
