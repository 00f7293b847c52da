"""Precomputes the SD-VAE posterior of every image of a dataset, as ArrayRecord shards.

    python -m sgjax.latents --source=folder:/data/imagenet/train --vae=/models/sd-vae-ft-ema \
        --out=/data/in256_latents --resolution=256 --flip
    python -m sgjax.latents --source=tfds:imagenette:train --vae=... --out=... --resolution=256

Images go through ADM's preprocessing (`sgjax.data.images.adm_center_crop`), scaled to
[-1, 1], and are encoded in batches split over every device (and, with several processes,
over the hosts: process i of n encodes shards i, i + n, ...). Each record
(`sgjax.data.sources`) holds the posterior `mean` and `std` (float32, unscaled), the
`label`, the source `index` and whether it is the `flipped` copy: training draws a fresh
latent from the posterior every time.
`--flip` adds a horizontally flipped copy of every image, encoded on its own (the latent of a
flipped image is not the flipped latent).

Every host must see the same `--out` folder (a shared file system or a mounted bucket).
Resumable: a shard is written to a temporary file and renamed when complete, with a
`.json` beside it naming the images that could not be read; a restart skips complete shards
and redoes the rest, so every readable image ends in exactly one record. Unreadable or
corrupt images are counted, named in `manifest.json` and logged, never dropped silently.
OUT/manifest.json also records the VAE, its scale, the resolution, counts and class names;
train with `--config.data.path='OUT/train-*.array_record'` and `--config.data.vae=VAE`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils

from sgjax import cli, distributed, logs, paths, sharding
from sgjax.data import images as images_lib
from sgjax.data import sources
from sgjax.models import vae as vae_lib

FLAGS = flags.FLAGS
MANIFEST = "manifest.json"


def shard_path(out: str, shard: int, num_shards: int) -> str:
  return os.path.join(out, f"train-{shard:05d}-of-{num_shards:05d}.array_record")


def _encode_shard(collection, entries, encode, resolution: int, batch_size: int, path: str,
                  progress) -> list[dict]:
  """Encodes `entries` [(index, flipped)] into the shard at `path` (written as path.tmp,
  then renamed); returns the unreadable images."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  unreadable, pending = [], []
  writer = array_record_module.ArrayRecordWriter(path + ".tmp", "group_size:1")

  def flush():
    mean, std = encode_batch(encode, np.stack([image for *_, image in pending]), batch_size)
    for (index, flipped, label, _), m, s in zip(pending, mean, std):
      writer.write(sources.encode_latent_record(None, label, mean=m, std=s,
                                                index=np.int64(index), flipped=flipped))
    progress(len(pending))
    pending.clear()

  for index, flipped in entries:
    try:
      image = images_lib.adm_center_crop(collection.load(index), resolution)
    except Exception as e:  # PIL raises many types for corrupt files
      unreadable.append({"index": index, "name": collection.name(index),
                         "error": f"{type(e).__name__}: {e}"})
      continue
    if flipped:
      image = image[:, ::-1]
    pending.append((index, flipped, int(collection.labels[index]), sources.from_uint8(image)))
    if len(pending) == batch_size:
      flush()
  if pending:
    flush()
  writer.close()
  with open(path + ".json", "w") as f:
    json.dump({"unreadable": unreadable}, f)
  os.replace(path + ".tmp", path)
  return unreadable


