"""Inception-v3 of TensorFlow's 2015-12-05 graph: the feature network of FID, sFID, IS, P/R.

Every published ImageNet FID (the ADM suite the paper reports with, pytorch-fid) uses this
particular network, not torchvision's Inception-v3: it differs in weights, has 1008 logits,
averages without counting padding in its pooling branches, and max-pools in the last block
(pytorch-fid's FIDInceptionA/C/E_1/E_2 patches). Parameter names mirror torchvision's, so
pytorch-fid's state dict maps onto the modules one to one.

Outputs, as the ADM evaluator reads them from the TF graph:
- `pool`:    pool_3, the 2048 averaged Mixed_7c features (FID, precision/recall);
- `spatial`: mixed_6/conv, the ReLU output of Mixed_6d's 1x1 branch, [17, 17, 192] at 299
             pixels, of which ADM keeps the first 7 channels, flattened in (h, w, c) order
             -> 2023 (sFID);
- `logits`:  pool_3 @ W for the 1008-way softmax (IS). ADM takes only the graph's
             `softmax/logits/MatMul`, i.e. *without* the bias `fc.bias`; we do the same.

Input handling follows pytorch-fid (the weights' source): images in [0, 255] of any size are
scaled to [0, 1], resized to 299x299 bilinearly as `F.interpolate(..., align_corners=False)`
does (half-pixel centres, no antialiasing), then mapped to [-1, 1]. The TF graph that ADM
runs resizes with TF1's legacy kernel (no half-pixel centres) and normalises with
(x - 128) / 128, so numbers can differ slightly from ADM's own evaluator (unmeasured here:
no TensorFlow); for 256x256 inputs both downsample without antialiasing.

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, read without torch
(`sgjax.torch_state`), or the .npz written once by
`python -m sgjax.metrics.inception --convert=IN.pth --out=OUT.npz`.
"""

from __future__ import annotations

import functools
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgjax import torch_state
from sgjax.metrics import cache_dir

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_NAME)
WEIGHTS_ENV = "SGJAX_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
NUM_LOGITS = 1008
# Tensors in pytorch-fid's file that the features do not use.
_UNUSED_TENSORS = ("fc.bias",)
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 on GPUs: features must match the reference


def weights_path(path: str | None = None) -> str:
  """The Inception weights file: `path`, else $SGJAX_INCEPTION_WEIGHTS, else the cache dir.

  Raises FileNotFoundError saying which file to get and where to put it.
  """
  default = os.path.join(cache_dir(), WEIGHTS_NAME)
  chosen = path or os.environ.get(WEIGHTS_ENV) or default
  if os.path.isfile(chosen):
    return chosen
  raise FileNotFoundError(
      f"Inception weights not found at {chosen!r}. FID/sFID/IS/precision/recall need"
      f" pytorch-fid's port of TensorFlow's 2015-12-05 Inception graph, {WEIGHTS_NAME},"
      f" published at {WEIGHTS_URL}. Download it (no torch needed) and either put it at"
      f" {default}, pass --inception_weights=PATH, or set {WEIGHTS_ENV}=PATH. Optionally"
      " convert it once to .npz: python -m sgjax.metrics.inception --convert=PATH"
      " --out=inception.npz")


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
  """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3 as in the TF graph) -> ReLU."""

  def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int],
               stride: int = 1, padding: int | tuple[int, int] = 0, *, rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(in_channels, out_channels, _pair(kernel), _pair(stride),
                         padding=((ph, ph), (pw, pw)), use_bias=False, precision=_HIGHEST,
                         rngs=rngs)
    self.bn = nnx.BatchNorm(out_channels, use_running_average=True, epsilon=1e-3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def _max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
  pad = ((padding, padding),) * 2
  return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)


def _avg_pool(x: jax.Array) -> jax.Array:
  # TF's average pool ignores the zero padding (pytorch-fid: count_include_pad=False).
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=False)


class InceptionA(nnx.Module):  # Mixed_5b..5d, 35x35

  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], -1)


class InceptionB(nnx.Module):  # Mixed_6a, 35x35 -> 17x17

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, _max_pool(x, 2)], -1)


class InceptionC(nnx.Module):  # Mixed_6b..6e, 17x17, factorised 7x7

  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    return jnp.concatenate([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool(x))], -1)


class InceptionD(nnx.Module):  # Mixed_7a, 17x17 -> 8x8

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], -1)


class InceptionE(nnx.Module):  # Mixed_7b, 7c, 8x8, expanded filter bank

  def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
    self.pool = pool  # "avg" (Mixed_7b) or "max" (Mixed_7c, a quirk of the TF graph)
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], -1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], -1)
    pooled = _avg_pool(x) if self.pool == "avg" else _max_pool(x, 1, padding=1)
    return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], -1)


@functools.lru_cache(maxsize=None)
def resize_matrix(in_size: int, out_size: int = INPUT_SIZE) -> np.ndarray:
  """[out, in] weights of 1D bilinear resizing as torch's align_corners=False computes it."""
  src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  src = np.maximum(src, 0.0)  # torch clamps negative source coordinates to the first pixel
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m.astype(np.float32)


def preprocess(images: jax.Array) -> jax.Array:
  """[B, H, W, 3] in [0, 255] (uint8 or float) -> [B, 299, 299, 3] in [-1, 1]."""
  x = images.astype(jnp.float32) / 255.0
  _, h, w, _ = x.shape
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    # Bilinear resizing is separable: two small matmuls, exact to torch's weights.
    x = jnp.einsum("oh,bhwc->bowc", resize_matrix(h), x, precision=_HIGHEST)
    x = jnp.einsum("pw,bowc->bopc", resize_matrix(w), x, precision=_HIGHEST)
  return 2.0 * x - 1.0


