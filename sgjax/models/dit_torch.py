"""PyTorch SiT / TREAD / DiT checkpoints -> sgjax `DiT` parameters (numpy only, no torch).

The three reference families share DiT's module tree, so one key map serves them; each
family differs only in its time and output conventions (`CONVENTIONS`), applied to the
weights so that the imported model is an ordinary sgjax model (t = 0 noise, t = 1 data,
velocity = data - noise for the flow models):

  torch key (block i)                 sgjax parameter             transform
  x_embedder.proj.weight [D,C,p,p]    patch_embed.kernel [ppC,D]  conv -> (p, q, c) rows
  x_embedder.proj.bias                patch_embed.bias
  t_embedder.mlp.0.weight [D,256]     t_mlp1.kernel [256,D]       .T; time flip folded in
  t_embedder.mlp.2.weight             t_mlp2.kernel               .T
  y_embedder.embedding_table.weight   y_embed.embedding           (null class last, as ours)
  blocks.i.attn.qkv.weight [3D,D]     blocks.i.attn.{q,k,v}       split in three, .T
  blocks.i.attn.proj                  blocks.i.attn.proj          .T
  blocks.i.mlp.fc1 / fc2              blocks.i.mlp.fc1 / fc2      .T
  blocks.i.adaLN_modulation.1         blocks.i.adaln              .T
  final_layer.adaLN_modulation.1      final.adaln                 .T
  final_layer.linear [ppC',D]         final.linear                learn-sigma half dropped,
                                                                  sign flipped for TREAD
  pos_embed [1,N,D]                   (fixed, not a parameter)    checked against ours

Conventions:
- SiT (willisma/SiT): flow matching with t = 0 noise like sgjax, t fed unscaled
  (time_scale 1); 2C output channels (learn_sigma), of which `forward` keeps the first C.
- TREAD (CompVis/tread `dit.py`, trained with its `rf.py`): t = 1 noise, v = noise - data.
  sgjax's t is 1 - t_tread and its velocity -v_tread: the flip is folded into the first time
  layer (see `_flip_time`) and the sign into the final layer, both exact. TREAD's train.py
  wraps the network in EDM's preconditioning (`EDMPrecond`, keys prefixed `model.`): that
  denoiser takes log(sigma)/4 and scaled inputs, which no weight transform turns into a flow
  velocity, so such checkpoints are refused.
- DiT (facebookresearch/DiT): DDPM epsilon prediction at integer timesteps, 999 = noise.
  Imported as an initialisation for flow-matching finetuning, not as a sampler: sgjax's
  t maps to DiT's timestep 1000 * (1 - t) (time_scale 1000, flip folded in) and the output
  is DiT's epsilon (learn-sigma half dropped), which is not a velocity.

The imported model's dense forward equals the reference's `forward` under these conversions
(tests/test_import_torch.py, against fixtures written by the references' own code).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from sgjax.models import dit

ARCHS = ("sit", "tread", "dit")
# Prefixes that wrappers add without changing the network: DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclasses.dataclass(frozen=True)
class Convention:
  """How a family's network reads time and what its output means, relative to sgjax."""

  time_scale: float  # the network sees t_ref = time_scale * t (no flip) or * (1 - t)
  flip_time: bool  # the family's t runs from data to noise
  negate_output: bool  # its output is -(sgjax's velocity)


CONVENTIONS = {
    "sit": Convention(time_scale=1.0, flip_time=False, negate_output=False),
    "tread": Convention(time_scale=1.0, flip_time=True, negate_output=True),
    "dit": Convention(time_scale=1000.0, flip_time=True, negate_output=False),
}

# Where each family's training script keeps its (raw weights, EMA weights).
_CHECKPOINT_KEYS = (("model", "ema"),  # SiT and DiT train.py
                    ("model_state_dict", "ema_state_dict"))  # TREAD train.py


def check_arch(arch: str) -> Convention:
  if arch not in CONVENTIONS:
    raise ValueError(f"--arch={arch!r}: choose one of {ARCHS} (sit: willisma/SiT, tread:"
                     " CompVis/tread with rf.py, dit: facebookresearch/DiT).")
  return CONVENTIONS[arch]


