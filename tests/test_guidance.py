import dataclasses
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax import guidance
from sgjax.guidance import GuidanceConfig

SG_FID = GuidanceConfig(rule="ag+sg", omega=1.5, schedule="cosine", gamma_strong=0.0,
                        gamma_strong_end=0.6, gamma_weak=0.6, gamma_weak_end=0.0)


@pytest.mark.parametrize("variant", [jax.jit, lambda f: f], ids=["jit", "eager"])
def test_omega_one_is_the_strong_branch_and_the_rule_is_linear(variant):
  a, b = jax.random.normal(jax.random.key(0), (2, 4, 3))
  guided = variant(guidance.guided_velocity)
  chex.assert_trees_all_equal(guided(a, b, 1.0), a)
  chex.assert_trees_all_close(guided(a, b, 1.5), a + 0.5 * (a - b), rtol=0, atol=1e-6)
  chex.assert_trees_all_close(guided(a, b, -0.5), 1.5 * b - 0.5 * a, rtol=0, atol=1e-6)
  chex.assert_trees_all_close(guided(a, a, 3.0), a, rtol=0, atol=1e-6)


def test_icg_weak_label_is_uniform_over_all_classes_independent_of_the_true_one():
  num_classes = 5
  labels = jnp.tile(jnp.arange(num_classes), 2000)
  drawn = guidance.independent_labels(jax.random.key(0), labels, num_classes)
  chex.assert_equal_shape((drawn, labels))
  chex.assert_type(drawn, labels.dtype)
  # Sadat et al.: c_rand ~ p(c), so each (label, drawn) pair, the diagonal included, about
  # 2000 / 5 = 400 times (binomial sd 18).
  counts = np.zeros((num_classes, num_classes))
  np.add.at(counts, (np.asarray(labels), np.asarray(drawn)), 1)
  assert counts.min() > 330 and counts.max() < 470, counts


def test_weak_labels_per_rule():
  labels = jnp.array([0, 3, 9])
  key = jax.random.key(1)
  for rule in ("cfg", "cfg+sg"):
    chex.assert_trees_all_equal(guidance.weak_labels(rule, labels, key, 10), jnp.full(3, 10))
  for rule in ("sg", "ag", "ag+sg"):
    chex.assert_trees_all_equal(guidance.weak_labels(rule, labels, key, 10), labels)
  icg = np.asarray(guidance.weak_labels("icg", jnp.zeros(1000, jnp.int32), key, 10))
  # Independent of the true class 0: every class, class 0 itself about a tenth of the time.
  assert set(icg.tolist()) == set(range(10)) and 70 < np.sum(icg == 0) < 130


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
  chex.assert_trees_all_close(np.add(strong, weak), np.full(40, 0.6), rtol=0, atol=1e-12)
  # Quantised: at most num_levels distinct rates per branch.
  assert len(set(strong)) == len(set(weak)) == SG_FID.num_levels
  # Unquantised it follows the cosine; at the midpoint both rates are near 0.3.
  assert abs(guidance.cosine_weight(20, 41) - 0.5) < 1e-12
  fine = dataclasses.replace(SG_FID, num_levels=1001)
  mid = guidance.step_settings(fine, 41)[20]
  assert abs(mid.gamma_strong - 0.3) < 1e-3 and abs(mid.gamma_weak - 0.3) < 1e-3


def test_exact_cosine_schedule_follows_the_formula_at_every_step():
  exact = dataclasses.replace(SG_FID, num_levels=0).validate()
  assert exact.slug.endswith("-exact")
  steps = 40
  settings = guidance.step_settings(exact, steps)
  weight = 0.5 * (1 + np.cos(np.pi * np.arange(steps) / (steps - 1)))
  chex.assert_trees_all_close(np.array([s.gamma_strong for s in settings]), 0.6 * (1 - weight),
                              rtol=0, atol=1e-12)
  chex.assert_trees_all_close(np.array([s.gamma_weak for s in settings]), 0.6 * weight, rtol=0,
                              atol=1e-12)
  # The rounded default misses the cosine by up to half a level (0.6 / 7 / 2).
  rounded = [s.gamma_weak for s in guidance.step_settings(SG_FID, steps)]
  assert 0.03 < np.max(np.abs(np.subtract(rounded, 0.6 * weight))) <= 0.6 / 14 + 1e-12


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


def test_sparsity_gap_rules_given_no_gamma_take_the_papers_sg_flops_rates():
  for rule in guidance.SPARSITY_GAP_RULES:
    gammas = guidance.default_gammas(rule, None, None)
    assert gammas == (0.5, 0.9)
    GuidanceConfig(rule=rule, gamma_strong=gammas[0], gamma_weak=gammas[1]).validate()
  assert guidance.default_gammas("cfg", None, None) == (0.0, 0.0)  # dense
  assert guidance.default_gammas("sg", None, 0.6) == (0.0, 0.6)  # one given: the other is 0
  assert guidance.default_gammas("cfg+sg", 0.2, 0.7) == (0.2, 0.7)
