"""FID / sFID / IS / precision-recall, the FID Inception and the torch-file reader.

Inception weights are random (the real file is not available to tests), so these check
shapes, layouts, plumbing and error messages, and the blocks against an independent numpy
implementation; the metric maths is checked against numpy/scipy brute force and closed forms.
"""

import collections
import json
import os
import pickle
import subprocess
import sys
import types
import zipfile

import chex
import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
from flax import nnx

from sgjax import torch_state
from sgjax.metrics import adm, features, inception, npz
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state_dict():
  return helpers.random_inception_weights()


@pytest.fixture(scope="module")
def model(state_dict):
  return inception.from_state_dict(state_dict)


@pytest.fixture(scope="module")
def sample_images():
  return np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def sample_features(model, sample_images):
  """Features of the small images (resized inside) through the sharded extractor: 8 fake
  devices, the batch padded from 6 to 8."""
  apply, params = features.nnx_apply(model)
  return features.extract(apply, params, sample_images, batch_size=8)


@pytest.fixture
def fake_torch(monkeypatch):
  """Just enough of a `torch` module for pickle to write the globals torch.save writes."""
  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):  # only its name is pickled
    raise AssertionError(args)

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch._utils = utils
  for name in ("FloatStorage", "HalfStorage", "LongStorage"):
    setattr(torch, name, type(name, (), {"__module__": "torch"}))
  monkeypatch.setitem(sys.modules, "torch", torch)
  monkeypatch.setitem(sys.modules, "torch._utils", utils)
  return torch


_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
                  np.dtype(np.int64): "LongStorage"}


class _Storage:

  def __init__(self, key: str, flat: np.ndarray):
    self.key, self.flat = key, flat