def select_weights(checkpoint: Any, ema: bool = True) -> tuple[dict[str, np.ndarray], str]:
  """The state dict inside a loaded checkpoint -> (weights by torch key, where it came from).

  Accepts a plain state dict (the official releases) or a training checkpoint of SiT / DiT
  ({"model", "ema", "opt", "args"}) or TREAD ({"model_state_dict", "ema_state_dict", ...});
  `ema` picks the EMA weights of a training checkpoint, else its raw weights.
  """
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"the checkpoint holds a {type(checkpoint).__name__}, not a state dict.")
  where = "the state dict"
  for raw_key, ema_key in _CHECKPOINT_KEYS:
    if raw_key in checkpoint or ema_key in checkpoint:
      key = ema_key if ema else raw_key
      if key not in checkpoint:
        raise ValueError(f"the training checkpoint has no {key!r} entry (it has"
                         f" {sorted(checkpoint)}); import the other weights with"
                         f" --{'no' if ema else ''}ema.")
      checkpoint, where = checkpoint[key], f"the checkpoint's {key!r} weights"
      break
  weights = {}
  for name, value in checkpoint.items():
    if not isinstance(value, np.ndarray):
      raise ValueError(f"{where}: entry {name!r} is a {type(value).__name__}, not a tensor;"
                       " expected a state dict of a SiT / TREAD / DiT model.")
    for prefix in _WRAPPER_PREFIXES:
      name = name.removeprefix(prefix)
    weights[name] = value
  if weights and all(name.startswith("model.") for name in weights):
    raise ValueError(
        f"{where}: every key starts with 'model.': an EDM-preconditioned network (TREAD's"
        " train.py wraps it in EDMPrecond). Its denoiser takes log(sigma)/4 and scaled"
        " inputs, which sgjax's flow-matching model cannot represent; only networks trained"
        " as rectified flows (TREAD's rf.py, SiT) or DiT's DDPM models import.")
  return weights, where


def check_training_args(checkpoint: Any) -> None:
  """Refuses a SiT training checkpoint whose `args` name another interpolant or target.

  SiT's train.py records `path_type` (Linear | GVP | VP) and `prediction` (velocity | score |
  noise); only Linear + velocity is sgjax's flow matching. Files without `args` (the official
  release, DiT, TREAD) pass.
  """
  args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
  settings = {name: getattr(args, name) for name in ("path_type", "prediction")
              if hasattr(args, name)}
  if settings and settings != {"path_type": "Linear", "prediction": "velocity"}:
    raise ValueError(f"the checkpoint was trained with {settings} (its args); sgjax imports"
                     " SiT's linear path with velocity prediction only.")


