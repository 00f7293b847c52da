"""Latent space end to end: an image folder -> sgjax.latents -> train -> sample with SG ->
decode -> ADM metrics, with a tiny random VAE (diffusers' layout); resumption; bad input."""

import glob
import os
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest
# Imported here, not lazily inside a test: Python 3.11's parser can fail ("AST constructor
# recursion depth mismatch") when pytest rewrites a module imported deep in a call stack.
from tensorflow_datasets.testing import mocking as tfds_mocking

from configs import imagenet256
from sgjax import latents, sample, sweep, train
from sgjax import config as config_lib
from sgjax.data import images as images_lib
from sgjax.data import pipeline, sources
from sgjax.guidance import GuidanceConfig
from sgjax.metrics import npz
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parity", "fixtures", "vae",
                       "vae")
RESOLUTION = 16  # the tiny VAE halves it: 8 x 8 x 4 latents


def test_image_folder_to_metrics_with_our_commands_only(tmp_path):
  source = helpers.image_folder(tmp_path / "images")
  out = str(tmp_path / "latents")
  manifest = latents.precompute(source, VAE_DIR, out, resolution=RESOLUTION, flip=True,
                                shard_size=8, batch_size=8)
  # 12 readable images and their flips; the broken one is named, not dropped silently.
  assert manifest["num_images"] == 13 and manifest["num_records"] == 24
  assert [u["name"] for u in manifest["unreadable"]] == [str(tmp_path / "images" / "n02_dog"
                                                             / "broken.png")]
  assert manifest["class_names"] == ["n01_cat", "n02_dog"]
  assert manifest["latent_shape"] == [8, 8, 4] and manifest["scaling_factor"] == 0.18215
  # broken.png sorts last: images 0..11 are the readable ones, each once, flipped once.
  assert sorted(helpers.latent_records(out)) == [(i, f) for i in range(12) for f in (False, True)]

  # Training draws a new latent from each posterior every time it sees the example.
  config = imagenet256.get_config("runlocal")
  config.model.update(num_classes=2, in_channels=4)
  config.data.update(source="latents", path=os.path.join(out, "train-*.array_record"),
                     vae=VAE_DIR, num_workers=0)
  config.train.update(steps=4, ckpt_every=4, batch_size=8)
  workdir = str(tmp_path / "run")
  assert np.isfinite(train.train(config, workdir)["loss"])

  # Sampling with SG decodes with the run's VAE; the ADM metrics take the images.
  guidance = GuidanceConfig("sg", omega=1.5, gamma_strong=0.0, gamma_weak=0.5)
  summary = sample.run(workdir, guidance, str(tmp_path / "sg"), steps=2, num_samples=8,
                       batch_size=8, save_latents=True)
  assert summary["output"] == "images+latents"
  images = np.load(tmp_path / "sg" / "samples.npz")["arr_0"]
  assert images.shape == (8, RESOLUTION, RESOLUTION, 3) and images.dtype == np.uint8
  assert np.load(tmp_path / "sg" / "latents.npz")["arr_0"].shape == (8, 8, 8, 4)
  assert os.path.exists(tmp_path / "sg" / "grid.png")
  weights = str(tmp_path / "inception.npz")
  np.savez(weights, **helpers.random_inception_weights())
  reference = str(tmp_path / "reference.npz")
  collection = images_lib.open_images(source)
  np.savez(reference, np.stack([images_lib.adm_center_crop(collection.load(i), RESOLUTION)
                                for i in range(12)]))
  metrics = npz.evaluate_npz(str(tmp_path / "sg" / "samples.npz"), reference, "adm", weights,
                             batch_size=8)
  assert np.isfinite(metrics["fid"]) and 0 <= metrics["recall"] <= 1
  rows = sweep.run_sweep(workdir, [guidance], str(tmp_path / "sweep"), metric="adm",
                         reference=reference, inception_weights=weights, steps=2,
                         num_samples=8, batch_size=8)
  assert np.isfinite(rows[0]["fid"])


def test_interrupted_precompute_resumes_with_every_image_exactly_once(tmp_path, monkeypatch):
  source = helpers.image_folder(tmp_path / "images", corrupt=False)
  out = str(tmp_path / "latents")
  real = latents._encode_shard  # pylint: disable=protected-access
  calls = []

  def dies_in_second_shard(collection, entries, *args):
    calls.append(len(entries))
    if len(calls) == 2:  # a kill mid-shard: a partial .tmp file and no rename
      with open(args[-2] + ".tmp", "wb") as f:
        f.write(b"partial")
      raise KeyboardInterrupt
    return real(collection, entries, *args)

  monkeypatch.setattr(latents, "_encode_shard", dies_in_second_shard)
  with pytest.raises(KeyboardInterrupt):
    latents.precompute(source, VAE_DIR, out, resolution=RESOLUTION, shard_size=5,
                       batch_size=8)
  assert len(glob.glob(os.path.join(out, "train-*.array_record"))) == 1
  monkeypatch.setattr(latents, "_encode_shard", real)
  manifest = latents.precompute(source, VAE_DIR, out, resolution=RESOLUTION, shard_size=5,
                                batch_size=8)
  assert sorted(helpers.latent_records(out)) == [(i, False) for i in range(12)]
  assert manifest["num_records"] == 12 and manifest["num_shards"] == 3
  with pytest.raises(ValueError, match=r"other settings \(\['shard_size'\]\)"):
    latents.precompute(source, VAE_DIR, out, resolution=RESOLUTION, shard_size=4)


