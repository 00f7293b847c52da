"""Imports a PyTorch SiT / TREAD / DiT checkpoint as an sgjax workdir.

    python -m sgjax.import_torch --checkpoint=SiT-XL-2-256.pt --arch=sit --model=SiT-XL/2 \
        --out=runs/sit_xl2_imported
    python -m sgjax.import_torch --checkpoint=tread_rf.pt --arch=tread --model=DiT-XL/2 \
        --routes=2:24:0.5 --out=runs/tread_xl2

The workdir holds checkpoint step 0 (params and EMA from the file, a fresh optimizer state)
and the config of `configs/imagenet256.py` for that model, with what the checkpoint fixes
(latent size, channels, classes, time scale, routes); a file with only one kind of weights
(a released state dict) gives them whatever `--ema` says. `sgjax.sample` samples it and
`sgjax.train` finetunes it like any run; the command printed at the end names the config
overrides that finetuning needs. Conversions (time direction, velocity sign, learn-sigma
channels, fused qkv) are described in `sgjax/models/dit_torch.py`. No torch is needed.

- sit: willisma/SiT, flow matching; `--routes` optionally adds TREAD routes for finetuning.
- tread: CompVis/tread's `dit.py` network trained as a rectified flow (`rf.py`, t = 1 noise),
  e.g. by your own training loop; TREAD's own train.py wraps it in EDM preconditioning,
  whose checkpoints are refused. Its routes are not in the file: give those of its config
  (`start_layer_idx:end_layer_idx:selection_ratio`, 0-based and inclusive; default: TREAD's
  route for the model's depth, e.g. 2:24:0.5 for XL).
- dit: facebookresearch/DiT (DDPM epsilon): an initialisation for finetuning only.
"""

from __future__ import annotations

import importlib.util
import os
import shlex

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging

from sgjax import checkpoint, cli, config as config_lib, logs, paths, torch_state
from sgjax import train_state
from sgjax.models import dit, dit_torch

FLAGS = flags.FLAGS
CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "imagenet256.py")


def parse_routes(specs: list[str] | None) -> tuple[tuple[int, int, float], ...] | None:
  """['2:24:0.5', ...] -> ((2, 24, 0.5), ...); None when no route is given."""
  if not specs:
    return None
  routes = []
  for spec in specs:
    parts = spec.split(":")
    try:
      if len(parts) != 3:
        raise ValueError
      routes.append((int(parts[0]), int(parts[1]), float(parts[2])))
    except ValueError:
      raise ValueError(f"--routes={spec!r}: expected start:end:gamma, e.g. 2:24:0.5 (blocks"
                       " 0-based, end inclusive, gamma the fraction of tokens dropped)."
                       ) from None
  return tuple(routes)


def base_config(model: str, sparsity: str, latent_size: int) -> ml_collections.ConfigDict:
  """`configs/imagenet256.py:model=MODEL,sparsity=...,latent_size=...`."""
  spec = importlib.util.spec_from_file_location("sgjax_imagenet256_config", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"model={model},sparsity={sparsity},latent_size={latent_size}")


