"""grain input pipeline: one global seeded order, sliced per host; latents drawn from VAE
posteriors; optional flips.

The order of examples, and so every global batch, depends only on the seed and the global
batch size: host `i` of `n` reads the rows [i * b / n, (i + 1) * b / n) of each global batch,
which is where `jax.make_array_from_process_local_data` puts them. A run gives the same
batches on 1 or 64 hosts, and the position in the stream is a pure function of the step, so
a run resumes at any step with any number of hosts, without iterator state in checkpoints.
"""

from __future__ import annotations

import grain
import numpy as np


def _sample_posterior(item, rng: np.random.Generator):
  """z = mean + std * eps for an item that holds a VAE posterior (`std`)."""
  item = dict(item)
  eps = rng.standard_normal(item["image"].shape, np.float32)
  item["image"] = item["image"] + item.pop("std") * eps
  return item


def _flip(item, rng: np.random.Generator):
  if rng.random() < 0.5:
    item = dict(item, image=item["image"][:, ::-1])
  return item


def _as_arrays(item):
  """Images float32, labels int32, any other field (captions' tokens, text hidden states and
  masks) as it is."""
  out = {name: np.asarray(value) for name, value in item.items()}
  out["image"] = np.ascontiguousarray(item["image"], np.float32)
  if "label" in item:
    out["label"] = np.int32(item["label"])
  return out


def check_batch(batch: dict, image_shape: tuple[int, int, int], num_classes: int | None,
                where: str) -> None:
  """Raises ValueError, naming the problem, when a batch {"image": [B, H, W, C], "label": [B]}
  does not fit a model taking `image_shape` images and labels in [0, num_classes)
  (num_classes None: a text-to-image batch, whose text `sgjax.text.conditioning` checks)."""
  shape = tuple(np.shape(batch["image"])[1:])
  if shape != tuple(image_shape):
    raise ValueError(f"{where}: images of shape {shape}, but the model takes {image_shape}"
                     " (model.input_size x model.input_size x model.in_channels); set"
                     " data.image_size or the model to match.")
  if num_classes is None:
    return
  labels = np.asarray(batch["label"])
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{where}: labels in [{labels.min()}, {labels.max()}], but"
                     f" model.num_classes={num_classes} takes labels in [0, {num_classes})"
                     f" (label {num_classes} is the null class of guidance).")


def make_iterator(source, *, global_batch: int, seed: int, flip: bool = False,
                  start_step: int = 0, num_workers: int = 0, read_threads: int = 4,
                  shard_index: int = 0, shard_count: int = 1):
  """An endless iterator of this host's share of the global batches, from batch `start_step`:
  {"image": [global_batch / shard_count, H, W, C] float32, "label": [...] int32} (or, for
  text-to-image sources, the caption's "tokens" or "text" and "mask" in place of "label").

  `num_workers` > 0 builds batches in that many processes (each takes every n-th batch);
  within each process (or in this one) `read_threads` threads build batches ahead of the
  train loop, and at most `read_threads` finished batches wait. Grain's default would let
  500 *batches* pile up per process (its buffer counts elements, here whole batches): GiBs
  of latents, and far more for captions' hidden states. 0: no threads, each batch is built
  when the loop asks for it. Neither setting changes the batches.

  Each epoch is a fresh permutation of `source` (grain reseeds the shuffle per epoch); the
  latent drawn from a posterior and the flip are drawn per example from the seed and the
  example's position in the global stream, so they differ every time an example returns.
  """
  if not len(source):
    raise ValueError("the dataset is empty.")
  if global_batch % shard_count:
    raise ValueError(f"the global batch {global_batch} does not split evenly over"
                     f" {shard_count} hosts.")
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  if "std" in source[0]:
    if flip:
      raise ValueError("data.flip=True would flip latents drawn from VAE posteriors, and the"
                       " latent of a flipped image is not the flipped latent: set"
                       " data.flip=False and encode flipped copies with"
                       " `python -m sgjax.latents --flip` instead.")
    ds = ds.random_map(_sample_posterior)
  if flip:
    ds = ds.random_map(_flip)
  ds = ds.map(_as_arrays).batch(global_batch // shard_count, drop_remainder=True)
  # Local batch j of global batch s is element s * shard_count + j of the batched stream.
  ds = ds[shard_index::shard_count][start_step:].to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_threads))
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)
