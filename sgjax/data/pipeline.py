"""grain input pipeline: per-host shard, seeded shuffle, optional flips, fixed-size batches.

The iterator's state (grain `get_state`/`set_state`) is saved in every checkpoint, so a
resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import grain
import numpy as np


def _flip(item, rng: np.random.Generator):
  if rng.random() < 0.5:
    item = dict(item, image=item["image"][:, ::-1])
  return item


def make_iterator(source, *, batch_size: int, seed: int, flip: bool = False,
                  num_workers: int = 0, shard_index: int = 0, shard_count: int = 1):
  """An endless iterator of {"image": [b, H, W, C] float32, "label": [b] int32} batches.

  `batch_size` is this host's share of the global batch; host `shard_index` of
  `shard_count` reads only its own slice of the data.
  """
  if len(source) < shard_count:
    raise ValueError(f"the dataset has {len(source)} items, fewer than the {shard_count} hosts.")
  ds = grain.MapDataset.source(source).seed(seed)[shard_index::shard_count].shuffle()
  if flip:
    ds = ds.random_map(_flip)
  ds = ds.map(lambda item: {"image": np.ascontiguousarray(item["image"], np.float32),
                            "label": np.int32(item["label"])})
  ds = ds.repeat().batch(batch_size, drop_remainder=True).to_iter_dataset()
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)