def import_checkpoint(path: str, arch: str, model: str, out: str, *, ema: bool = True,
                      routes: tuple[tuple[int, int, float], ...] | None = None,
                      num_classes: int | None = None) -> dict:
  """Writes the workdir `out`; returns its config, where the weights came from (`source`) and
  the commands that sample and finetune it."""
  convention = dit_torch.check_arch(arch)
  dit.parse_model_name(model)  # names the accepted forms on a typo
  if any(paths.resolve(out).joinpath(name).exists() for name in ("checkpoints", "config.json")):
    raise ValueError(f"--out={out!r} already holds a run (or an interrupted import); import"
                     " into a new folder.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--checkpoint={path!r} does not exist.")
  loaded = torch_state.load(path)
  dit_torch.check_training_args(loaded)
  weights, source = dit_torch.select_weights(loaded, ema)
  del loaded  # the weights not imported (raw or EMA, optimizer state) are freed
  shapes = dit_torch.architecture(weights)
  num_classes, null_added = dit_torch.add_null_class(weights, num_classes)
  if null_added:
    logging.warning("the checkpoint has no null class (trained without label dropout); its"
                    " null embedding starts at zero: finetune with label dropout before"
                    " guiding with CFG.")
  if arch == "tread" and routes is None:
    routes = base_config(model, "routing", shapes["input_size"]).model.routes
    logging.warning("TREAD checkpoints do not record their routes; using %s (pass --routes"
                    " with those of the run's config if they differ).", routes)
  sparsity = "dense" if routes is None else "routing"
  config = base_config(model, sparsity, shapes["input_size"])
  default_model = config.model.to_dict()
  config.model.update(in_channels=shapes["in_channels"], num_classes=num_classes,
                      mlp_ratio=shapes["mlp_hidden"] / shapes["width"],
                      time_scale=convention.time_scale)
  if routes is not None:
    config.model.routes = routes
  model_cfg = config_lib.model_config(config.model)
  dit_torch.check_fits(weights, model_cfg, model)
  params = jax.tree.map(jnp.asarray, dit_torch.convert(weights, model_cfg, arch))
  del weights  # the torch-layout copy; a large model holds several more below

  tx = train_state.make_optimizer(train_state.OptimConfig.from_train_config(config.train))
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "ema": params,
           "opt_state": tx.init(params)}
  ckpt = checkpoint.Checkpointer(out, async_save=False)
  ckpt.save(0, state, config.to_dict())
  ckpt.close()
  # Last: a folder with config.json holds a complete import.
  checkpoint.write_config_json(out, config.to_dict())

  written, default = config_lib.flatten(config.model.to_dict()), config_lib.flatten(default_model)
  overrides = [f"--config.model.{name}={_flag_value(value)}" for name, value in written.items()
               if default.get(name) != value]
  finetune = shlex.join(
      ["python", "-m", "sgjax.train",
       f"--config=configs/imagenet256.py:model={model},sparsity={sparsity},"
       f"latent_size={shapes['input_size']}", *overrides, f"--workdir={out}"])
  if arch == "dit":  # an epsilon model: its output is not a velocity to integrate
    sample = "(none: a DiT checkpoint is a finetuning initialisation; finetune it first)"
  else:  # SG needs a route to apply its sparsity rates to; a dense model samples with CFG.
    guidance = (["--guidance=sg", "--gamma_strong=0.5", "--gamma_weak=0.9"]
                if routes is not None else ["--guidance=cfg", "--omega=1.5"])
    sample = shlex.join(["python", "-m", "sgjax.sample", f"--workdir={out}", *guidance])
  return {"config": config, "finetune": finetune, "source": source, "sample": sample}


def _flag_value(value) -> str:
  """A config value as an ml_collections override reads it: ((2,24,0.5),) for routes."""
  if isinstance(value, list):
    return "(" + "".join(_flag_value(v) + "," for v in value) + ")"
  return repr(value)


def define_flags() -> None:
  """Flags of this entry point (defined only when it runs, so modules import cleanly)."""
  flags.DEFINE_string("checkpoint", None, "The PyTorch file (.pt / .pth): a state dict or a"
                      " training checkpoint of SiT, TREAD or DiT.")
  flags.DEFINE_string("arch", None, f"The family that wrote it: one of {dit_torch.ARCHS}.")
  flags.DEFINE_string("model", None, "Its size, e.g. SiT-XL/2 or DiT-B/2 (depth, width,"
                      " heads and patch; checked against the weights).")
  flags.DEFINE_bool("ema", True, "From a training checkpoint, import its EMA weights (as both"
                    " params and EMA of the workdir); --noema takes the raw weights.")
  flags.DEFINE_list("routes", None, "start:end:gamma[,...]: TREAD routes (tread: those of its"
                    " config, default TREAD's for the depth; sit / dit: routes to finetune with).")
  flags.DEFINE_integer("num_classes", None, "Classes of the checkpoint (default: the class"
                       " table's rows - 1, i.e. trained with label dropout and a null class;"
                       " give the row count for one trained without, to add a null row).")
  flags.DEFINE_string("out", None, "The new workdir.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  result = import_checkpoint(FLAGS.checkpoint, FLAGS.arch, FLAGS.model, FLAGS.out,
                             ema=FLAGS.ema, routes=parse_routes(FLAGS.routes),
                             num_classes=FLAGS.num_classes)
  logging.info("imported %s of %s as step 0 of %s", result["source"], FLAGS.checkpoint,
               FLAGS.out)
  print(f"Imported into {FLAGS.out}.\n  sample:   {result['sample']}\n"
        f"  finetune (add --config.data.path=YOUR_LATENT_SHARDS): {result['finetune']}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["checkpoint", "arch", "model", "out"])
  cli.run(main)