class _Tensor:
  """Pickles as torch does: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride))

  def __reduce__(self):
    rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
    return rebuild, self.args + (False, collections.OrderedDict())


def _tensors_for(arrays: dict[str, np.ndarray]):
  """Contiguous tensors, one storage each -> (pickled object, storages)."""
  storages, obj = {}, collections.OrderedDict()
  for i, (name, a) in enumerate(arrays.items()):
    storages[str(i)] = _Storage(str(i), np.ascontiguousarray(a).reshape(-1))
    stride = tuple(int(s // a.itemsize) for s in np.ascontiguousarray(a).strides)
    obj[name] = _Tensor(storages[str(i)], 0, a.shape, stride)
  return obj, storages


def _pickler(f, legacy: bool):
  torch = sys.modules["torch"]

  class Pickler(pickle.Pickler):

    def persistent_id(self, obj):
      if not isinstance(obj, _Storage):
        return None
      storage_type = getattr(torch, _STORAGE_NAMES[obj.flat.dtype])
      pid = ("storage", storage_type, obj.key, "cpu", obj.flat.size)
      return pid + (None,) if legacy else pid

  return Pickler(f, protocol=2)


def write_torch_zip(path, obj, storages) -> None:
  """The torch >= 1.6 layout: archive/data.pkl + archive/data/<key>."""
  with open(path + ".pkl", "wb") as f:
    _pickler(f, legacy=False).dump(obj)
  with zipfile.ZipFile(path, "w") as zf:
    with open(path + ".pkl", "rb") as f:
      zf.writestr("archive/data.pkl", f.read())
    zf.writestr("archive/byteorder", "little")
    zf.writestr("archive/version", "3\n")
    for key, s in storages.items():
      zf.writestr(f"archive/data/{key}", s.flat.tobytes())


def write_torch_legacy(path, obj, storages) -> None:
  """The pre-1.6 layout: magic, version, sys info, object, keys, then counted storages."""
  with open(path, "wb") as f:
    pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True}, f, protocol=2)
    _pickler(f, legacy=True).dump(obj)
    keys = sorted(storages)
    pickle.dump(keys, f, protocol=2)
    for key in keys:
      f.write(np.int64(storages[key].flat.size).tobytes())
      f.write(storages[key].flat.tobytes())


# -- torch file reader --------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_torch_reader_rebuilds_strided_tensors(fake_torch, tmp_path, layout):
  del fake_torch
  rng = np.random.default_rng(0)
  base = rng.standard_normal(20).astype(np.float32)
  shared = _Storage("0", base)
  obj = collections.OrderedDict(
      matrix=_Tensor(shared, 0, (4, 5), (5, 1)),
      transposed=_Tensor(shared, 0, (5, 4), (1, 5)),  # a non-contiguous view
      tail=_Tensor(shared, 12, (2, 3), (3, 1)),  # storage offset
  )
  more, more_storages = _tensors_for({"half": rng.standard_normal((2, 3)).astype(np.float16),
                                      "long": np.arange(7, dtype=np.int64)})
  storages = {"0": shared, **{f"s{k}": s for k, s in more_storages.items()}}
  for s in more_storages.values():
    s.key = f"s{s.key}"
  obj.update(more)
  path = str(tmp_path / "weights.pth")
  (write_torch_zip if layout == "zip" else write_torch_legacy)(path, obj, storages)

  loaded = torch_state.load(path)
  assert list(loaded) == ["matrix", "transposed", "tail", "half", "long"]
  chex.assert_trees_all_equal(dict(loaded), {  # strict: dtypes and shapes too
      "matrix": base.reshape(4, 5), "transposed": base.reshape(4, 5).T,
      "tail": base[12:18].reshape(2, 3), "half": more["half"].args[0].flat.reshape(2, 3),
      "long": np.arange(7, dtype=np.int64)}, strict=True)


def test_torch_reader_refuses_arbitrary_globals(tmp_path):
  path = str(tmp_path / "evil.pth")
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"x": print}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
    torch_state.load(path)


# -- Inception ------------------------------------------------------------------------------

# An independent float64 numpy FID Inception, block by block, from pytorch-fid's tensors.
# A block is its branches in concatenation order; a branch is a chain of steps, each a
# conv+BN+ReLU unit (name "x/2": stride 2, unpadded; else stride 1, size kept), a tuple of
# units applied to one input and concatenated, or a pool: "avg" 3x3/1 padded by 1 with the
# padding left out of the count (pytorch-fid's count_include_pad=False), "max" 3x3/1 padded
# by 1, "max/2" 3x3/2 unpadded.
_INCEPTION_A = (("branch1x1",), ("branch5x5_1", "branch5x5_2"),
                ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"), ("avg", "branch_pool"))
_INCEPTION_B = (("branch3x3/2",), ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3/2"),
                ("max/2",))
_INCEPTION_C = (("branch1x1",), ("branch7x7_1", "branch7x7_2", "branch7x7_3"),
                tuple(f"branch7x7dbl_{i}" for i in range(1, 6)), ("avg", "branch_pool"))
_INCEPTION_D = (("branch3x3_1", "branch3x3_2/2"),
                tuple(f"branch7x7x3_{i}" for i in range(1, 4)) + ("branch7x7x3_4/2",),
                ("max/2",))


def _inception_e(pool: str):  # Mixed_7b pools "avg", Mixed_7c "max" (FIDInceptionE_2)
  return (("branch1x1",), ("branch3x3_1", ("branch3x3_2a", "branch3x3_2b")),
          ("branch3x3dbl_1", "branch3x3dbl_2", ("branch3x3dbl_3a", "branch3x3dbl_3b")),
          (pool, "branch_pool"))


# name -> (branches, input channels, input size)
_BLOCKS = {"Mixed_5b": (_INCEPTION_A, 192, 7), "Mixed_6a": (_INCEPTION_B, 288, 9),
           "Mixed_6b": (_INCEPTION_C, 768, 7), "Mixed_7a": (_INCEPTION_D, 768, 9),
           "Mixed_7b": (_inception_e("avg"), 1280, 6), "Mixed_7c": (_inception_e("max"), 2048, 6)}


def _windows(x, kh, kw, stride):
  """x [B, H, W, C] (already padded) -> the kh * kw shifted views of a sliding window."""
  ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  return [x[:, dy:dy + stride * ho:stride, dx:dx + stride * wo:stride]
          for dy in range(kh) for dx in range(kw)]


def _np_unit(x, state, name):
  """Conv (torch weight [out, in, kh, kw]) -> BatchNorm (eps 1e-3) -> ReLU, in float64."""
  name, stride = (name[:-2], 2) if name.endswith("/2") else (name, 1)
  w = state[f"{name}.conv.weight"].astype(np.float64)
  _, _, kh, kw = w.shape
  ph, pw = ((kh - 1) // 2, (kw - 1) // 2) if stride == 1 else (0, 0)
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  taps = [(dy, dx) for dy in range(kh) for dx in range(kw)]
  y = sum(np.tensordot(v, w[:, :, dy, dx], axes=(3, 1))  # BLAS, unlike matmul on views
          for v, (dy, dx) in zip(_windows(x, kh, kw, stride), taps))
  bn = {k: state[f"{name}.bn.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
  y = (y - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-3) * bn["weight"] + bn["bias"]
  return np.maximum(y, 0.0)


def _np_pool(x, kind):
  stride, pad = (2, 0) if kind == "max/2" else (1, 1)
  fill = 0.0 if kind == "avg" else -np.inf
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=fill)
  if kind != "avg":
    return np.max(_windows(padded, 3, 3, stride), axis=0)
  real = np.pad(np.ones((1,) + x.shape[1:3] + (1,)), ((0, 0), (1, 1), (1, 1), (0, 0)))
  return np.sum(_windows(padded, 3, 3, 1), axis=0) / np.sum(_windows(real, 3, 3, 1), axis=0)


def _np_block(x, state, prefix, branches):
  outputs = []
  for branch in branches:
    y = np.asarray(x, np.float64)
    for step in branch:
      if isinstance(step, tuple):
        y = np.concatenate([_np_unit(y, state, f"{prefix}.{s}") for s in step], axis=-1)
      elif step in ("avg", "max", "max/2"):
        y = _np_pool(y, step)
      else:
        y = _np_unit(y, state, f"{prefix}.{step}")
    outputs.append(y)
  return np.concatenate(outputs, axis=-1)


def _run_capturing_input(model, block: str, images, monkeypatch):
  """(model(images), the input the block named `block` receives), in one jitted call."""
  graphdef, state = nnx.split(model)
  block_type = type(getattr(model, block))
  call, seen = block_type.__call__, {}

  def spy(self, x):
    seen.setdefault(id(self), x)
    return call(self, x)

  monkeypatch.setattr(block_type, "__call__", spy)

  @jax.jit
  def run(state, images):
    merged = nnx.merge(graphdef, state)
    seen.clear()
    out = merged(images)
    return out, seen[id(getattr(merged, block))]

  return run(state, images)


def test_inception_state_dict_names():
  shapes = inception.state_dict_shapes()
  assert len(shapes) == 94 * 5 + 1  # 94 conv+BN units, the logits layer
  assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert shapes["Mixed_6d.branch1x1.conv.weight"] == (192, 768, 1, 1)
  assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
  assert shapes["Mixed_7c.branch_pool.bn.running_var"] == (192,)
  assert shapes["fc.weight"] == (1008, 2048)


def test_inception_layouts_match_torch(model, state_dict):
  """Conv [out, in, kh, kw] and linear [out, in] land where torch would use them."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 7, 7, 3)).astype(np.float32)
  expected = _np_unit(x, state_dict, "Conv2d_1a_3x3/2")  # stride 2, no padding -> 3x3
  chex.assert_shape(expected, (1, 3, 3, 32))
  chex.assert_trees_all_close(model.Conv2d_1a_3x3(x), expected, rtol=1e-4, atol=1e-5)
  pool = rng.standard_normal((2, 2048)).astype(np.float32)
  chex.assert_trees_all_close(model.fc(pool), pool @ state_dict["fc.weight"].T, rtol=1e-4,
                              atol=1e-5)


