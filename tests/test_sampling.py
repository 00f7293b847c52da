import dataclasses
import functools
import math

import chex
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


def branch_velocity(model, rule, gamma_strong, gamma_weak, omega=1.5, key=0, nested=False):
  """sampling.branch_velocity on the test batch, jitted once per static setting."""
  x, t, y = batch(model.cfg)
  graphdef, state = nnx.split(model)
  return _branch(state, x, t, y, jax.random.key(key),
                 jnp.float32(omega), graphdef=graphdef, rule=rule,
                 seg=segment(model.cfg, gamma_strong, gamma_weak), nested=nested)


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward(state, x, t, y, subsets, *, graphdef):
  return nnx.merge(graphdef, state)(x, t, y, subsets)


def forward(model, x, t, y, key, gamma):
  """(one plain model call at rate gamma, the token subsets it used, drawn from key)."""
  graphdef, state = nnx.split(model)
  subsets = dit.draw_subsets(model.cfg, key, x.shape[0], gamma)
  return _forward(state, x, t, y, subsets, graphdef=graphdef), subsets


def reference_branches(model, aux_model, rule, x, t, y, key, gamma_strong, gamma_weak,
                       nested=False):
  """(v_strong, v_weak or None, (strong subsets, weak subsets)) of one evaluation, from
  separate model calls. The branches as sgjax.guidance's table has them; the keys as
  sgjax.sampling documents: branch b's subsets from fold_in(key, b) (nested: both from the
  strong branch's), ICG's uniform label from fold_in(key, 2)."""
  num_classes = model.cfg.num_classes
  strong_key = jax.random.fold_in(key, 0)
  strong, strong_subsets = forward(model, x, t, y, strong_key, gamma_strong)
  if gamma_weak is None:
    return strong, None, (strong_subsets, None)
  if rule in ("cfg", "cfg+sg"):
    weak_y = jnp.full_like(y, num_classes)
  elif rule == "icg":
    weak_y = jax.random.randint(jax.random.fold_in(key, 2), y.shape, 0, num_classes, y.dtype)
  else:
    weak_y = y
  weak_model = aux_model if rule in ("ag", "ag+sg") else model
  weak, weak_subsets = forward(weak_model, x, t, weak_y,
                               strong_key if nested else jax.random.fold_in(key, 1), gamma_weak)
  return strong, weak, (strong_subsets, weak_subsets)


def reference_trajectory(model, rule, labels, seed, step_gammas, omega, solver, nested=False):
  """The sampler's run written out: noise from fold_in(key, 0), evaluation (step, stage) keyed
  by fold_in(fold_in(fold_in(key, 1), step), stage), step s at step_gammas[s] = (gamma_strong,
  gamma_weak or None: unguided), Euler or Heun updates in a Python loop.

  -> (x at t = 1, [(strong subsets, weak subsets) of every evaluation]).
  """
  key = jax.random.key(seed)
  cfg, n = model.cfg, labels.shape[0]
  x = jax.random.normal(jax.random.fold_in(key, 0),
                        (n, cfg.input_size, cfg.input_size, cfg.in_channels))
  steps, used = len(step_gammas), []
  dt = 1.0 / steps

  def velocity(x, t, step, stage):
    k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 1), step), stage)
    strong, weak, subsets = reference_branches(model, None, rule, x, jnp.full((n,), t), labels,
                                               k, *step_gammas[step], nested=nested)
    used.append(subsets)
    return strong if weak is None else omega * strong + (1 - omega) * weak

  for step in range(steps):
    t = step / steps
    v = velocity(x, t, step, 0)
    if solver == "euler":
      x = x + dt * v
    else:
      x = x + 0.5 * dt * (v + velocity(x + dt * v, t + dt, step, 1))
  return x, used


def cosine_gammas(start, end, steps, num_levels):
  """Each step's rate of a cosine schedule from start to end, its weight rounded to num_levels
  levels (0: exact)."""
  gammas = []
  for step in range(steps):
    weight = 0.5 * (1 + math.cos(math.pi * step / (steps - 1)))
    if num_levels:
      weight = round(weight * (num_levels - 1)) / (num_levels - 1)
    gammas.append(weight * start + (1 - weight) * end)
  return gammas


