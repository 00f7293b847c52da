"""FID / sFID / IS / precision-recall, the FID Inception and the torch-file reader.

Inception weights are random (the real file is not available to tests), so these check
shapes, layouts, plumbing and error messages; the metric maths is checked against scipy and
closed forms.
"""

import collections
import json
import os
import pickle
import subprocess
import sys
import types
import zipfile

import jax
import numpy as np
import pytest
import scipy.linalg

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
  np.testing.assert_array_equal(loaded["matrix"], base.reshape(4, 5))
  np.testing.assert_array_equal(loaded["transposed"], base.reshape(4, 5).T)
  np.testing.assert_array_equal(loaded["tail"], base[12:18].reshape(2, 3))
  np.testing.assert_array_equal(loaded["half"], more["half"].args[0].flat.reshape(2, 3))
  assert loaded["half"].dtype == np.float16 and loaded["long"].dtype == np.int64
  np.testing.assert_array_equal(loaded["long"], np.arange(7))


def test_torch_reader_refuses_arbitrary_globals(tmp_path):
  path = str(tmp_path / "evil.pth")
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"x": print}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
    torch_state.load(path)


# -- Inception ------------------------------------------------------------------------------


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
  w = state_dict["Conv2d_1a_3x3.conv.weight"]  # stride 2, no padding -> 3x3 outputs
  bn = {k: state_dict[f"Conv2d_1a_3x3.bn.{k}"] for k in ("weight", "bias", "running_mean",
                                                         "running_var")}
  expected = np.zeros((3, 3, 32))
  for i in range(3):
    for j in range(3):
      expected[i, j] = np.einsum("hwc,ochw->o", x[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3], w)
  expected = (expected - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-3)
  expected = np.maximum(expected * bn["weight"] + bn["bias"], 0)
  np.testing.assert_allclose(model.Conv2d_1a_3x3(x)[0], expected, rtol=1e-4, atol=1e-5)
  pool = rng.standard_normal((2, 2048)).astype(np.float32)
  np.testing.assert_allclose(model.fc(pool), pool @ state_dict["fc.weight"].T, rtol=1e-4,
                             atol=1e-5)