@pytest.fixture(scope="module")
def block_io(model):
  """{block: (random input, our block's output)} of every Inception block, one compile."""
  rng = np.random.default_rng(2)
  # Standard normal inputs: negative values make max-pool padding and ReLUs matter.
  inputs = {name: rng.standard_normal((1, size, size, cin)).astype(np.float32)
            for name, (_, cin, size) in _BLOCKS.items()}
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, xs):
    merged = nnx.merge(graphdef, state)
    return {k: getattr(merged, k)(x) for k, x in xs.items()}

  outputs = run(state, inputs)
  return {name: (inputs[name], np.asarray(outputs[name])) for name in _BLOCKS}


@pytest.mark.parametrize("block", list(_BLOCKS))
def test_inception_block_matches_numpy_reference(block_io, state_dict, block):
  """Each block type (A..E, Mixed_7c's max-pool E) equals the independent numpy blocks:
  pool semantics at the borders, conv paddings and strides, branch concatenation order."""
  x, ours = block_io[block]
  expected = _np_block(x, state_dict, block, _BLOCKS[block][0])
  chex.assert_trees_all_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_resize_matches_torch_bilinear():
  # F.interpolate(..., mode="bilinear", align_corners=False) weights, worked by hand.
  chex.assert_trees_all_close(
      (inception.resize_matrix(2, 4), inception.resize_matrix(4, 2),
       inception.resize_matrix(5, 5)),
      (np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]),
       np.array([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]), np.eye(5)), rtol=1e-7, atol=0)
  chex.assert_trees_all_close(inception.resize_matrix(32).sum(1), 1.0, rtol=1e-6, atol=0)
  x = np.full((1, 8, 6, 3), 255, np.uint8)
  out = inception.preprocess(x)
  assert out.shape == (1, 299, 299, 3)
  chex.assert_trees_all_close(out, 1.0, rtol=0, atol=1e-5)


