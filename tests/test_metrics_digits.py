"""Digits metrics: the cached classifier, its feature-space metrics, and the evaluate CLI."""

import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from sgjax.metrics import digits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """A private SGJAX_CACHE (also seen by subprocesses), so tests never touch ~/.cache."""
  path = str(tmp_path_factory.mktemp("sgjax_cache"))
  old = os.environ.get("SGJAX_CACHE")
  os.environ["SGJAX_CACHE"] = path
  yield path
  if old is None:
    del os.environ["SGJAX_CACHE"]
  else:
    os.environ["SGJAX_CACHE"] = old


@pytest.fixture(scope="module")
def classifier(cache):
  return digits.load_classifier(cache=cache)


def test_split_is_fixed_and_disjoint():
  train_images, train_labels = digits.digits_split("train")
  held_images, held_labels = digits.digits_split("heldout")
  assert train_images.shape == (1500, 8, 8, 1) and held_images.shape == (297, 8, 8, 1)
  assert train_images.dtype == np.uint8 and held_images.max() == 255
  assert set(np.unique(held_labels)) == set(range(10))
  again, _ = digits.digits_split("heldout")
  chex.assert_trees_all_equal(again, held_images, strict=True)
  # No held-out digit is also a training digit (up to exact duplicates in the data).
  train_set = {im.tobytes() for im in train_images}
  assert sum(im.tobytes() in train_set for im in held_images) <= 3
  with pytest.raises(ValueError, match="split='test'"):
    digits.digits_split("test")


def test_classifier_accuracy_and_cache(classifier, cache):
  accuracy = digits.heldout_accuracy(classifier)
  assert accuracy >= 0.95
  files = [f for f in os.listdir(cache) if f.startswith("digits_classifier_")]
  assert files == [f"digits_classifier_{digits.ClassifierConfig().cache_key()}.npz"]
  reloaded = digits.load_classifier(cache=cache)  # from the file, no training
  images, _ = digits.digits_split("heldout")
  chex.assert_trees_all_close(reloaded(images[:16]), classifier(images[:16]), rtol=1e-6,
                              atol=0)
  assert digits.ClassifierConfig(seed=1).cache_key() != digits.ClassifierConfig().cache_key()


def test_heldout_digits_against_themselves(classifier, cache):
  images, labels = digits.digits_split("heldout")
  result = digits.metrics(images, labels, cache=cache)
  assert result["class_accuracy"] == pytest.approx(digits.heldout_accuracy(classifier))
  assert result["class_accuracy"] == result["classifier_heldout_accuracy"]
  assert abs(result["fid"]) < 1e-6
  assert result["precision"] == result["recall"] == 1.0
  assert result["diversity"] == pytest.approx(1.0)
  assert result["num_samples"] == result["num_reference"] == 297


def test_noise_is_far_worse_than_real_digits(cache):
  rng = np.random.default_rng(0)
  train_images, train_labels = digits.digits_split("train")
  real = digits.metrics(train_images[:297], train_labels[:297], cache=cache)
  noise = rng.integers(0, 256, (297, 8, 8, 1), dtype=np.uint8)
  fake = digits.metrics(noise, rng.integers(0, 10, 297), cache=cache)
  assert real["class_accuracy"] > 0.95
  assert fake["class_accuracy"] < 0.25  # chance is 0.1
  assert fake["fid"] > 10 * max(real["fid"], 1.0)
  assert fake["precision"] < 0.2 and real["precision"] > 0.5
  with pytest.raises(ValueError, match=r"\[N, 8, 8, 1\]"):
    digits.metrics(np.zeros((4, 16, 16, 1), np.uint8), cache=cache)


def test_evaluate_cli_digits(classifier, cache, tmp_path):
  del classifier  # trained and cached: the subprocess only loads it
  images, labels = digits.digits_split("heldout")
  samples = tmp_path / "run" / "samples.npz"
  samples.parent.mkdir()
  np.savez(samples, images[:64], labels[:64])
  env = dict(os.environ, SGJAX_CACHE=cache, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "sgjax.evaluate", f"--samples={samples}",
                         "--metric=digits", "--batch_size=64"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads((samples.parent / "metrics.json").read_text())
  assert metrics["metric"] == "digits" and metrics["num_samples"] == 64
  assert metrics["class_accuracy"] > 0.9 and metrics["num_reference"] == 297
  for key in ("fid", "diversity", "precision", "recall", "classifier_heldout_accuracy"):
    assert np.isfinite(metrics[key])