class InceptionV3(nnx.Module):
  """The FID Inception; attribute names are pytorch-fid's (torchvision's) module names."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
    self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
    self.fc = nnx.Linear(POOL_DIM, NUM_LOGITS, use_bias=False, precision=_HIGHEST, rngs=rngs)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """images: [B, H, W, 3] in [0, 255] -> {pool: [B, 2048], spatial: [B, 2023],
    logits: [B, 1008]}."""
    x = preprocess(images)  # [B, 299, 299, 3]
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool(x, 2)  # 73x73
    x = _max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2)  # 35x35
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c):
      x = block(x)
    # mixed_6/conv: XLA merges this with the same conv inside Mixed_6d.
    spatial = self.Mixed_6d.branch1x1(x)[..., :SPATIAL_CHANNELS]
    for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)
    pool = jnp.mean(x, axis=(1, 2))  # pool_3
    return {"pool": pool, "spatial": spatial.reshape(spatial.shape[0], -1),
            "logits": self.fc(pool)}


# -- weights ------------------------------------------------------------------------------

def _torch_tensors(model: InceptionV3) -> dict[str, tuple[nnx.Variable, tuple[int, ...]]]:
  """torch state-dict name -> (our variable, the tensor's shape in torch's layout)."""
  out = {}
  for path, module in nnx.iter_modules(model):
    prefix = ".".join(str(p) for p in path)
    if isinstance(module, nnx.Conv):
      kh, kw, cin, cout = module.kernel.shape
      out[f"{prefix}.weight"] = (module.kernel, (cout, cin, kh, kw))
    elif isinstance(module, nnx.BatchNorm):
      for name, var in (("weight", module.scale), ("bias", module.bias),
                        ("running_mean", module.mean), ("running_var", module.var)):
        out[f"{prefix}.{name}"] = (var, var.shape)
    elif isinstance(module, nnx.Linear):
      din, dout = module.kernel.shape
      out[f"{prefix}.weight"] = (module.kernel, (dout, din))
  return out


@functools.lru_cache(maxsize=1)
def _abstract_split():
  return nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))))


def _abstract_model() -> InceptionV3:
  """A fresh InceptionV3 holding shapes only (tracing the constructor once per process)."""
  return nnx.merge(*_abstract_split(), copy=True)


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """Every tensor the network needs from pytorch-fid's state dict, with its torch shape."""
  return {name: shape for name, (_, shape) in _torch_tensors(_abstract_model()).items()}


def load_state_dict(model: InceptionV3, state: Mapping[str, np.ndarray],
                    source: str = "state dict") -> InceptionV3:
  """Copies pytorch-fid's tensors into `model` (in place), checking names and shapes."""
  expected = _torch_tensors(model)
  for name, (var, shape) in expected.items():
    if name not in state:
      raise KeyError(f"{source}: tensor {name!r} (shape {shape}) is missing; is this"
                     f" pytorch-fid's FID Inception ({WEIGHTS_NAME})?")
    value = np.asarray(state[name])
    if value.shape != shape:
      raise ValueError(f"{source}: tensor {name!r} has shape {value.shape}, expected {shape}.")
    if value.ndim == 4:  # conv: torch [out, in, kh, kw] -> ours [kh, kw, in, out]
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:  # linear: torch [out, in] -> ours [in, out]
      value = value.T
    var.set_value(jnp.asarray(value, jnp.float32))
  unexpected = sorted(k for k in state if k not in expected and k not in _UNUSED_TENSORS
                      and not k.endswith("num_batches_tracked"))
  if unexpected:
    raise ValueError(f"{source}: unexpected tensors {unexpected[:5]}"
                     f"{' ...' if len(unexpected) > 5 else ''}; is this pytorch-fid's FID"
                     f" Inception ({WEIGHTS_NAME}) and not torchvision's?")
  return model


def read_weights(path: str) -> dict[str, np.ndarray]:
  """A .npz (from --convert) or a torch file -> {torch tensor name: array}."""
  if path.endswith(".npz"):
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  state = torch_state.load(path)
  if not isinstance(state, Mapping):
    raise ValueError(f"{path}: expected a state dict (a mapping of tensors), got"
                     f" {type(state).__name__}.")
  return dict(state)


def from_state_dict(state: Mapping[str, np.ndarray], source: str = "state dict") -> InceptionV3:
  """The FID Inception holding pytorch-fid's tensors `state` (see load_state_dict)."""
  # Abstract init, then every variable is overwritten: random init of 471 tensors would
  # cost far more than loading them.
  return load_state_dict(_abstract_model(), state, source)


def load(path: str | None = None) -> InceptionV3:
  """The FID Inception with weights from `path` / $SGJAX_INCEPTION_WEIGHTS (see weights_path)."""
  path = weights_path(path)
  return from_state_dict(read_weights(path), source=path)


def convert(torch_path: str, out_path: str) -> None:
  """Writes the tensors of a torch state dict to .npz (checked against the network first)."""
  state = read_weights(torch_path)
  from_state_dict(state, source=torch_path)
  np.savez(out_path, **{k: np.asarray(v) for k, v in state.items()})


def _main(argv) -> None:
  del argv
  if not (FLAGS.convert and FLAGS.out):
    raise app.UsageError("usage: python -m sgjax.metrics.inception --convert=IN.pth"
                         " --out=OUT.npz")
  convert(FLAGS.convert, FLAGS.out)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("convert", None, "pytorch-fid's Inception state dict (.pth) to read.")
  flags.DEFINE_string("out", None, ".npz file to write.")
  FLAGS = flags.FLAGS
  from sgjax import cli  # pylint: disable=g-import-not-at-top
  cli.run(_main)
