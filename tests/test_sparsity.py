import chex
import jax
import numpy as np
import pytest

from sgjax import sparsity
from sgjax.sparsity import Route


@pytest.mark.parametrize("n,gamma,expected", [(256, 0.0, 256), (256, 0.5, 128),
                                              (256, 0.9, 26), (64, 0.3, 45), (10, 0.99, 1)])
def test_num_kept_follows_tread_rule(n, gamma, expected):
  assert sparsity.num_kept(n, gamma) == expected


@pytest.mark.parametrize("gamma", [-0.1, 1.0, 1.5])
def test_gamma_outside_unit_interval_raises(gamma):
  with pytest.raises(ValueError, match="gamma"):
    sparsity.num_kept(64, gamma)


def test_subset_has_exactly_k_distinct_tokens_and_partitions_the_sequence():
  subset = sparsity.random_subset(jax.random.key(0), 16, 64, 0.7)
  k = sparsity.num_kept(64, 0.7)
  chex.assert_shape(subset.keep, (16, k))
  chex.assert_shape(subset.drop, (16, 64 - k))
  everything = np.sort(np.concatenate([subset.keep, subset.drop], axis=1), axis=1)
  chex.assert_trees_all_equal(everything, np.tile(np.arange(64), (16, 1)))
  chex.assert_trees_all_equal(np.asarray(sparsity.keep_mask(subset)).sum(1), np.full(16, k))


def test_same_key_same_tokens_other_key_other_tokens():
  a = sparsity.random_subset(jax.random.key(3), 4, 64, 0.5)
  b = sparsity.random_subset(jax.random.key(3), 4, 64, 0.5)
  c = sparsity.random_subset(jax.random.key(4), 4, 64, 0.5)
  chex.assert_trees_all_equal(a, b)
  assert (np.sort(a.keep, 1) != np.sort(c.keep, 1)).any()
  # Samples of one batch draw different subsets too.
  assert (np.sort(a.keep[0]) != np.sort(a.keep[1])).any()


def test_gather_then_merge_round_trips():
  x = jax.random.normal(jax.random.key(0), (3, 20, 5))
  subset = sparsity.random_subset(jax.random.key(1), 3, 20, 0.4)
  kept, dropped = sparsity.gather(x, subset.keep), sparsity.gather(x, subset.drop)
  chex.assert_trees_all_equal(sparsity.merge(kept, dropped, subset), x)
  # The kept tokens are really the ones the mask marks.
  mask = np.asarray(sparsity.keep_mask(subset))
  for b in range(3):
    chex.assert_trees_all_equal(np.flatnonzero(mask[b]), np.sort(subset.keep[b]))


@pytest.mark.parametrize("routes,match", [
    ((Route(2, 12, 0.5),), "end < depth=12"),
    ((Route(-1, 3, 0.5),), "start"),
    ((Route(5, 3, 0.5),), "start <= end"),
    ((Route(1, 4, 0.5), Route(4, 6, 0.5)), "overlaps"),
    ((Route(1, 4, 1.0),), "gamma"),
])
def test_invalid_routes_raise_naming_the_route(routes, match):
  with pytest.raises(ValueError, match=match):
    sparsity.check_routes(routes, depth=12)