def test_inception_features_shapes_and_adm_spatial(model, state_dict, sample_images,
                                                   sample_features, monkeypatch):
  """Extracted feature shapes; 299 and odd sizes by shape; sFID's features are ADM's:
  mixed_6/conv (the ReLU output of Mixed_6d's 1x1 branch, TF's mixed_6 being torchvision's
  Mixed_6d), its first 7 channels flattened in (h, w, c) order."""
  out = sample_features
  chex.assert_shape([out["pool"], out["spatial"], out["logits"]],
                    [(6, 2048), (6, 17 * 17 * 7), (6, 1008)])
  chex.assert_tree_all_finite(out)
  assert np.all(out["pool"] >= 0) and np.all(out["spatial"] >= 0)  # after ReLU
  shapes = jax.eval_shape(model, jax.ShapeDtypeStruct((2, 64, 48, 3), np.uint8))
  assert {k: v.shape for k, v in shapes.items()} == {
      "pool": (2, 2048), "spatial": (2, 2023), "logits": (2, 1008)}
  # A 299x299 input skips resizing: feeding the resized pixels gives the same features.
  resized = (np.asarray(inception.preprocess(sample_images[:1])) + 1.0) * 127.5
  direct, mixed_6d_input = _run_capturing_input(model, "Mixed_6d", resized, monkeypatch)
  chex.assert_shape([direct["pool"], direct["spatial"], direct["logits"]],
                    [(1, 2048), (1, 2023), (1, 1008)])
  chex.assert_trees_all_close(direct["pool"], out["pool"][:1], rtol=2e-3, atol=2e-4)
  chex.assert_shape(mixed_6d_input, (1, 17, 17, 768))
  conv = _np_unit(mixed_6d_input, state_dict, "Mixed_6d.branch1x1")  # [1, 17, 17, 192]
  expected = np.stack([conv[0, h, w, c] for h in range(17) for w in range(17)
                       for c in range(7)])[None]
  chex.assert_trees_all_close(direct["spatial"], expected, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(out["spatial"][:1], expected, rtol=2e-3, atol=2e-4)


def test_inception_missing_or_misshaped_tensor(state_dict):
  missing = dict(state_dict)
  del missing["Mixed_6d.branch1x1.bn.running_var"]
  with pytest.raises(KeyError, match=r"Mixed_6d\.branch1x1\.bn\.running_var"):
    inception.from_state_dict(missing)
  misshaped = dict(state_dict, **{"Mixed_5b.branch5x5_2.conv.weight": np.zeros((64, 48, 3, 3))})
  with pytest.raises(ValueError, match=r"Mixed_5b\.branch5x5_2\.conv\.weight.*\(64, 48, 3, 3\)"
                     r".*\(64, 48, 5, 5\)"):
    inception.from_state_dict(misshaped)
  extra = dict(state_dict, **{"AuxLogits.fc.weight": np.zeros((1000, 768))})
  with pytest.raises(ValueError, match="AuxLogits.fc.weight"):
    inception.from_state_dict(extra)


def test_inception_missing_weights_file(tmp_path, monkeypatch):
  monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
  monkeypatch.setenv("SGJAX_CACHE", str(tmp_path))
  with pytest.raises(FileNotFoundError) as err:
    inception.load()
  message = str(err.value)
  assert inception.WEIGHTS_NAME in message and inception.WEIGHTS_URL in message
  assert inception.WEIGHTS_ENV in message and str(tmp_path) in message
  with pytest.raises(FileNotFoundError, match="nowhere.pth"):
    inception.load(str(tmp_path / "nowhere.pth"))


def test_inception_loads_torch_file_and_converts(fake_torch, state_dict, tmp_path,
                                                 monkeypatch):
  """pytorch-fid's file format -> network (via the env var), and the one-time .npz conversion
  in a subprocess (which has no `torch` module at all)."""
  del fake_torch
  obj, storages = _tensors_for(state_dict)
  path = str(tmp_path / inception.WEIGHTS_NAME)
  write_torch_zip(path, obj, storages)
  monkeypatch.setenv(inception.WEIGHTS_ENV, path)
  model = inception.load()
  chex.assert_trees_all_equal(
      (model.Mixed_7c.branch3x3_2b.conv.kernel[...], model.Mixed_5b.branch_pool.bn.var[...]),
      (state_dict["Mixed_7c.branch3x3_2b.conv.weight"].transpose(2, 3, 1, 0),
       state_dict["Mixed_5b.branch_pool.bn.running_var"]))
  out = str(tmp_path / "inception.npz")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "sgjax.metrics.inception", f"--convert={path}",
                         f"--out={out}"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  converted = inception.read_weights(out)
  assert sorted(converted) == sorted(state_dict)
  chex.assert_trees_all_equal(converted, state_dict, strict=True)


def test_inception_file_missing_a_tensor(fake_torch, tmp_path, monkeypatch):
  del fake_torch
  small = {"Conv2d_1a_3x3.conv.weight": np.arange(864, dtype=np.float32).reshape(32, 3, 3, 3)}
  obj, storages = _tensors_for(small)
  path = str(tmp_path / inception.WEIGHTS_NAME)
  write_torch_zip(path, obj, storages)
  monkeypatch.setenv(inception.WEIGHTS_ENV, path)
  assert inception.weights_path() == path
  # The file holds one tensor only: loading names the first one it lacks.
  with pytest.raises(KeyError, match=r"Conv2d_1a_3x3\.bn\.weight"):
    inception.load()
  chex.assert_trees_all_equal(inception.read_weights(path), small, strict=True)


# -- metric maths ---------------------------------------------------------------------------


def _reference_fid(s1: adm.Statistics, s2: adm.Statistics) -> float:
  """The TTUR / ADM / pytorch-fid computation, with scipy's general matrix square root."""
  covmean = scipy.linalg.sqrtm(s1.sigma @ s2.sigma)
  if not np.isfinite(covmean).all():
    offset = np.eye(len(s1.sigma)) * 1e-6
    covmean = scipy.linalg.sqrtm((s1.sigma + offset) @ (s2.sigma + offset))
  diff = s1.mu - s2.mu
  return float(diff @ diff + np.trace(s1.sigma) + np.trace(s2.sigma)
               - 2 * np.trace(np.real(covmean)))


@pytest.mark.parametrize("n,d", [(400, 32), (20, 48)])  # full-rank and singular
def test_trace_sqrt_product_matches_scipy_sqrtm(n, d):
  rng = np.random.default_rng(d)
  s1 = np.cov(rng.standard_normal((n, d)), rowvar=False)
  s2 = np.cov(rng.standard_normal((n, d)) @ rng.standard_normal((d, d)), rowvar=False)
  factor = adm.psd_factor(s1)
  assert factor.shape == (d, min(n - 1, d))
  chex.assert_trees_all_close(factor @ factor.T, s1, rtol=0, atol=1e-10)
  expected = np.trace(np.real(scipy.linalg.sqrtm(s1 @ s2)))
  chex.assert_trees_all_close(adm.trace_sqrt_product(s1, s2), expected, rtol=1e-3, atol=0)
  chex.assert_trees_all_close(adm.trace_sqrt_product(s1, s1), np.trace(s1), rtol=1e-9, atol=0)


@pytest.mark.parametrize("n,d", [(400, 32), (50, 80)])  # full-rank and singular covariances
def test_fid_matches_scipy(n, d):
  rng = np.random.default_rng(n)
  x = rng.standard_normal((n, d))
  y = 0.5 + rng.standard_normal((n, d)) @ (0.3 * rng.standard_normal((d, d)))
  s1, s2 = adm.statistics(x), adm.statistics(y)
  ours, ref = adm.frechet_distance(s1, s2), _reference_fid(s1, s2)
  assert abs(ours - ref) <= 1e-3 * max(1.0, abs(ref))
  assert abs(adm.frechet_distance(s1, s1)) < 1e-9 * np.trace(s1.sigma)
  assert abs(adm.fid_from_features(x, x)) < 1e-9 * np.trace(s1.sigma)


def test_fid_closed_form_gaussians():
  # For commuting covariances R diag(a) R^T, R diag(b) R^T:
  # FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
  rng = np.random.default_rng(0)
  d = 6
  rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
  a, b = rng.uniform(0.5, 3.0, d), rng.uniform(0.1, 2.0, d)
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  s1 = adm.Statistics(mu1, rot @ np.diag(a) @ rot.T)
  s2 = adm.Statistics(mu2, rot @ np.diag(b) @ rot.T)
  expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)
  chex.assert_trees_all_close(adm.frechet_distance(s1, s2), expected, rtol=1e-9, atol=0)
  # Non-commuting 2D case: N(0, I) vs N(0, [[4, 0], [0, 1/4]]) rotated by 45 degrees.
  c = np.sqrt(0.5)
  r45 = np.array([[c, -c], [c, c]])
  s3 = adm.Statistics(np.zeros(2), r45 @ np.diag([4.0, 0.25]) @ r45.T)
  expected = 2 + 4.25 - 2 * (2 + 0.5)  # tr sqrt(I @ S) = sum of sqrt(eigenvalues)
  chex.assert_trees_all_close(adm.frechet_distance(adm.Statistics(np.zeros(2), np.eye(2)), s3),
                              expected, rtol=0, atol=1e-12)
  with pytest.raises(ValueError, match="differ in shape"):
    adm.frechet_distance(s1, adm.Statistics(np.zeros(2), np.eye(2)))


