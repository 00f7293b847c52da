"""Input sources and the grain pipeline."""

import chex
import numpy as np
import pytest
# Imported here, not lazily inside a test: Python 3.11's parser can fail ("AST constructor
# recursion depth mismatch") when pytest rewrites a module imported deep in a call stack.
from tensorflow_datasets.testing import mocking as tfds_mocking

from configs import imagenet256
from sgjax import train
from sgjax.data import pipeline, sources
from sgjax.models import trdit
from sgjax.text import conditioning
from tests import helpers


def test_digits_split_is_fixed_disjoint_and_in_model_units():
  train_images, train_labels = sources.digits_split("train")
  held_images, _ = sources.digits_split("heldout")
  assert train_images.shape == (1500, 8, 8, 1) and held_images.shape == (297, 8, 8, 1)
  chex.assert_trees_all_equal(sources.digits_split("train")[1], train_labels)
  source = sources.ArraySource(sources.from_uint8(train_images), train_labels)
  item = source[0]
  assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
  chex.assert_trees_all_equal(sources.to_uint8(sources.from_uint8(train_images)), train_images)


def _batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def _global_batches(source, n, hosts, **kwargs):
  """The first n global batches of a run on `hosts` hosts, each host's rows in place."""
  its = [pipeline.make_iterator(source, shard_index=i, shard_count=hosts, **kwargs)
         for i in range(hosts)]
  return [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
          for parts in zip(*[_batches(it, n) for it in its])]


def _labels(batches):
  return np.stack([b["label"] for b in batches])


def test_pipeline_is_seeded_and_epochs_are_fresh_permutations():
  source = sources.ArraySource(np.zeros((40, 1, 1, 1), np.float32), np.arange(40, dtype=np.int32))
  a = _batches(pipeline.make_iterator(source, global_batch=8, seed=1), 10)
  chex.assert_trees_all_equal(
      a, _batches(pipeline.make_iterator(source, global_batch=8, seed=1), 10))
  assert not np.array_equal(
      _labels(a), _labels(_batches(pipeline.make_iterator(source, global_batch=8, seed=2), 10)))
  epochs = [np.concatenate([b["label"] for b in a[i:i + 5]]) for i in (0, 5)]
  assert all(sorted(e) == list(range(40)) for e in epochs)  # every example once per epoch
  assert not np.array_equal(epochs[0], epochs[1])


def test_global_batches_do_not_depend_on_host_count_and_resume_at_any_step():
  images = np.arange(80, dtype=np.float32).reshape(40, 1, 2, 1)  # flips show
  source = sources.ArraySource(images, np.arange(40, dtype=np.int32))
  kw = dict(global_batch=8, seed=3, flip=True)
  one = _global_batches(source, 12, 1, **kw)  # crosses an epoch boundary
  for hosts in (2, 4, 8):
    runs = _global_batches(source, 12, hosts, **kw)
    chex.assert_trees_all_equal(one, runs, custom_message=f"{hosts} hosts")
  # A run resumed at step 7 on 2 hosts continues the 1-host stream exactly.
  chex.assert_trees_all_equal(one[7:], _global_batches(source, 5, 2, start_step=7, **kw))
  # Hosts read disjoint rows: every example of an epoch exactly once over all hosts.
  assert sorted(np.concatenate([b["label"] for b in one[:5]])) == list(range(40))
  with pytest.raises(ValueError, match="does not split evenly over 3 hosts"):
    pipeline.make_iterator(source, global_batch=8, seed=0, shard_count=3)


def test_flips_mirror_images_horizontally_only():
  image = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1).repeat(64, 0)
  source = sources.ArraySource(image, np.zeros(64, np.int32))
  batch = next(pipeline.make_iterator(source, global_batch=64, seed=0, flip=True))["image"]
  flipped = np.array([np.array_equal(b, image[0, :, ::-1]) for b in batch])
  kept = np.array([np.array_equal(b, image[0]) for b in batch])
  assert np.all(flipped | kept) and 10 < flipped.sum() < 54


def test_latent_shards_round_trip_with_scale(tmp_path):
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((6, 4, 4, 4)).astype(np.float16)
  for shard in range(2):
    rows = range(3 * shard, 3 * shard + 3)
    helpers.write_latent_shard(str(tmp_path / f"train-{shard:05d}.array_record"),
                               latents[rows.start:rows.stop], [i % 5 for i in rows])
  source = sources.LatentSource(str(tmp_path / "train-*.array_record"), scale=0.5)
  assert len(source) == 6
  items = [source[i] for i in range(6)]
  got = sorted((int(item["label"]), item["image"].tobytes()) for item in items)
  want = sorted((i % 5, (latents[i].astype(np.float32) * 0.5).tobytes()) for i in range(6))
  assert got == want
  with pytest.raises(FileNotFoundError, match="matches no ArrayRecord shard"):
    sources.LatentSource(str(tmp_path / "missing-*"), scale=1.0)


def test_caption_records_batch_their_hidden_states_and_masks(tmp_path):
  """Precomputed text (t2i's scalable path): records hold a latent, its caption's hidden
  states and mask, and no label; batches carry them to a model of matching shape."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  writer = array_record_module.ArrayRecordWriter(str(tmp_path / "t2i.array_record"),
                                                 "group_size:1")
  for i in range(8):
    writer.write(sources.encode_latent_record(
        rng.standard_normal((4, 4, 4)).astype(np.float16), None,
        text=np.full((5, 6), i, np.float16), mask=np.arange(5) < 1 + i % 5))
  writer.close()
  source = sources.LatentSource(str(tmp_path / "*.array_record"), scale=1.0)
  batch = next(pipeline.make_iterator(source, global_batch=4, seed=0))
  assert set(batch) == {"image", "text", "mask"}
  assert batch["text"].shape == (4, 5, 6) and batch["mask"].dtype == bool
  chex.assert_trees_all_equal(batch["mask"].sum(1), 1 + batch["text"][:, 0, 0] % 5)
  model_cfg = trdit.TRDiTConfig(input_size=4, text_length=5, text_width=6)
  conditioning.check_batch(batch, model_cfg, "batch")
  with pytest.raises(ValueError, match=r"shape \(5, 6\), but the model takes \(5, 8\)"):
    conditioning.check_batch(batch, trdit.TRDiTConfig(text_length=5, text_width=8), "batch")


def test_tfds_source_reads_prepared_data_and_fails_fast_when_missing(tmp_path):
  with tfds_mocking.mock_data(num_examples=6):
    source = sources.TfdsSource("mnist", "train", None, image_size=16)
    item = source[0]
    assert len(source) == 6 and item["image"].shape == (16, 16, 1)
    assert item["image"].dtype == np.float32 and -1.0 <= item["image"].min()
  with pytest.raises(FileNotFoundError, match="never downloads"):
    sources.TfdsSource("mnist", "train", str(tmp_path), image_size=28)


@pytest.mark.parametrize("arg", ["runlocal", "runlocal,sparsity=masking"])
def test_imagenet_runlocal_trains_on_synthetic_latents(tmp_path, arg):
  config = imagenet256.get_config(arg)
  config.train.update(steps=3, ckpt_every=3, log_every=1)
  last = train.train(config, str(tmp_path / "w"))
  assert np.isfinite(last["loss"]) and last["loss"] > 0
