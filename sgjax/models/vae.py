"""Stable Diffusion's VAE (diffusers' `AutoencoderKL`, as in `stabilityai/sd-vae-ft-ema` and
`-mse`) in Flax NNX: NHWC, images in [-1, 1], latents unscaled (multiply by
`config.scaling_factor`, 0.18215 for SD-VAE, before diffusion).

    model = vae.load("/models/sd-vae-ft-ema")       # config.json + *.safetensors, no torch
    mean, std = model.encode(images)                 # the diagonal Gaussian posterior
    images = model.decode(mean + std * noise)

Architecture (diffusers' names, which the parameters keep so that the key map is a rename):
encoder = conv_in, down_blocks (ResNet blocks, then a stride-2 conv except in the last),
mid_block (ResNet, single-head self-attention, ResNet), GroupNorm, SiLU, conv_out to 2 x
latent channels, then quant_conv; the posterior's log-variance is clamped to [-30, 20].
decoder = post_quant_conv, conv_in, mid_block, up_blocks (one more ResNet block each, then
nearest 2x upsampling and a conv except in the last), GroupNorm, SiLU, conv_out. GroupNorms
have eps 1e-6 and run in float32; convolutions and attention run in `dtype`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgjax import paths, sharding

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# diffusers' config keys, with the only values this implementation supports.
_FIXED = {"act_fn": "silu", "mid_block_add_attention": True, "use_quant_conv": True,
          "use_post_quant_conv": True, "shift_factor": None, "latents_mean": None,
          "latents_std": None}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of a diffusers `AutoencoderKL` config.json that shape the network."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  dtype: str = "float32"  # compute dtype; parameters and GroupNorm statistics are float32

  @property
  def downsample_factor(self) -> int:
    """Image size / latent size."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], dtype: str = "float32") -> "VAEConfig":
    """A diffusers config.json (dict) -> VAEConfig; refuses variants this port lacks."""
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise ValueError(f"{CONFIG_FILE}: _class_name={name!r}; sgjax implements AutoencoderKL.")
    for key, value in _FIXED.items():
      if config.get(key, value) != value:
        raise ValueError(f"{CONFIG_FILE}: {key}={config[key]!r} is not supported (SD-VAE has"
                         f" {value!r}).")
    for key, kind in (("down_block_types", "DownEncoderBlock2D"),
                      ("up_block_types", "UpDecoderBlock2D")):
      if any(block != kind for block in config.get(key, ())):
        raise ValueError(f"{CONFIG_FILE}: {key}={config[key]!r}; only {kind} is supported.")
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()
              if k in fields}
    return cls(**values, dtype=dtype).validate()

  def validate(self) -> "VAEConfig":
    for channels in self.block_out_channels:
      if channels % self.norm_num_groups:
        raise ValueError(f"norm_num_groups={self.norm_num_groups} does not divide the block"
                         f" width {channels}.")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"vae dtype={self.dtype!r}: choose float32 or bfloat16.")
    return self


def _conv(d_in: int, d_out: int, kernel: int, rngs: nnx.Rngs, dtype, stride: int = 1,
          padding: str | int = "SAME") -> nnx.Conv:
  return nnx.Conv(d_in, d_out, (kernel, kernel), strides=stride, padding=padding, dtype=dtype,
                  rngs=rngs)


def _group_norm(channels: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-6, dtype=jnp.float32, rngs=rngs)


class ResnetBlock(nnx.Module):
  """GroupNorm, SiLU, 3x3 conv, twice, plus the input (a 1x1 conv when widths differ)."""

  def __init__(self, d_in: int, d_out: int, groups: int, dtype, *, rngs: nnx.Rngs):
    self.norm1 = _group_norm(d_in, groups, rngs)
    self.conv1 = _conv(d_in, d_out, 3, rngs, dtype)
    self.norm2 = _group_norm(d_out, groups, rngs)
    self.conv2 = _conv(d_out, d_out, 3, rngs, dtype)
    self.conv_shortcut = _conv(d_in, d_out, 1, rngs, dtype) if d_in != d_out else None

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C_in] -> [B, H, W, C_out]
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return (skip + h).astype(jnp.float32)