def test_resize_matches_torch_bilinear():
  # F.interpolate(..., mode="bilinear", align_corners=False) weights, worked by hand.
  np.testing.assert_allclose(inception.resize_matrix(2, 4),
                             [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
  np.testing.assert_allclose(inception.resize_matrix(4, 2),
                             [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
  np.testing.assert_allclose(inception.resize_matrix(5, 5), np.eye(5))
  np.testing.assert_allclose(inception.resize_matrix(32).sum(1), 1.0, rtol=1e-6)
  x = np.full((1, 8, 6, 3), 255, np.uint8)
  out = inception.preprocess(x)
  assert out.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(out, 1.0, atol=1e-5)


def test_inception_feature_shapes(model):
  """Small images (resized inside) through the sharded extractor; 299 and odd sizes by shape."""
  rng = np.random.default_rng(0)
  apply, params = features.nnx_apply(model)
  images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  out = features.extract(apply, params, images, batch_size=8)  # 8 fake devices, padded
  assert {k: v.shape for k, v in out.items()} == {
      "pool": (3, 2048), "spatial": (3, 17 * 17 * 7), "logits": (3, 1008)}
  assert all(np.all(np.isfinite(v)) for v in out.values())
  assert np.all(out["pool"] >= 0) and np.all(out["spatial"] >= 0)  # after ReLU
  for size in ((299, 299), (64, 48)):
    shapes = jax.eval_shape(model, jax.ShapeDtypeStruct((2,) + size + (3,), np.uint8))
    assert {k: v.shape for k, v in shapes.items()} == {
        "pool": (2, 2048), "spatial": (2, 2023), "logits": (2, 1008)}
  # A 299x299 input skips resizing: feeding the resized pixels gives the same features.
  resized = (np.asarray(inception.preprocess(images[:1])) + 1.0) * 127.5
  direct = jax.jit(apply)(params, resized)
  np.testing.assert_allclose(direct["pool"], out["pool"][:1], rtol=2e-3, atol=2e-4)


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
  np.testing.assert_array_equal(model.Mixed_7c.branch3x3_2b.conv.kernel[...],
                                state_dict["Mixed_7c.branch3x3_2b.conv.weight"].transpose(
                                    2, 3, 1, 0))
  np.testing.assert_array_equal(model.Mixed_5b.branch_pool.bn.var[...],
                                state_dict["Mixed_5b.branch_pool.bn.running_var"])
  out = str(tmp_path / "inception.npz")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "sgjax.metrics.inception", f"--convert={path}",
                         f"--out={out}"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  converted = inception.read_weights(out)
  assert sorted(converted) == sorted(state_dict)
  for name in ("Conv2d_1a_3x3.conv.weight", "fc.weight", "Mixed_6d.branch1x1.bn.bias"):
    np.testing.assert_array_equal(converted[name], state_dict[name])


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
  np.testing.assert_array_equal(inception.read_weights(path)["Conv2d_1a_3x3.conv.weight"],
                                small["Conv2d_1a_3x3.conv.weight"])


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
  np.testing.assert_allclose(factor @ factor.T, s1, atol=1e-10)
  expected = np.trace(np.real(scipy.linalg.sqrtm(s1 @ s2)))
  np.testing.assert_allclose(adm.trace_sqrt_product(s1, s2), expected, rtol=1e-3)
  np.testing.assert_allclose(adm.trace_sqrt_product(s1, s1), np.trace(s1), rtol=1e-9)


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
  np.testing.assert_allclose(adm.frechet_distance(s1, s2), expected, rtol=1e-9)
  # Non-commuting 2D case: N(0, I) vs N(0, [[4, 0], [0, 1/4]]) rotated by 45 degrees.
  c = np.sqrt(0.5)
  r45 = np.array([[c, -c], [c, c]])
  s3 = adm.Statistics(np.zeros(2), r45 @ np.diag([4.0, 0.25]) @ r45.T)
  expected = 2 + 4.25 - 2 * (2 + 0.5)  # tr sqrt(I @ S) = sum of sqrt(eigenvalues)
  np.testing.assert_allclose(adm.frechet_distance(adm.Statistics(np.zeros(2), np.eye(2)), s3),
                             expected, atol=1e-12)
  with pytest.raises(ValueError, match="differ in shape"):
    adm.frechet_distance(s1, adm.Statistics(np.zeros(2), np.eye(2)))


def test_precision_recall():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((300, 16)).astype(np.float32)
  assert adm.precision_recall(x, x) == (1.0, 1.0)
  assert adm.precision_recall(x, x + 100.0) == (0.0, 0.0)
  # Samples from half of the reference: precise, but recall about one half.
  half = x[x[:, 0] > 0]
  precision, recall = adm.precision_recall(x, half)
  assert precision == 1.0 and 0.3 < recall < 0.95
  # k-th neighbour radii agree with a brute-force numpy computation.
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  np.testing.assert_allclose(adm.manifold_radii(x, 3), np.sort(d, axis=1)[:, 3], rtol=1e-4)


def test_inception_score():
  assert adm.inception_score(np.zeros((10, 7))) == pytest.approx(1.0)
  confident = 50.0 * np.eye(5)[np.arange(20) % 5]  # every class equally, each sure
  assert adm.inception_score(confident) == pytest.approx(5.0, rel=1e-6)
  # Splits: two halves of 10, each seeing 5 classes -> 5; the whole set -> 5 too.
  assert adm.inception_score(confident, split_size=10) == pytest.approx(5.0, rel=1e-6)
  # Against the reference's formula on softmax probabilities.
  logits = np.random.default_rng(0).standard_normal((30, 8))
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for i in range(0, 30, 10):
    part = p[i:i + 10]
    kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
    scores.append(np.exp(kl.sum(1).mean()))
  assert adm.inception_score(logits, split_size=10) == pytest.approx(np.mean(scores))


def test_extract_pads_and_streams_npz(tmp_path):
  images = np.arange(13 * 2 * 2 * 1, dtype=np.uint8).reshape(13, 2, 2, 1)
  apply = lambda scale, x: {"x": x.astype(np.float32) * scale}
  out = features.extract(apply, np.float32(2.0), images, batch_size=5)  # -> 8 on 8 devices
  np.testing.assert_array_equal(out["x"], images * 2.0)
  for save in (np.savez, np.savez_compressed):
    path = str(tmp_path / f"{save.__name__}.npz")
    save(path, images, np.arange(13))
    arr = features.NpzArray(path)
    assert len(arr) == 13 and arr.shape == images.shape
    batches = list(arr.batches(4))
    assert [len(b) for b in batches] == [4, 4, 4, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    np.testing.assert_array_equal(features.NpzArray(path, "arr_1").read(), np.arange(13))


# -- the ADM pipeline end to end, with random Inception weights -----------------------------


def test_adm_evaluate_npz(state_dict, tmp_path):
  weights = str(tmp_path / "inception.npz")
  np.savez(weights, **state_dict)
  rng = np.random.default_rng(0)
  samples = str(tmp_path / "samples.npz")
  reference = str(tmp_path / "ref.npz")
  np.savez(samples, rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
  np.savez(reference, rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
  result = npz.evaluate_npz(samples, reference, "adm", weights, batch_size=8)
  assert set(result) >= {"inception_score", "fid", "sfid", "precision", "recall"}
  written = json.loads((tmp_path / "metrics.json").read_text())
  assert written["fid"] == result["fid"] and written["num_samples"] == 6
  assert result["fid"] > 0 and 0 <= result["precision"] <= 1
  # Against itself: FID 0, precision and recall 1.
  same = npz.evaluate_npz(samples, samples, "adm", weights, batch_size=8,
                          out=str(tmp_path / "same.json"))
  assert abs(same["fid"]) < 1e-3 and abs(same["sfid"]) < 1e-3
  assert same["precision"] == same["recall"] == 1.0
  # A reference holding statistics only (as ADM's batches do, besides images).
  model = inception.from_state_dict(state_dict)
  apply, params = features.nnx_apply(model)
  feats = features.extract(apply, params, np.load(samples)["arr_0"], batch_size=8)
  stats = {"pool": adm.statistics(feats["pool"]), "spatial": adm.statistics(feats["spatial"])}
  stats_only = str(tmp_path / "stats.npz")
  np.savez(stats_only, mu=stats["pool"].mu, sigma=stats["pool"].sigma,
           mu_s=stats["spatial"].mu, sigma_s=stats["spatial"].sigma)
  from_stats = npz.evaluate_npz(samples, stats_only, "adm", weights, batch_size=8,
                                out=str(tmp_path / "stats.json"))
  assert abs(from_stats["fid"]) < 1e-3 and "precision" not in from_stats
  with pytest.raises(ValueError, match="needs a reference"):
    npz.evaluate_npz(samples, None, "adm", weights)
  assert os.path.exists(tmp_path / "stats.json")
