import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sgjax import flow, sparsity
from tests.helpers import batch, tiny_config


def test_interpolant_endpoints_and_target():
  x = jnp.full((2, 4, 4, 1), 3.0)
  z = jnp.full((2, 4, 4, 1), -1.0)
  np.testing.assert_array_equal(flow.interpolate(x, z, jnp.zeros(2)), z)  # t = 0: noise
  np.testing.assert_array_equal(flow.interpolate(x, z, jnp.ones(2)), x)  # t = 1: data
  # The target velocity is the time derivative of the interpolant.
  t = jnp.array([0.2, 0.7])
  derivative = (flow.interpolate(x, z, t + 1e-3) - flow.interpolate(x, z, t)) / 1e-3
  np.testing.assert_allclose(derivative, flow.target_velocity(x, z), rtol=1e-3)


@pytest.mark.parametrize("dist", ["logit_normal", "uniform"])
def test_time_samples_lie_in_unit_interval(dist):
  t = flow.sample_time(jax.random.key(0), 10_000, dist)
  assert float(t.min()) > 0.0 and float(t.max()) < 1.0
  assert abs(float(t.mean()) - 0.5) < 0.02
  if dist == "logit_normal":  # mass concentrates in the middle
    assert float(jnp.mean(jnp.abs(t - 0.5) < 0.25)) > 0.7


def test_label_dropout_rate_and_null_label():
  y = jnp.zeros(20_000, jnp.int32)
  dropped = flow.drop_condition(jax.random.key(0), y, jnp.full_like(y, 10), 0.1)
  assert set(np.unique(dropped)) == {0, 10}
  assert abs(float(jnp.mean(dropped == 10)) - 0.1) < 0.01


def test_caption_dropout_replaces_whole_captions_together():
  # A pytree condition: each sample's hidden states and mask are dropped together or kept.
  batch = 4000
  cond = {"text": jnp.ones((batch, 3, 2)), "mask": jnp.ones((batch, 3), bool)}
  null = {"text": jnp.ones((batch, 3, 2)), "mask": jnp.zeros((batch, 3), bool)}
  dropped = flow.drop_condition(jax.random.key(1), cond, null, 0.25)
  chex.assert_trees_all_equal_shapes_and_dtypes(dropped, cond)
  rows = np.asarray(dropped["mask"])
  assert np.all(rows.all(-1) | ~rows.any(-1))  # never a partly cleared mask
  assert abs(float(np.mean(~rows.any(-1))) - 0.25) < 0.03


def test_masked_loss_weights_dropped_tokens_by_one_minus_t_squared():
  target = jnp.zeros((1, 2, 2, 1))
  v = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2, 1)  # per-token squared error 1,4,9,16
  kept = jnp.array([[True, False, True, False]])
  t = jnp.array([0.5])
  loss = flow.masked_velocity_loss(v, target, t, kept, patch_size=1, mask_weight=0.1)
  expected = (1 + 9) / 2 + 0.1 * 0.25 * (4 + 16) / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_loss_config_rejects_bad_values():
  with pytest.raises(ValueError, match="time_dist='beta'"):
    flow.LossConfig(time_dist="beta").validate()
  with pytest.raises(ValueError, match="label_dropout"):
    flow.LossConfig(label_dropout=1.0).validate()


@pytest.mark.parametrize("mode", ["routing", "masking"])
def test_optimizer_steps_reduce_training_loss_on_a_fixed_batch(mode):
  cfg = tiny_config(mode)
  from sgjax.models import dit  # pylint: disable=g-import-not-at-top
  model = dit.DiT(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  x, _, y = batch(cfg, size=16)
  loss_cfg = flow.LossConfig()
  key = jax.random.key(42)  # the same noise, times and tokens at every step

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: flow.loss_fn(m, x, y, key, loss_cfg))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(30)]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses
