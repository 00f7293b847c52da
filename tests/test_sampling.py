import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgjax import flops, sampling, sharding, sparsity
from sgjax.guidance import GuidanceConfig
from sgjax.models import dit
from sgjax.sparsity import Route
from tests.helpers import batch, perturbed_model, tiny_config

SG = GuidanceConfig(rule="sg", omega=1.5, gamma_strong=0.25, gamma_weak=0.75)


# Three blocks, the middle one routed: every compiled model copy is small.
CONFIG = tiny_config("routing", depth=3, routes=(Route(1, 1, 0.5),))


@pytest.fixture(scope="module")
def model():
  return perturbed_model(CONFIG)


@pytest.fixture(scope="module")
def aux_model():
  return perturbed_model(CONFIG, seed=7)


def segment(cfg, gamma_strong, gamma_weak):
  """A one-step segment, for evaluating settings that `validate` rejects on purpose."""
  kept = lambda g: None if g is None else sparsity.num_kept(cfg.num_tokens, g)
  return sampling.Segment(0, 1, gamma_strong, gamma_weak, kept(gamma_strong), kept(gamma_weak))


@functools.partial(jax.jit, static_argnames=("graphdef", "rule", "seg", "nested"))
def _branch(state, x, t, y, key, omega, *, graphdef, rule, seg, nested):
  model = nnx.merge(graphdef, state)
  return sampling.branch_velocity(model, None, rule, seg, x, t, y, key, omega, nested)


def branch_velocity(model, rule, gamma_strong, gamma_weak, omega=1.5, key=0, nested=False,
                    labels=None):
  """sampling.branch_velocity on the test batch, jitted once per static setting.

  gamma_weak=None evaluates the strong branch alone: the plain prediction at gamma_strong.
  """
  x, t, y = batch(model.cfg)
  graphdef, state = nnx.split(model)
  return _branch(state, x, t, y if labels is None else labels, jax.random.key(key),
                 jnp.float32(omega), graphdef=graphdef, rule=rule,
                 seg=segment(model.cfg, gamma_strong, gamma_weak), nested=nested)


def test_sg_with_both_gammas_zero_is_the_plain_conditional_prediction(model):
  plain = branch_velocity(model, "none", 0.0, None)
  for omega in (1.5, 3.0):
    np.testing.assert_allclose(branch_velocity(model, "sg", 0.0, 0.0, omega), plain, atol=1e-5)
  # Equal non-zero gammas with nested subsets: both branches see the same tokens.
  strong = branch_velocity(model, "none", 0.5, None, key=3)
  np.testing.assert_allclose(branch_velocity(model, "sg", 0.5, 0.5, 2.0, key=3, nested=True),
                             strong, atol=1e-5)
  assert np.abs(np.asarray(strong - plain)).max() > 1e-3


def test_cfg_sg_with_both_gammas_zero_is_cfg(model):
  _, _, y = batch(model.cfg)
  null = jnp.full_like(y, model.cfg.num_classes)
  cfg = (2.0 * branch_velocity(model, "none", 0.0, None)
         - branch_velocity(model, "none", 0.0, None, labels=null))
  np.testing.assert_allclose(branch_velocity(model, "cfg+sg", 0.0, 0.0, 2.0), cfg, atol=1e-5)


@pytest.mark.parametrize("rule,gammas", [
    ("cfg", (0.0, 0.0)), ("sg", (0.25, 0.75)), ("cfg+sg", (0.25, 0.5)), ("icg", (0.0, 0.5)),
    ("ag", (0.0, 0.0)), ("ag+sg", (0.25, 0.5))])
def test_any_rule_with_omega_one_is_its_strong_branch_alone(model, aux_model, rule, gammas):
  x, t, y = batch(model.cfg)
  g = GuidanceConfig(rule, omega=1.0, gamma_strong=gammas[0], gamma_weak=gammas[1])
  aux = aux_model if g.uses_aux else None
  guided = sampling.Sampler(model, g, aux_model=aux).velocity(x, t, y, jax.random.key(4))
  strong = branch_velocity(model, "none", gammas[0], None, key=4)
  np.testing.assert_allclose(guided, strong, atol=1e-5)
  # ... and omega != 1 (same compilation: omega is a runtime argument) mixes in the weak one.
  mixed = sampling.Sampler(model, dataclasses.replace(g, omega=2.0), aux_model=aux)
  assert np.abs(np.asarray(mixed.velocity(x, t, y, jax.random.key(4)) - strong)).max() > 1e-3


def test_ag_with_the_main_model_as_auxiliary_is_the_plain_prediction(model):
  x, t, y = batch(model.cfg)
  ag = sampling.Sampler(model, GuidanceConfig("ag", omega=2.5), aux_model=model)
  np.testing.assert_allclose(ag.velocity(x, t, y, jax.random.key(0)),
                             branch_velocity(model, "none", 0.0, None), atol=1e-5)


