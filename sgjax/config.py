"""Helpers for the ml_collections `get_config(arg)` files in configs/."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from sgjax import flow
from sgjax.models import registry, vae
from sgjax.sparsity import Route
from sgjax.text import conditioning


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
  """'model=SiT-XL/2,runlocal' -> {'model': 'SiT-XL/2', 'runlocal': True, ...defaults}.

  Values take the type of their default; a bare key sets a boolean. Unknown keys raise.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is unknown; known: {sorted(defaults)}.")
    default = defaults[key]
    if not has_value:
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r}: expected true or false.")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = type(default)(value) if default is not None else value
  return out


def model_config(model: Mapping[str, Any]) -> registry.ModelConfig:
  """config.model (a ConfigDict or dict) -> its validated architecture config
  (`sgjax.models.registry`).

  `arch` picks the architecture (default "dit"); `name` is informational; `routes` is a
  sequence of (start, end, gamma).
  """
  fields = dict(model)
  fields.pop("name", None)
  arch = fields.pop("arch", "dit")
  if arch not in registry.ARCHS:
    raise ValueError(f"model.arch={arch!r}: choose one of {sorted(registry.ARCHS)}.")
  config_class = registry.ARCHS[arch][0]
  known = {f.name for f in dataclasses.fields(config_class)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"config.model has unknown field(s) {unknown} for model.arch={arch!r};"
                     f" known: {sorted(known)}.")
  routes = []
  for i, route in enumerate(fields.get("routes", ())):
    if len(route) != 3:
      raise ValueError(f"model.routes[{i}]={route!r}: expected (start, end, gamma).")
    routes.append(Route(int(route[0]), int(route[1]), float(route[2])))
  fields["routes"] = tuple(routes)
  return config_class(**fields).validate()


# Fields that may differ when a run resumes from its workdir (logged, not refused).
RESUMABLE_FIELDS = ("train.steps", "train.lr", "train.grad_clip", "train.log_every",
                    "train.ckpt_every", "train.keep_ckpts", "train.keep_every",
                    "train.sample_every", "data.num_workers", "data.path", "data.data_dir",
                    "data.vae",
                    "model.remat", "model.attention", "mesh.preset", "mesh.tensor",
                    "mesh.dcn_data")


# Fields added after runs were first written, with the value those runs had (the model's
# default): a config without the field compares as if it had it.
ADDED_FIELDS = {"model.time_scale": 1000.0, "model.arch": "dit", "model.pos_embed": "none"}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; sequences become lists (as after a JSON round trip)."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "."))
    else:
      out[name] = _jsonable(value)
  return out


def _jsonable(value):
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def resume_changes(saved: Mapping[str, Any], current: Mapping[str, Any],
                   step: int | None = None) -> list[str]:
  """Compares the config a workdir was trained with against the current one.

  Returns the allowed changes as readable lines; raises ValueError for any other. A
  checkpoint at `step` 0 (imported weights, `sgjax.import_torch`) has seen no training, so
  only its model must stay the same: data, optimizer and schedule start afresh.
  """
  old, new = ({**ADDED_FIELDS, **flatten(tree)} for tree in (saved, current))
  changes, refused = [], []
  for name in sorted(set(old) | set(new)):
    if old.get(name, "<absent>") == new.get(name, "<absent>"):
      continue
    line = f"{name}: {old.get(name, '<absent>')!r} -> {new.get(name, '<absent>')!r}"
    allowed = name in RESUMABLE_FIELDS or (step == 0 and not name.startswith("model."))
    (changes if allowed else refused).append(line)
  if refused:
    raise ValueError(
        "the workdir holds a run with a different config; refusing to mix them. Use another"
        " --workdir, or restore the original settings. Differences:\n  " + "\n  ".join(refused))
  return changes


def validate(config) -> None:
  """Checks a full training config before anything is compiled."""
  model_cfg = model_config(config.model)
  if model_cfg.text_conditioned:
    if "text" not in config:
      raise ValueError("a text-to-image model (model.arch='trdit') needs config.text (its"
                       " encoder); see configs/t2i.py.")
    conditioning.make_encoder(config.text, model_cfg)
  flow.LossConfig(**config.flow).validate()
  train = config.train
  for name in ("batch_size", "steps", "log_every", "ckpt_every", "keep_ckpts"):
    if train[name] <= 0:
      raise ValueError(f"train.{name}={train[name]!r} must be positive.")
  keep_every = train.get("keep_every", 0)
  if keep_every < 0 or keep_every % train.ckpt_every:
    raise ValueError(f"train.keep_every={keep_every!r} must be 0 (keep only the newest"
                     f" train.keep_ckpts) or a multiple of train.ckpt_every={train.ckpt_every}"
                     " (the steps that get a checkpoint).")
  if train.lr <= 0:
    raise ValueError(f"train.lr={train.lr!r} must be positive.")
  if not 0.0 <= train.ema_decay < 1.0:
    raise ValueError(f"train.ema_decay={train.ema_decay!r} must lie in [0, 1).")
  if train.get("lr_schedule", "constant") not in ("constant", "cosine"):
    raise ValueError(f"train.lr_schedule={train.lr_schedule!r}: choose constant or cosine.")
  check_vae(config)


def check_vae(config) -> None:
  """A run on VAE latents that names its VAE (data.vae) must fit it: the model's channels are
  the VAE's latent channels, and data.latent_scale is the VAE's scaling factor."""
  data = config.data
  if data.source != "latents" or not data.get("vae"):
    return
  cfg = vae.read_config(data.vae)
  if cfg.latent_channels != config.model.in_channels:
    raise ValueError(f"model.in_channels={config.model.in_channels}, but the VAE in"
                     f" data.vae={data.vae!r} has {cfg.latent_channels} latent channels.")
  if abs(cfg.scaling_factor - data.latent_scale) > 1e-9:
    raise ValueError(f"data.latent_scale={data.latent_scale}, but the VAE in data.vae="
                     f"{data.vae!r} has scaling_factor {cfg.scaling_factor}; set them equal.")