def architecture(weights: Mapping[str, np.ndarray]) -> dict[str, int]:
  """The shape fields a state dict fixes: width, patch_size, in_channels, input_size, depth,
  mlp hidden width and output channels (classes: `add_null_class`)."""
  needed = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
            "blocks.0.mlp.fc1.weight", "final_layer.linear.weight")
  missing = [name for name in needed if name not in weights]
  if missing:
    raise ValueError(f"the state dict lacks {missing}: not a SiT / TREAD / DiT model (or a"
                     " class-unconditional one, which sgjax does not import).")
  if weights["x_embedder.proj.weight"].ndim != 4:
    raise ValueError(f"x_embedder.proj.weight has shape"
                     f" {weights['x_embedder.proj.weight'].shape}; expected the patch"
                     " convolution's [width, channels, patch, patch].")
  width, in_channels, patch, _ = weights["x_embedder.proj.weight"].shape
  num_tokens = weights["pos_embed"].shape[-2]
  grid = int(round(num_tokens**0.5))
  depth = 1 + max(int(m.group(1)) for name in weights
                  if (m := re.match(r"blocks\.(\d+)\.", name)))
  return dict(width=width, patch_size=patch, in_channels=in_channels, input_size=grid * patch,
              depth=depth, mlp_hidden=weights["blocks.0.mlp.fc1.weight"].shape[0],
              out_channels=weights["final_layer.linear.weight"].shape[0] // patch**2)


def add_null_class(weights: dict[str, np.ndarray], num_classes: int | None) -> tuple[int, bool]:
  """(num_classes, whether a null row was added) for the class table of `weights`.

  SiT and DiT give the table a "null" row (label `num_classes`, CFG's unconditional class)
  only when trained with label dropout. `num_classes=None` assumes they were (rows - 1
  classes); with `num_classes` equal to the rows, a zero null row is appended (in place), so
  the model can be finetuned with label dropout before it guides.
  """
  name = "y_embedder.embedding_table.weight"
  rows = weights[name].shape[0]
  if num_classes is None or num_classes == rows - 1:
    return rows - 1, False
  if num_classes != rows:
    raise ValueError(f"--num_classes={num_classes}, but {name} has {rows} rows: expected"
                     f" {num_classes} (no null class) or {num_classes + 1} (with one).")
  weights[name] = np.concatenate([weights[name], np.zeros_like(weights[name][:1])])
  return num_classes, True


def check_fits(weights: Mapping[str, np.ndarray], cfg: dit.DiTConfig, model: str) -> None:
  """Raises ValueError naming the tensor and shape where `cfg` (from --model) does not fit."""
  arch = architecture(weights)
  checks = (("width", cfg.width, "x_embedder.proj.weight"),
            ("patch_size", cfg.patch_size, "x_embedder.proj.weight"))
  for (name, value, tensor), found in zip(checks, (arch["width"], arch["patch_size"])):
    if found != value:
      raise ValueError(f"--model={model} has {name} {value}, but the checkpoint's {tensor} is"
                       f" {tuple(weights[tensor].shape)} ({name} {found}); pick the --model"
                       " it was trained as.")
  if arch["depth"] != cfg.depth:
    raise ValueError(f"--model={model} has depth {cfg.depth}, but the checkpoint holds"
                     f" blocks.0 to blocks.{arch['depth'] - 1}; pick the --model it was"
                     " trained as.")
  if arch["out_channels"] not in (cfg.in_channels, 2 * cfg.in_channels):
    shape = tuple(weights["final_layer.linear.weight"].shape)
    raise ValueError(f"final_layer.linear.weight {shape} gives {arch['out_channels']} output"
                     f" channels for {cfg.in_channels} input channels; expected the same"
                     " number or twice it (learn_sigma).")


def _t(weight: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(weight.T)


def _flip_time(kernel: np.ndarray, scale: float) -> np.ndarray:
  """Folds t_ref = scale * (1 - t) into the first time layer, which the reference feeds
  [cos(w * t_ref), sin(w * t_ref)] and sgjax [cos(b), sin(b)] with b = w * scale * t.

  With a = w * scale: cos(a - b) = cos a cos b + sin a sin b and sin(a - b) = sin a cos b -
  cos a sin b, so the layer's rows for cos b and sin b are exact mixes of its rows.
  """
  freqs = np.asarray(dit.time_frequencies(kernel.shape[0]), np.float64)
  a = (freqs * scale)[:, None]
  rows_cos, rows_sin = np.split(kernel.astype(np.float64), 2)
  return np.concatenate([np.cos(a) * rows_cos + np.sin(a) * rows_sin,
                         np.sin(a) * rows_cos - np.cos(a) * rows_sin]).astype(np.float32)


def convert(weights: Mapping[str, np.ndarray], cfg: dit.DiTConfig,
            arch: str) -> dict[str, Any]:
  """A state dict -> sgjax's parameter tree (`nnx.to_pure_dict` layout) for `cfg`.

  Raises ValueError listing unexpected and missing keys, or naming a tensor whose shape
  differs, or a position embedding other than the 2D sin-cos one sgjax uses.
  """
  convention = check_arch(arch)
  if cfg.sparsity == "masking":
    raise ValueError("masking models have a MaskDiT decoder that SiT / TREAD / DiT"
                     " checkpoints do not hold; import with sparsity dense or routing.")
  used: set[str] = set()
  missing: list[str] = []

  def get(name: str) -> np.ndarray:
    if name not in weights:
      missing.append(name)
      return np.zeros((0,), np.float32)
    used.add(name)
    return np.asarray(weights[name], np.float32)

  def linear(prefix: str) -> dict[str, np.ndarray]:
    return {"kernel": _t(get(prefix + ".weight")), "bias": get(prefix + ".bias")}

  p, c = cfg.patch_size, cfg.in_channels
  conv = get("x_embedder.proj.weight")
  params: dict[str, Any] = {
      "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0])
                      if conv.ndim == 4 else conv,
                      "bias": get("x_embedder.proj.bias")},
      "t_mlp1": linear("t_embedder.mlp.0"),
      "t_mlp2": linear("t_embedder.mlp.2"),
      "y_embed": {"embedding": get("y_embedder.embedding_table.weight")},
  }
  if convention.flip_time and params["t_mlp1"]["kernel"].size:
    params["t_mlp1"]["kernel"] = _flip_time(params["t_mlp1"]["kernel"], convention.time_scale)
  blocks = {}
  for i in range(cfg.depth):
    qkv, qkv_bias = get(f"blocks.{i}.attn.qkv.weight"), get(f"blocks.{i}.attn.qkv.bias")
    attn = {"proj": linear(f"blocks.{i}.attn.proj")}
    if qkv.shape[0] % 3 == 0 and qkv_bias.shape[0] % 3 == 0:  # rows [q | k | v]
      for name, w, b in zip("qkv", np.split(qkv, 3), np.split(qkv_bias, 3)):
        attn[name] = {"kernel": _t(w), "bias": b}
    blocks[i] = {"attn": attn, "adaln": linear(f"blocks.{i}.adaLN_modulation.1"),
                 "mlp": {"fc1": linear(f"blocks.{i}.mlp.fc1"),
                         "fc2": linear(f"blocks.{i}.mlp.fc2")}}
  params["blocks"] = blocks
  final = get("final_layer.linear.weight")
  final_bias = get("final_layer.linear.bias")
  out_channels = final.shape[0] // (p * p)
  if final.size and out_channels == 2 * c:  # rows (p, q, channel); keep the first C channels
    final = final.reshape(p, p, 2 * c, -1)[:, :, :c].reshape(p * p * c, -1)
    final_bias = final_bias.reshape(p, p, 2 * c)[:, :, :c].reshape(-1)
  sign = -1.0 if convention.negate_output else 1.0
  params["final"] = {"adaln": linear("final_layer.adaLN_modulation.1"),
                     "linear": {"kernel": _t(sign * final), "bias": sign * final_bias}}
  pos = get("pos_embed")

  # Wrappers' extra buffers aside, every key must be used, and every needed key present.
  unexpected = sorted(set(weights) - used)
  if unexpected or missing:
    raise ValueError(
        "the state dict does not match sgjax's DiT with"
        f" depth {cfg.depth}:\n  unexpected keys: {unexpected or 'none'}\n  missing keys:"
        f" {sorted(missing) or 'none'}")
  _check_positions(pos, cfg)
  _check_shapes(params, cfg)
  return params


def _check_positions(pos: np.ndarray, cfg: dit.DiTConfig) -> None:
  ours = dit.sincos_pos_embed(cfg.width, cfg.grid_size)
  if pos.reshape(-1, pos.shape[-1]).shape != ours.shape:
    raise ValueError(f"pos_embed {tuple(pos.shape)} does not fit {cfg.num_tokens} tokens of"
                     f" width {cfg.width}.")
  error = float(np.max(np.abs(pos.reshape(ours.shape) - ours)))
  if error > 1e-5:
    raise ValueError(f"pos_embed differs from sgjax's fixed 2D sin-cos embedding by up to"
                     f" {error:.3g}: the checkpoint uses another position embedding.")


def _check_shapes(params: dict, cfg: dit.DiTConfig) -> None:
  """Compares every converted tensor with the parameter it becomes."""
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: dit.DiT(cfg, rngs=nnx.Rngs(0))), nnx.Param))
  expected = {jax.tree_util.keystr(k): v.shape
              for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  got = {jax.tree_util.keystr(k): v.shape
         for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  if set(expected) != set(got):
    raise ValueError(f"converted parameters {sorted(set(got) ^ set(expected))} do not match"
                     " the model's tree.")
  for name, shape in expected.items():
    if tuple(got[name]) != tuple(shape):
      raise ValueError(f"parameter {name}: the checkpoint gives shape {tuple(got[name])}, the"
                       f" model expects {tuple(shape)}; check --model.")