def test_sg_with_both_gammas_zero_is_the_plain_conditional_prediction(model):
  # Both branches are the dense conditional prediction, whatever omega: a direct model call.
  # (CFG+SG at 0 / 0 is CFG: the guided-velocity and Heun tests below check both formulas.)
  x, t, y = batch(model.cfg)
  cond, _ = forward(model, x, t, y, jax.random.key(0), 0.0)
  for omega in (1.5, 3.0):
    chex.assert_trees_all_close(branch_velocity(model, "sg", 0.0, 0.0, omega), cond,
                                rtol=0, atol=1e-5)


# The rules whose branches are two calls (other labels or model, other token counts). SG's
# packed pass and the vmapped pass of equal token counts (CFG) are checked over whole
# trajectories below.
@pytest.mark.parametrize("rule,gammas,variant", [
    pytest.param(rule, gammas, variant, id=f"{rule}-{gammas[0]}-{gammas[1]}-{name}")
    for rule, gammas in [("cfg+sg", (0.25, 0.5)), ("icg", (0.0, 0.5)), ("ag+sg", (0.25, 0.5))]
    for name, variant in [("jit", jax.jit), ("eager", lambda f: f)]])
def test_guided_velocity_is_omega_strong_plus_one_minus_omega_weak_of_separate_calls(
    model, aux_model, rule, gammas, variant):
  # Strong: v(c; gamma_strong). Weak at gamma_weak: the null class (cfg+sg), a uniformly
  # drawn class (icg), the auxiliary model (ag+sg). omega = 1: the strong branch alone.
  x, t, y = batch(model.cfg)
  (graphdef, state), (aux_graphdef, aux_state) = nnx.split(model), nnx.split(aux_model)
  seg = segment(model.cfg, *gammas)

  def guided(states, x, t, y, key, omega):  # pure: the models enter as their states
    aux = nnx.merge(aux_graphdef, states[1]) if rule == "ag+sg" else None
    return sampling.branch_velocity(nnx.merge(graphdef, states[0]), aux, rule, seg, x, t, y,
                                    key, omega)

  guided = variant(guided)
  key = jax.random.key(4)
  strong, weak, _ = reference_branches(model, aux_model, rule, x, t, y, key, *gammas)
  assert np.abs(np.asarray(strong - weak)).max() > 1e-2
  for omega in (1.0, 2.5):
    chex.assert_trees_all_close(guided((state, aux_state), x, t, y, key, jnp.float32(omega)),
                                omega * strong + (1 - omega) * weak, rtol=1e-5, atol=1e-5)


def test_ag_with_the_main_model_as_auxiliary_is_the_plain_prediction(model):
  x, t, y = batch(model.cfg)
  ag = sampling.Sampler(model, GuidanceConfig("ag", omega=2.5), aux_model=model)
  plain, _ = forward(model, x, t, y, jax.random.key(0), 0.0)
  chex.assert_trees_all_close(ag.velocity(x, t, y, jax.random.key(0)), plain, rtol=0,
                              atol=1e-5)


def test_nested_sampling_keeps_a_subset_of_the_denser_branchs_tokens(model):
  # The sampler with nested=True equals the hand-written run whose weak subsets come from the
  # strong branch's key; in every evaluation of that run the sparser branch's kept tokens
  # are a proper subset of the denser branch's.
  g = GuidanceConfig("sg", omega=1.5, gamma_strong=0.25, gamma_weak=0.7)
  labels = jnp.arange(4)
  nested, used = reference_trajectory(model, "sg", labels, 5, [(0.25, 0.7)] * 2, 1.5, "euler",
                                      nested=True)
  sampled = sampling.Sampler(model, g, steps=2, nested=True)(labels, 5)
  chex.assert_trees_all_close(sampled, nested, rtol=1e-4, atol=1e-4)
  assert len(used) == 2
  for (strong,), (weak,) in used:
    for s, w in zip(np.asarray(strong.keep), np.asarray(weak.keep)):
      assert len(w) == 20 and set(w) < set(s)
  independent, _ = reference_trajectory(model, "sg", labels, 5, [(0.25, 0.7)] * 2, 1.5, "euler")
  assert np.abs(np.asarray(sampled - independent)).max() > 1e-2
  # At equal rates nested branches see the same tokens: SG's weak branch is its strong one,
  # so the guided velocity is the strong prediction whatever omega.
  x, t, y = batch(model.cfg)
  strong, _ = forward(model, x, t, y, jax.random.fold_in(jax.random.key(3), 0), 0.5)
  chex.assert_trees_all_close(branch_velocity(model, "sg", 0.5, 0.5, 2.0, key=3, nested=True),
                              strong, rtol=0, atol=1e-5)


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
  chex.assert_shape(a, (8, 8, 8, 2))
  chex.assert_type(a, jnp.float32)
  chex.assert_trees_all_equal(a, b)
  assert np.abs(np.asarray(a - c)).max() > 0.1
  assert sampler._sample._cache_size() == 1  # pylint: disable=protected-access
  mesh = sharding.make_mesh("data")
  sharded = sampling.Sampler(model, g, steps=2, mesh=mesh)(labels, 0)
  assert len(sharded.sharding.device_set) == 8
  chex.assert_trees_all_close(sharded, a, rtol=1e-7, atol=1e-5)