def _np_radii(points, k=3):
  """Squared distance from each point to its k-th nearest neighbour, itself being the 0th."""
  return np.sort(scipy.spatial.distance.cdist(points, points, "sqeuclidean"), axis=1)[:, k]


def _np_covered(queries, points, k=3) -> float:
  """Fraction of queries within (<=) the k-NN radius of some point (Kynkaanniemi et al.)."""
  d = scipy.spatial.distance.cdist(queries, points, "sqeuclidean")
  return float(np.mean(np.any(d <= _np_radii(points, k)[None, :], axis=1)))


def test_inception_score():
  assert adm.inception_score(np.zeros((10, 7))) == pytest.approx(1.0)
  confident = 50.0 * np.eye(5)[np.arange(20) % 5]  # every class equally, each sure
  assert adm.inception_score(confident) == pytest.approx(5.0, rel=1e-6)
  # Splits: two halves of 10, each seeing 5 classes -> 5; the whole set -> 5 too.
  assert adm.inception_score(confident, split_size=10) == pytest.approx(5.0, rel=1e-6)
  logits = np.random.default_rng(0).standard_normal((30, 8))
  assert adm.inception_score(logits, split_size=10) == pytest.approx(
      _np_inception_score(logits, 10), rel=1e-12)


def _np_inception_score(logits, split_size) -> float:
  """The reference's formula on softmax probabilities."""
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for i in range(0, len(p), split_size):
    part = p[i:i + split_size]
    kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
    scores.append(np.exp(kl.sum(1).mean()))
  return float(np.mean(scores))