def test_nested_subsets_keep_a_subset_of_the_denser_branchs_tokens(model):
  # nested=True draws both branches from one key: the sparser branch's kept tokens must be a
  # subset of the denser branch's.
  key = jax.random.key(5)
  (strong,), (weak,) = (model.draw_subsets(key, 8, g) for g in (0.25, 0.75))
  for s, w in zip(np.asarray(strong.keep), np.asarray(weak.keep)):
    assert set(w) < set(s)


def test_compiled_sampling_loop_flops_match_library_for_each_rule():
  # The FLOPs the library reports must be what the sampling loop computes. Inside a loop body
  # XLA does not merge two model calls' common work, so SG's shared prefix is done once only
  # because the sampler evaluates both branches as one packed call. Wide enough that matmuls
  # dominate, as in tests/test_flops.py; 3 steps make a real loop. Ratios to the unguided
  # loop, so how the cost analysis counts loop iterations cancels.
  cfg = tiny_config("routing", width=128, depth=6, num_heads=4, input_size=16, patch_size=2,
                    routes=(Route(1, 4, 0.5),))
  # Cost analysis needs shapes only: abstract models, no parameters initialised.
  model = nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(0)))
  aux = nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(1)))
  labels = np.arange(4) % cfg.num_classes

  def costs(guidance):
    sampler = sampling.Sampler(model, guidance, steps=3,
                               aux_model=aux if guidance.uses_aux else None)
    compiled = sampler.lower(labels, 0).compile().cost_analysis()["flops"]
    return compiled, sampler.plan.flops.true

  base_compiled, base_library = costs(GuidanceConfig("none"))
  for guidance in (GuidanceConfig("sg", gamma_strong=0.5, gamma_weak=0.9),
                   GuidanceConfig("sg", gamma_strong=0.0, gamma_weak=0.5),
                   GuidanceConfig("cfg"), GuidanceConfig("ag"),
                   GuidanceConfig("cfg+sg", gamma_strong=0.2, gamma_weak=0.7)):
    compiled, library = costs(guidance)
    ratio = (compiled / base_compiled) / (library / base_library)
    assert abs(ratio - 1) < 0.02, (guidance, compiled, library)


def test_sampling_is_deterministic_and_matches_across_device_counts(model):
  # ICG with sparse branches of equal shape: noise, token subsets and random labels are all
  # drawn inside the program, in one vmapped call (the cosine test below runs unequal ones).
  g = GuidanceConfig("icg", omega=1.5, gamma_strong=0.5, gamma_weak=0.5)
  labels = jnp.arange(8) % model.cfg.num_classes
  sampler = sampling.Sampler(model, g, steps=2)
  a, b = sampler(labels, 0), sampler(labels, jax.random.key(0))
  c = sampler(labels, 1)
  assert a.shape == (8, 8, 8, 2) and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a - c)).max() > 0.1
  assert sampler._sample._cache_size() == 1  # pylint: disable=protected-access
  mesh = sharding.make_mesh("data")
  sharded = sampling.Sampler(model, g, steps=2, mesh=mesh)(labels, 0)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(sharded, a, atol=1e-5)


def test_cosine_schedule_compiles_bounded_variants_and_reports_mean_step_flops(model):
  g = GuidanceConfig("sg", omega=1.5, schedule="cosine", gamma_strong=0.0,
                     gamma_strong_end=0.5, gamma_weak=0.5, gamma_weak_end=0.9, num_levels=3,
                     interval=(0.0, 0.8))
  steps = 12
  plan = sampling.make_plan(model.cfg, g, steps=steps)
  # Weights 1, 0.5, 0 (3 levels) while guided, then unguided steps at t > 0.8.
  assert [s.shape for s in plan.segments] == [(64, 32), (48, 20), (32, 7), (32, None)]
  assert plan.num_variants == 4 <= g.num_levels + 1
  assert plan.nfe == 2 * steps - 2
  # 40 steps at the default 8 levels: 7 guided levels before t = 0.8 and one unguided
  # segment after it, 8 variants rather than 40.
  many = sampling.make_plan(model.cfg, dataclasses.replace(g, num_levels=8), steps=40)
  assert len(many.segments) == many.num_variants == 8
  per_step = [flops.guided_step_flops(model.cfg, g, step=i, steps=steps) for i in range(steps)]
  assert plan.flops_per_step.true == pytest.approx(np.mean([f.true for f in per_step]))
  assert plan.flops_per_step.paper == pytest.approx(np.mean([f.paper for f in per_step]))
  summary = plan.summary()
  assert summary["gflops_true"] == pytest.approx(plan.flops.true / steps / 1e9)
  # Run a short one: 2 levels, 3 segments.
  sampler = sampling.Sampler(model, dataclasses.replace(g, num_levels=2), steps=6)
  assert [s.shape for s in sampler.plan.segments] == [(64, 32), (32, 7), (32, None)]
  images = sampler(jnp.arange(4), 0)
  assert np.all(np.isfinite(np.asarray(images)))
  # The whole trajectory is one program: one fori_loop per segment, compiled once.
  assert sampler._sample._cache_size() == 1  # pylint: disable=protected-access