class Attention(nnx.Module):
  """Single-head self-attention over all positions, after a GroupNorm, with a residual."""

  def __init__(self, channels: int, groups: int, dtype, *, rngs: nnx.Rngs):
    self.group_norm = _group_norm(channels, groups, rngs)
    linear = lambda: nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
    self.to_q, self.to_k, self.to_v = linear(), linear(), linear()
    self.to_out = nnx.List([linear()])

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> same
    b, h, w, c = x.shape
    y = self.group_norm(x).reshape(b, h * w, 1, c)
    y = jax.nn.dot_product_attention(self.to_q(y), self.to_k(y), self.to_v(y))
    return (x + self.to_out[0](y.reshape(b, h, w, c))).astype(jnp.float32)


class MidBlock(nnx.Module):

  def __init__(self, channels: int, groups: int, dtype, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, dtype, rngs=rngs)
                             for _ in range(2)])
    self.attentions = nnx.List([Attention(channels, groups, dtype, rngs=rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nnx.Module):
  """Stride-2 3x3 conv after padding one row and column at the bottom and right."""

  def __init__(self, channels: int, dtype, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, rngs, dtype, stride=2, padding="VALID")

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour 2x, then a 3x3 conv."""

  def __init__(self, channels: int, dtype, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, rngs, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Stage(nnx.Module):
  """ResNet blocks, then optionally a resampling layer (diffusers' Down/UpEncoderBlock2D)."""

  def __init__(self, d_in: int, d_out: int, num_resnets: int, resample, groups: int, dtype, *,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(d_in if i == 0 else d_out, d_out, groups, dtype,
                                         rngs=rngs) for i in range(num_resnets)])
    # diffusers' names: `downsamplers` in the encoder, `upsamplers` in the decoder.
    self.resample_name = "downsamplers" if resample is Downsample else "upsamplers"
    setattr(self, self.resample_name,
            nnx.List([resample(d_out, dtype, rngs=rngs)] if resample else []))

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    for layer in getattr(self, self.resample_name):
      x = layer(x)
    return x


class Encoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, dtype, *, rngs: nnx.Rngs):
    widths, groups = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = _conv(cfg.in_channels, widths[0], 3, rngs, dtype)
    self.down_blocks = nnx.List([
        Stage(widths[max(i - 1, 0)], width, cfg.layers_per_block,
              Downsample if i < len(widths) - 1 else None, groups, dtype, rngs=rngs)
        for i, width in enumerate(widths)])
    self.mid_block = MidBlock(widths[-1], groups, dtype, rngs=rngs)
    self.conv_norm_out = _group_norm(widths[-1], groups, rngs)
    self.conv_out = _conv(widths[-1], 2 * cfg.latent_channels, 3, rngs, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for stage in self.down_blocks:
      x = stage(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, dtype, *, rngs: nnx.Rngs):
    widths, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
    self.conv_in = _conv(cfg.latent_channels, widths[0], 3, rngs, dtype)
    self.mid_block = MidBlock(widths[0], groups, dtype, rngs=rngs)
    self.up_blocks = nnx.List([
        Stage(widths[max(i - 1, 0)], width, cfg.layers_per_block + 1,
              Upsample if i < len(widths) - 1 else None, groups, dtype, rngs=rngs)
        for i, width in enumerate(widths)])
    self.conv_norm_out = _group_norm(widths[-1], groups, rngs)
    self.conv_out = _conv(widths[-1], cfg.out_channels, 3, rngs, dtype)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for stage in self.up_blocks:
      x = stage(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """images [B, H, W, 3] in [-1, 1] <-> latents [B, H / f, W / f, latent_channels]."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    self.encoder = Encoder(cfg, dtype, rngs=rngs)
    self.decoder = Decoder(cfg, dtype, rngs=rngs)
    self.quant_conv = _conv(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1, rngs, dtype)
    self.post_quant_conv = _conv(cfg.latent_channels, cfg.latent_channels, 1, rngs, dtype)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The posterior (mean, std), each [B, H / f, W / f, latent_channels] float32."""
    moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

  def decode(self, latents: jax.Array) -> jax.Array:
    """Unscaled latents -> images [B, H, W, out_channels] float32 (about [-1, 1])."""
    return self.decoder(self.post_quant_conv(latents)).astype(jnp.float32)


def batch_codec(model: AutoencoderKL, mesh: jax.sharding.Mesh):
  """(encode, decode): `model.encode` / `model.decode` jitted with the parameters replicated
  and the batch split over the mesh's data axes (its size must divide the batch)."""
  graphdef, state = nnx.split(model)
  batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  state = jax.device_put(state, replicated)

  def jitted(method):
    fn = jax.jit(lambda state, x: getattr(nnx.merge(graphdef, state), method)(x),
                 in_shardings=(replicated, batch), out_shardings=batch)
    return lambda x: fn(state, jax.device_put(jnp.asarray(x, jnp.float32), batch))

  return jitted("encode"), jitted("decode")


# Attention names of older diffusers checkpoints (as some hub folders still hold them).
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _torch_key(path: tuple) -> str:
  """An NNX parameter path -> diffusers' state-dict key."""
  *module, leaf = (str(p) for p in path)
  return ".".join(module + ["bias" if leaf == "bias" else "weight"])


def _to_flax(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A diffusers tensor in the layout of the parameter of `shape` (convs [O, I, kh, kw] ->
  [kh, kw, I, O]; linear [O, I] -> [I, O], also when stored as 1x1 convs)."""
  if len(shape) == 4:
    value = value.transpose(2, 3, 1, 0)
  elif len(shape) == 2:
    value = value.reshape(value.shape[:2]).T
  return np.ascontiguousarray(value, np.float32)


def _rename_legacy(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in weights.items():
    parts = key.split(".")
    if len(parts) > 1 and parts[-2] in _LEGACY_NAMES:
      parts[-2:-1] = _LEGACY_NAMES[parts[-2]].split(".")
    out[".".join(parts)] = value
  return out


def load_weights(model: AutoencoderKL, weights: Mapping[str, np.ndarray], where: str) -> None:
  """Sets every parameter of `model` from a diffusers state dict (numpy arrays).

  Raises ValueError listing unexpected and missing keys, or naming a shape that differs.
  """
  weights = _rename_legacy(weights)
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  expected = {_torch_key(path): path for path in flat}
  missing = sorted(set(expected) - set(weights))
  unexpected = sorted(set(weights) - set(expected))
  if missing or unexpected:
    raise ValueError(f"{where} does not match the VAE of its config.json:\n  unexpected keys:"
                     f" {unexpected or 'none'}\n  missing keys: {missing or 'none'}")
  for key, path in expected.items():
    shape = flat[path].shape
    value = _to_flax(np.asarray(weights[key]), shape)
    if value.shape != shape:
      raise ValueError(f"{where}: {key} has shape {tuple(weights[key].shape)}, which does not"
                       f" fit the parameter of shape {shape}.")
    flat[path][...] = value
  nnx.update(model, nnx.from_flat_state(flat))


def _check_folder(directory: str, names: tuple[str, ...]) -> None:
  for name in names:
    if not paths.resolve(directory).joinpath(name).is_file():
      raise FileNotFoundError(f"VAE folder {directory!r} has no {name}: expected a diffusers"
                              f" AutoencoderKL folder ({CONFIG_FILE} and {WEIGHTS_FILE}, e.g."
                              " stabilityai/sd-vae-ft-ema).")


def read_config(directory: str, dtype: str = "float32") -> VAEConfig:
  """The VAEConfig of a diffusers-format folder, without reading its weights."""
  _check_folder(directory, (CONFIG_FILE,))
  return VAEConfig.from_diffusers(paths.read_json(paths.join(directory, CONFIG_FILE)), dtype)


def load(directory: str, dtype: str = "float32") -> AutoencoderKL:
  """A diffusers-format VAE folder (config.json + diffusion_pytorch_model.safetensors)."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  _check_folder(directory, (CONFIG_FILE, WEIGHTS_FILE))
  weights_path = paths.join(directory, WEIGHTS_FILE)
  cfg = read_config(directory, dtype)
  model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(model)
  model = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract))
  load_weights(model, safetensors_numpy.load(paths.resolve(weights_path).read_bytes()),
               weights_path)
  return model