def test_a_compiled_sampler_samples_without_tracing_or_compiling_again(model):
  # sample_to_dir times the batches after Sampler.compile: nothing may be left to trace or
  # compile in the timed calls (a persistent-cache hit would still trace and lower).
  sampler = sampling.Sampler(model, GuidanceConfig("sg", omega=2.0, gamma_weak=0.5), steps=2)
  labels = jnp.arange(8) % model.cfg.num_classes
  other_labels = (labels + 1) % model.cfg.num_classes
  events = []
  record = lambda event, duration, **kwargs: events.append(event)
  jax.monitoring.register_event_duration_secs_listener(record)
  try:
    sampler.compile(labels, 0)
    assert "/jax/core/compile/jaxpr_trace_duration" in events
    events.clear()
    sampler(other_labels, 1)
  finally:
    jax.monitoring.unregister_event_duration_listener(record)
  assert not [event for event in events if event.startswith("/jax/core/compile/")], events


def test_cosine_schedule_with_an_interval_samples_each_step_at_its_own_gammas(model):
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
  mean_true = np.mean([f.true for f in per_step])
  assert plan.flops_per_step.true == pytest.approx(mean_true)
  assert plan.flops_per_step.paper == pytest.approx(np.mean([f.paper for f in per_step]))
  assert plan.summary()["gflops_true"] == pytest.approx(mean_true / 1e9)
  # Run 6 steps at 2 levels: 3 segments, steps [0, 3) and [3, 5) guided, [5] (t = 5/6 > 0.8)
  # unguided. The sampler equals a per-step Euler loop at each step's gammas; a wrong gamma,
  # step size or segment boundary at any step breaks it.
  g, steps = dataclasses.replace(g, num_levels=2, gamma_weak_end=0.7), 6
  sampler = sampling.Sampler(model, g, steps=steps)
  assert [s.shape for s in sampler.plan.segments] == [(64, 32), (32, 20), (32, None)]
  assert [(s.start, s.stop) for s in sampler.plan.segments] == [(0, 3), (3, 5), (5, 6)]
  step_gammas = [(strong, weak if step / steps <= 0.8 else None) for step, (strong, weak)
                 in enumerate(zip(cosine_gammas(0.0, 0.5, steps, 2),
                                  cosine_gammas(0.5, 0.7, steps, 2)))]
  labels = jnp.arange(4)
  want, _ = reference_trajectory(model, "sg", labels, 0, step_gammas, 1.5, "euler")
  chex.assert_trees_all_close(sampler(labels, 0), want, rtol=1e-4, atol=1e-4)
  # The whole trajectory is one program: one fori_loop per segment, compiled once.
  assert sampler._sample._cache_size() == 1  # pylint: disable=protected-access


def test_exact_cosine_schedule_plans_every_step_at_its_own_token_counts(model):
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


def test_heun_sampling_equals_a_hand_written_heun_loop_over_an_exact_cosine_schedule(model):
  # CFG with sparse branches (one call vmapped over both), every step at its own rate.
  g = GuidanceConfig("cfg", omega=2.0, schedule="cosine", gamma_strong=0.0,
                     gamma_strong_end=0.5, gamma_weak=0.0, gamma_weak_end=0.5, num_levels=0)
  steps = 3
  images, plan = sampling.sample(model, g, jnp.arange(4), 1, steps=steps, solver="heun")
  assert plan.nfe == 2 * 2 * steps and len(plan.segments) == steps
  assert plan.flops == 2 * flops.trajectory_flops(model.cfg, g, steps=steps)
  gammas = cosine_gammas(0.0, 0.5, steps, 0)
  want, _ = reference_trajectory(model, "cfg", jnp.arange(4), 1, list(zip(gammas, gammas)), 2.0,
                                 "heun")
  chex.assert_trees_all_close(images, want, rtol=1e-4, atol=1e-4)


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
  chex.assert_trees_all_close(out, x1, rtol=1e-7, atol=1e-5)


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