def _np_statistics(features) -> adm.Statistics:
  """Mean and unbiased covariance by explicit sums over the rows."""
  features = np.asarray(features, np.float64)
  n = len(features)
  mu = sum(features) / n
  return adm.Statistics(mu, sum(np.outer(f - mu, f - mu) for f in features) / (n - 1))


@pytest.mark.parametrize("row_block", [None, 64])  # 64: rows split into padded blocks
def test_adm_metrics_match_brute_force(monkeypatch, row_block):
  """The five numbers from random {pool, spatial, logits} features against brute force: FID
  on pool, sFID on spatial (scipy's sqrtm on explicit-sum statistics), precision/recall on
  pool (two shifted Gaussian clouds: fractions far from 0 and 1), IS on the sample logits."""
  if row_block:
    monkeypatch.setattr(adm, "_ROW_BLOCK", row_block)
  rng = np.random.default_rng(0)
  reference = {"pool": rng.standard_normal((300, 16)).astype(np.float32)}
  samples = {"pool": (0.9 * rng.standard_normal((250, 16)) + 0.5).astype(np.float32)}
  for feats, shift in ((reference, 0.0), (samples, 0.4)):
    feats["spatial"] = rng.standard_normal((len(feats["pool"]), 20)) @ rng.uniform(
        0, 1, (20, 20)) - shift
    feats["logits"] = 2 * rng.standard_normal((len(feats["pool"]), 10))
  for key in ("pool", "spatial"):
    ours, brute = adm.statistics(samples[key]), _np_statistics(samples[key])
    chex.assert_trees_all_close((ours.mu, ours.sigma), (brute.mu, brute.sigma), rtol=1e-12,
                                atol=1e-12)
  chex.assert_trees_all_close(adm.manifold_radii(reference["pool"], 3),
                              _np_radii(reference["pool"]), rtol=1e-5, atol=0)
  expected = {
      "inception_score": _np_inception_score(samples["logits"], adm.IS_SPLIT_SIZE),
      "fid": _reference_fid(_np_statistics(samples["pool"]),
                            _np_statistics(reference["pool"])),
      "sfid": _reference_fid(_np_statistics(samples["spatial"]),
                             _np_statistics(reference["spatial"])),
      "precision": _np_covered(samples["pool"], reference["pool"]),
      "recall": _np_covered(reference["pool"], samples["pool"])}
  assert 0.1 < expected["precision"] < 0.9 and 0.1 < expected["recall"] < 0.9, expected
  result = adm.metrics(samples, reference)
  assert set(result) == set(expected)
  chex.assert_trees_all_equal({k: result[k] for k in ("precision", "recall")},
                              {k: expected[k] for k in ("precision", "recall")})
  chex.assert_trees_all_close(result, expected, rtol=1e-9, atol=0)
  # From stored reference statistics: the same FID/sFID, and no P/R without features.
  stats = {k: _np_statistics(reference[k]) for k in ("pool", "spatial")}
  from_stats = adm.metrics(samples, reference_stats=stats)
  chex.assert_trees_all_close(
      from_stats, {k: expected[k] for k in ("inception_score", "fid", "sfid")}, rtol=1e-9,
      atol=0)