def test_exact_cosine_schedule_runs_every_step_at_its_own_token_counts(model):
  g = GuidanceConfig("sg", omega=1.5, schedule="cosine", gamma_strong=0.0,
                     gamma_strong_end=0.5, gamma_weak=0.5, gamma_weak_end=0.9, num_levels=0)
  steps = 12
  plan = sampling.make_plan(model.cfg, g, steps=steps)
  n = model.cfg.num_tokens
  weight = 0.5 * (1 + np.cos(np.pi * np.arange(steps) / (steps - 1)))
  want = [(n - int(n * 0.5 * (1 - w)), n - int(n * (0.5 * w + 0.9 * (1 - w)))) for w in weight]
  got = [s.shape for s in plan.segments for _ in range(s.start, s.stop)]
  assert got == want
  # Consecutive steps share a segment only when both counts agree.
  shapes = [s.shape for s in plan.segments]
  assert all(a != b for a, b in zip(shapes, shapes[1:])) and len(shapes) > 8
  sampler = sampling.Sampler(model, g, steps=steps)
  assert sampler.plan == plan
  assert np.all(np.isfinite(np.asarray(sampler(jnp.arange(4), 0))))


def test_heun_doubles_evaluations_and_runs(model):
  g = GuidanceConfig("cfg", omega=1.5, gamma_strong=0.5, gamma_weak=0.5)
  images, plan = sampling.sample(model, g, jnp.arange(2), 0, steps=2, solver="heun")
  assert plan.nfe == 8 and images.shape == (2, 8, 8, 2)
  assert plan.flops == flops.trajectory_flops(model.cfg, g, steps=2, stages=2)
  assert plan.flops == 2 * flops.trajectory_flops(model.cfg, g, steps=2)
  assert np.all(np.isfinite(np.asarray(images)))


def test_euler_and_heun_integrate_a_known_velocity():
  # dx/dt = lam * x + 2 t  =>  x(1) = e^lam x0 + 2 (e^lam - 1 - lam) / lam^2.
  lam = -1.5
  x0 = jnp.linspace(-2.0, 2.0, 6)
  exact = np.exp(lam) * x0 + 2 * (np.exp(lam) - 1 - lam) / lam**2
  velocity = lambda x, t, step, stage, segment: lam * x + 2 * t

  def error(steps, solver):
    out = jax.jit(lambda x: sampling.integrate(velocity, x, steps=steps, solver=solver))(x0)
    return np.abs(np.asarray(out) - exact).max()

  assert error(2000, "euler") < 1e-3
  for steps in (10, 20, 40):
    assert error(steps, "heun") < 0.1 * error(steps, "euler")
  # Euler is first order, Heun second.
  assert 1.8 < error(10, "euler") / error(20, "euler") < 2.2
  assert 3.5 < error(10, "heun") / error(20, "heun") < 4.5


def test_euler_with_the_exact_velocity_of_a_point_mass_lands_on_it():
  # Flow matching to a single data point x1: v(x_t, t) = (x1 - x_t) / (1 - t).
  x1 = jnp.array([0.5, -1.0, 2.0])
  velocity = lambda x, t, step, stage, segment: (x1 - x) / (1 - t)
  out = sampling.integrate(velocity, jnp.zeros(3), steps=7, solver="euler")
  np.testing.assert_allclose(out, x1, atol=1e-5)


def test_bad_sampling_inputs_raise(model, aux_model):
  with pytest.raises(ValueError, match="rule='sgg'"):
    sampling.Sampler(model, GuidanceConfig("sgg"))
  with pytest.raises(ValueError, match="gamma_strong=0.9 must be < guidance.gamma_weak=0.5"):
    sampling.Sampler(model, GuidanceConfig("sg", gamma_strong=0.9, gamma_weak=0.5))
  with pytest.raises(ValueError, match="needs an aux_model"):
    sampling.Sampler(model, GuidanceConfig("ag"))
  with pytest.raises(ValueError, match="takes no aux_model"):
    sampling.Sampler(model, SG, aux_model=aux_model)
  with pytest.raises(ValueError, match="solver='rk4'"):
    sampling.Sampler(model, SG, solver="rk4")
  with pytest.raises(ValueError, match="dense"):
    sampling.make_plan(tiny_config("dense"), SG)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
    sampling.Sampler(model, SG, steps=1)(jnp.array([3, 10]), 0)
  with pytest.raises(ValueError, match="divisible by the 8"):
    sampling.Sampler(model, SG, steps=1, mesh=sharding.make_mesh("data"))(jnp.arange(4), 0)
  with pytest.warns(UserWarning, match="omega=0.5"):
    sampling.Sampler(model, GuidanceConfig("cfg", omega=0.5), steps=1)
