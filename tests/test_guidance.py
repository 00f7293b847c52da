import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax import guidance
from sgjax.guidance import GuidanceConfig

SG_FID = GuidanceConfig(rule="ag+sg", omega=1.5, schedule="cosine", gamma_strong=0.0,
                        gamma_strong_end=0.6, gamma_weak=0.6, gamma_weak_end=0.0)


def test_omega_one_is_the_strong_branch_and_the_rule_is_linear():
  a, b = jax.random.normal(jax.random.key(0), (2, 4, 3))
  np.testing.assert_array_equal(guidance.guided_velocity(a, b, 1.0), a)
  np.testing.assert_allclose(guidance.guided_velocity(a, b, 1.5), a + 0.5 * (a - b), atol=1e-6)
  np.testing.assert_allclose(guidance.guided_velocity(a, a, 3.0), a, atol=1e-6)


def test_icg_weak_label_is_never_the_true_label_and_covers_the_others():
  num_classes = 5
  labels = jnp.tile(jnp.arange(num_classes), 2000)
  other = guidance.random_other_labels(jax.random.key(0), labels, num_classes)
  assert other.dtype == labels.dtype
  assert not np.any(np.asarray(other == labels))
  assert np.asarray(other).min() >= 0 and np.asarray(other).max() < num_classes
  # Uniform over the 4 other classes: each (label, other) pair about 2000 / 4 times.
  counts = np.zeros((num_classes, num_classes))
  np.add.at(counts, (np.asarray(labels), np.asarray(other)), 1)
  off_diagonal = counts[~np.eye(num_classes, dtype=bool)]
  assert off_diagonal.min() > 400 and off_diagonal.max() < 600, counts


def test_weak_labels_per_rule():
  labels = jnp.array([0, 3, 9])
  key = jax.random.key(1)
  for rule in ("cfg", "cfg+sg"):
    np.testing.assert_array_equal(guidance.weak_labels(rule, labels, key, 10), [10, 10, 10])
  for rule in ("sg", "ag", "ag+sg"):
    np.testing.assert_array_equal(guidance.weak_labels(rule, labels, key, 10), labels)
  assert not np.any(np.asarray(guidance.weak_labels("icg", labels, key, 10) == labels))


def test_constant_schedule_and_guidance_interval():
  g = GuidanceConfig(rule="sg", gamma_strong=0.5, gamma_weak=0.9, interval=(0.25, 0.5))
  settings = guidance.step_settings(g.validate(), 8)
  assert [s.t for s in settings] == [i / 8 for i in range(8)]
  assert all(s.gamma_strong == 0.5 for s in settings)
  assert [s.guided for s in settings] == [False, False, True, True, True, False, False, False]
  assert {s.gamma_weak for s in settings if s.guided} == {0.9}
  # Rule none: never guided.
  assert not any(s.guided for s in guidance.step_settings(GuidanceConfig("none"), 4))


def test_cosine_schedule_of_the_papers_best_setting():
  settings = guidance.step_settings(SG_FID.validate(), 40)
  strong = [s.gamma_strong for s in settings]
  weak = [s.gamma_weak for s in settings]
  # Main model 0 -> 0.6, auxiliary 0.6 -> 0, exact at both ends, monotone in between.
  assert (strong[0], strong[-1], weak[0], weak[-1]) == (0.0, 0.6, 0.6, 0.0)
  assert strong == sorted(strong) and weak == sorted(weak, reverse=True)
  np.testing.assert_allclose(np.add(strong, weak), 0.6, atol=1e-12)
  # Quantised: at most num_levels distinct rates per branch.
  assert len(set(strong)) == len(set(weak)) == SG_FID.num_levels
  # Unquantised it follows the cosine; at the midpoint both rates are near 0.3.
  assert abs(guidance.cosine_weight(20, 41) - 0.5) < 1e-12
  fine = dataclasses.replace(SG_FID, num_levels=1001)
  mid = guidance.step_settings(fine, 41)[20]
  assert abs(mid.gamma_strong - 0.3) < 1e-3 and abs(mid.gamma_weak - 0.3) < 1e-3


@pytest.mark.parametrize("fields,match", [
    (dict(rule="sparse"), "rule='sparse'"),
    (dict(schedule="linear"), "schedule='linear'"),
    (dict(rule="sg", gamma_strong=0.9, gamma_weak=0.5),
     r"gamma_strong=0.9 must be < guidance.gamma_weak=0.5 for rule 'sg'"),
    (dict(rule="sg", gamma_strong=0.5, gamma_weak=0.5), "gamma_strong=0.5 must be <"),
    (dict(rule="cfg+sg", gamma_strong=0.7, gamma_weak=0.2), "rule 'cfg\\+sg'"),
    (dict(rule="sg", schedule="cosine", gamma_strong=0.1, gamma_weak=0.5, gamma_strong_end=0.6),
     "gamma_strong_end=0.6 must be <"),
    (dict(gamma_weak=1.0), r"guidance.gamma_weak=1.0: a sparsity rate must lie in \[0, 1\)"),
    (dict(gamma_strong=-0.1), "guidance.gamma_strong=-0.1"),
    (dict(gamma_weak_end=0.5), "gamma_weak_end=0.5 is set but guidance.schedule='constant'"),
    (dict(interval=(0.8, 0.2)), "interval"),
    (dict(schedule="cosine", num_levels=1), "num_levels=1"),
    (dict(omega=float("nan")), "omega=nan"),
])
def test_invalid_guidance_raises_value_error_naming_field_and_value(fields, match):
  with pytest.raises(ValueError, match=match):
    GuidanceConfig(**fields).validate()


def test_omega_below_one_warns():
  with pytest.warns(UserWarning, match="omega=0.8"):
    GuidanceConfig(rule="cfg", omega=0.8).validate()


def test_ag_sg_with_a_never_sparser_auxiliary_warns_but_the_papers_setting_does_not():
  with pytest.warns(UserWarning, match="ag\\+sg"):
    GuidanceConfig(rule="ag+sg", gamma_strong=0.6, gamma_weak=0.2).validate()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    SG_FID.validate()
    GuidanceConfig(rule="sg", omega=1.5, gamma_strong=0.5, gamma_weak=0.9).validate()
    GuidanceConfig(rule="none", omega=1.0).validate()