def test_extract_pads_and_streams_npz(tmp_path):
  images = np.arange(13 * 2 * 2 * 1, dtype=np.uint8).reshape(13, 2, 2, 1)
  apply = lambda scale, x: {"x": x.astype(np.float32) * scale}
  out = features.extract(apply, np.float32(2.0), images, batch_size=5)  # -> 8 on 8 devices
  chex.assert_trees_all_equal(out["x"], images * np.float32(2.0), strict=True)
  for save in (np.savez, np.savez_compressed):
    path = str(tmp_path / f"{save.__name__}.npz")
    save(path, images, np.arange(13))
    arr = features.NpzArray(path)
    assert len(arr) == 13 and arr.shape == images.shape
    batches = list(arr.batches(4))
    assert [len(b) for b in batches] == [4, 4, 4, 1]
    read = (np.concatenate(batches), features.NpzArray(path, "arr_1").read())
    chex.assert_trees_all_equal(read, (images, np.arange(13)), strict=True)


# -- the ADM pipeline end to end, with random Inception weights -----------------------------


def test_adm_evaluate_npz(state_dict, sample_images, sample_features, tmp_path):
  weights = str(tmp_path / "inception.npz")
  np.savez(weights, **state_dict)
  samples = str(tmp_path / "samples.npz")
  np.savez(samples, sample_images)
  # Against itself: FID and sFID 0, precision and recall 1; written beside the samples.
  same = npz.evaluate_npz(samples, samples, "adm", weights, batch_size=8)
  assert set(same) >= {"inception_score", "fid", "sfid", "precision", "recall"}
  written = json.loads((tmp_path / "metrics.json").read_text())
  assert written["fid"] == same["fid"] and written["num_samples"] == 6
  assert abs(same["fid"]) < 1e-3 and abs(same["sfid"]) < 1e-3
  assert same["precision"] == same["recall"] == 1.0
  # A reference holding statistics only (as ADM's batches do, besides images), here those of
  # half the samples: FID from mu/sigma, sFID from mu_s/sigma_s, no precision/recall.
  stats = {k: adm.statistics(sample_features[k][:3]) for k in ("pool", "spatial")}
  stats_only = str(tmp_path / "stats.npz")
  np.savez(stats_only, mu=stats["pool"].mu, sigma=stats["pool"].sigma,
           mu_s=stats["spatial"].mu, sigma_s=stats["spatial"].sigma)
  from_stats = npz.evaluate_npz(samples, stats_only, "adm", weights, batch_size=8,
                                out=str(tmp_path / "stats.json"))
  # frechet_distance is checked against scipy above; here: which statistics reach it.
  expected = {name: adm.frechet_distance(adm.statistics(sample_features[k]), stats[k])
              for name, k in (("fid", "pool"), ("sfid", "spatial"))}
  assert min(expected.values()) > 1e-2 and "precision" not in from_stats
  chex.assert_trees_all_close({k: from_stats[k] for k in expected}, expected, rtol=1e-4,
                              atol=0)
  with pytest.raises(ValueError, match="needs a reference"):
    npz.evaluate_npz(samples, None, "adm", weights)
  assert os.path.exists(tmp_path / "stats.json")