def test_posterior_shards_refuse_flipping_latents(tmp_path):
  source = helpers.image_folder(tmp_path / "images", per_class=1, corrupt=False)
  out = str(tmp_path / "latents")
  latents.precompute(source, VAE_DIR, out, resolution=RESOLUTION, batch_size=8)
  shards = sources.LatentSource(os.path.join(out, "train-*.array_record"), 0.18215)
  with pytest.raises(ValueError, match="data.flip=True would flip latents"):
    pipeline.make_iterator(shards, global_batch=2, seed=0, flip=True)
  # Each visit of an example draws another latent from its posterior.
  batches = pipeline.make_iterator(shards, global_batch=2, seed=0)
  first, second = next(batches), next(batches)
  chex.assert_trees_all_equal(np.sort(first["label"]), np.sort(second["label"]))
  assert np.abs(np.sort(first["image"].ravel()) - np.sort(second["image"].ravel())).max() > 0


def test_tfds_images_are_encoded_with_their_labels(tmp_path):
  out = str(tmp_path / "latents")
  with tfds_mocking.mock_data(num_examples=5):
    collection = images_lib.open_images("tfds:mnist:train")
    manifest = latents.precompute("tfds:mnist:train", VAE_DIR, out, resolution=RESOLUTION,
                                  batch_size=8)
    labels = [collection.labels[i] for i in range(5)]
  assert manifest["num_records"] == 5 and len(manifest["class_names"]) == 10
  assert [int(label) for label in helpers.latent_records(out, "label")] == labels
  assert helpers.latent_records(out, "mean")[0].shape == (8, 8, 4)


def test_bad_inputs_fail_before_any_work(tmp_path):
  os.makedirs(tmp_path / "empty" / "class_a")
  with pytest.raises(ValueError, match="holds no images"):
    latents.precompute(f"folder:{tmp_path / 'empty'}", VAE_DIR, str(tmp_path / "out"))
  with pytest.raises(ValueError, match="expected folder:DIR or tfds"):
    images_lib.open_images("imagenet")
  source = helpers.image_folder(tmp_path / "images", per_class=1, corrupt=False)
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    latents.precompute(source, str(tmp_path), str(tmp_path / "out"))
  with pytest.raises(ValueError, match="not a multiple of the VAE's downsampling factor 2"):
    latents.precompute(source, VAE_DIR, str(tmp_path / "out"), resolution=15)
  with pytest.raises(ValueError, match="'gs://b/latents': ArrayRecord shards are written as"):
    latents.precompute(source, VAE_DIR, "gs://b/latents")
  config = imagenet256.get_config("runlocal")
  config.data.update(source="latents", vae=VAE_DIR)
  config.model.in_channels = 3
  with pytest.raises(ValueError, match="model.in_channels=3, but the VAE .* has 4 latent"):
    config_lib.validate(config)
  config.model.in_channels, config.data.latent_scale = 4, 0.13025
  with pytest.raises(ValueError, match="data.latent_scale=0.13025, but .* scaling_factor"
                                       " 0.18215"):
    config_lib.validate(config)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_precompute_stopped_by_a_signal_and_rerun_holds_every_image_once(tmp_path, signum):
  source = helpers.image_folder(tmp_path / "images", per_class=200, corrupt=False)
  out = str(tmp_path / "latents")
  command = [sys.executable, "-m", "sgjax.latents", f"--source={source}", f"--vae={VAE_DIR}",
             f"--out={out}", f"--resolution={RESOLUTION}", "--shard_size=8", "--batch_size=8"]
  log = open(tmp_path / "first_run.log", "w")
  process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  complete = lambda: glob.glob(os.path.join(out, "train-*.array_record"))
  deadline = time.monotonic() + 300
  while not complete() and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.005)
  # Frozen at once, so that the signal lands mid-run however fast the rest would go.
  process.send_signal(signal.SIGSTOP)
  done = len(complete())
  process.send_signal(signum)
  process.send_signal(signal.SIGCONT)
  process.wait(timeout=60)
  log.close()
  assert 0 < done < 50, (tmp_path / "first_run.log").read_text()[-2000:]
  subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)
  assert sorted(helpers.latent_records(out)) == [(i, False) for i in range(400)]