def encode_batch(encode, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The VAE posterior (mean, std) of images [n <= batch_size, R, R, 3] in [-1, 1], with
  `encode` from `vae.batch_codec`: padded to the full batch (one compilation for every batch,
  the last one too), the padding dropped."""
  padded = np.concatenate([images, np.repeat(images[-1:], batch_size - len(images), 0)])
  mean, std = (np.asarray(a)[:len(images)] for a in encode(padded))
  return mean, std


class Progress:
  """Logs images done, images/s and the ETA at most every `every_s` seconds."""

  def __init__(self, total: int, every_s: float = 10.0):
    self.total, self.done, self.every_s = total, 0, every_s
    self.start = self.last = time.perf_counter()

  def __call__(self, count: int) -> None:
    self.done += count
    now = time.perf_counter()
    if now - self.last >= self.every_s or self.done >= self.total:
      rate = self.done / max(now - self.start, 1e-9)
      logging.info("%d/%d images  %.1f images/s  ETA %.0f s", self.done, self.total, rate,
                   (self.total - self.done) / max(rate, 1e-9))
      self.last = now


def precompute(source: str, vae_dir: str, out: str, *, resolution: int = 256,
               flip: bool = False, max_images: int | None = None, shard_size: int = 10_000,
               batch_size: int = 64, data_dir: str | None = None, dtype: str = "float32",
               devices=None) -> dict:
  """The `python -m sgjax.latents` command as a function; returns the manifest."""
  check_local_out(out)
  collection = images_lib.open_images(source, data_dir)
  model = vae_lib.load(vae_dir, dtype)
  if resolution % model.cfg.downsample_factor:
    raise ValueError(f"--resolution={resolution} is not a multiple of the VAE's downsampling"
                     f" factor {model.cfg.downsample_factor}.")
  # Hosts encode their own shards: each over its local devices, with no collectives.
  mesh = sharding.make_mesh("data", devices=devices or jax.local_devices())
  devices_count = sharding.data_parallel_size(mesh)
  if batch_size % devices_count:
    raise ValueError(f"--batch_size={batch_size} must be divisible by the {devices_count}"
                     " devices.")
  num_images = len(collection) if max_images is None else min(max_images, len(collection))
  entries = [(i, f) for i in range(num_images) for f in ((False, True) if flip else (False,))]
  num_shards = -(-len(entries) // shard_size)
  spec = {"source": source, "vae": os.path.abspath(vae_dir),
          "vae_config": vars(model.cfg),
          "images_sha256": hashlib.sha256("\n".join(
              collection.name(i) for i in range(num_images)).encode()).hexdigest(),
          "scaling_factor": model.cfg.scaling_factor, "resolution": resolution,
          "latent_shape": [resolution // model.cfg.downsample_factor] * 2
                          + [model.cfg.latent_channels],
          "flip": flip, "num_images": num_images, "num_shards": num_shards,
          "shard_size": shard_size, "class_names": list(collection.class_names)}
  os.makedirs(out, exist_ok=True)
  check_same_run(out, spec)
  mine = range(jax.process_index(), num_shards, jax.process_count())
  todo = [k for k in mine if not os.path.exists(shard_path(out, k, num_shards))]
  if len(todo) < len(mine):
    logging.info("resuming: %d of this host's %d shards are complete", len(mine) - len(todo),
                 len(mine))
  encode, _ = vae_lib.batch_codec(model, mesh)
  progress = Progress(sum(len(entries[k * shard_size:(k + 1) * shard_size]) for k in todo))
  for k in todo:
    _encode_shard(collection, entries[k * shard_size:(k + 1) * shard_size], encode,
                  resolution, batch_size, shard_path(out, k, num_shards), progress)
  multihost_utils.sync_global_devices("sgjax.latents: shards written")
  return _write_manifest(out, spec)


def check_local_out(out: str) -> None:
  if paths.is_remote(out):
    raise ValueError(f"--out={out!r}: ArrayRecord shards are written as local files; write"
                     " them to a local or mounted folder, then copy them to the bucket"
                     " (`gcloud storage cp -r OUT gs://...`): training reads gs:// shards.")


def check_same_run(out: str, spec: dict) -> None:
  """Refuses an `out` whose spec.json differs from `spec` (naming the fields); writes it when
  there is none yet (a fresh run)."""
  path = os.path.join(out, "spec.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    spec = json.loads(json.dumps(spec))  # tuples as lists, as saved
    if saved != spec:
      changed = sorted(k for k in set(saved) | set(spec) if saved.get(k) != spec.get(k))
      raise ValueError(f"--out={out!r} holds records made with other settings ({changed});"
                       " use another folder or the same settings to resume.")
  elif jax.process_index() == 0:  # atomically: other hosts may be reading it
    with open(path + ".tmp", "w") as f:
      json.dump(spec, f, indent=2)
    os.replace(path + ".tmp", path)


def _write_manifest(out: str, spec: dict) -> dict:
  shards = sorted(glob.glob(os.path.join(out, "train-*.array_record")))
  unreadable = {}  # by image: with --flip both copies of a bad image fail
  for shard in shards:
    with open(shard + ".json") as f:
      unreadable.update((u["index"], u) for u in json.load(f)["unreadable"])
  unreadable = [unreadable[i] for i in sorted(unreadable)]
  records = sum(len(sources.LatentSource(shard, 1.0)) for shard in shards)
  manifest = {**spec, "num_records": records, "shards": [os.path.basename(s) for s in shards],
              "unreadable": unreadable, "num_unreadable": len(unreadable)}
  if jax.process_index() == 0:
    with open(os.path.join(out, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
  if unreadable:
    logging.warning("%d images could not be read (listed in %s), e.g. %s: %s",
                    len(unreadable), os.path.join(out, MANIFEST), unreadable[0]["name"],
                    unreadable[0]["error"])
  logging.info("%d records in %d shards -> %s", records, len(shards), out)
  return manifest


def define_flags() -> None:
  flags.DEFINE_string("source", None, "folder:DIR (one sub-folder per class) or"
                      " tfds:NAME[:SPLIT].")
  flags.DEFINE_string("data_dir", None, "tfds data_dir.")
  flags.DEFINE_string("vae", None, "diffusers AutoencoderKL folder (config.json +"
                      " diffusion_pytorch_model.safetensors), e.g. sd-vae-ft-ema.")
  flags.DEFINE_string("out", None, "Output folder for the shards and manifest.json.")
  flags.DEFINE_integer("resolution", 256, "Image side after ADM's center crop.")
  flags.DEFINE_bool("flip", False, "Also encode a horizontally flipped copy of every image"
                    " (encoded separately: the latent of a flipped image is not the flipped"
                    " latent).")
  flags.DEFINE_integer("max_images", None, "Encode only the first N images.")
  flags.DEFINE_integer("shard_size", 10_000, "Records per shard (the unit of resumption).")
  flags.DEFINE_integer("batch_size", 64, "Images per encoder batch (over all devices).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "VAE compute dtype.")
  distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize_from_flags()
  logs.quiet_libraries()
  precompute(FLAGS.source, FLAGS.vae, FLAGS.out, resolution=FLAGS.resolution, flip=FLAGS.flip,
             max_images=FLAGS.max_images, shard_size=FLAGS.shard_size,
             batch_size=FLAGS.batch_size, data_dir=FLAGS.data_dir, dtype=FLAGS.dtype)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["source", "vae", "out"])
  cli.run(main)
