import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sgjax import flow
from tests.helpers import batch, tiny_config


def test_interpolant_endpoints_and_target():
  x = jnp.full((2, 4, 4, 1), 3.0)
  z = jnp.full((2, 4, 4, 1), -1.0)
  chex.assert_trees_all_equal(flow.interpolate(x, z, jnp.zeros(2)), z)  # t = 0: noise
  chex.assert_trees_all_equal(flow.interpolate(x, z, jnp.ones(2)), x)  # t = 1: data
  # The target velocity is the time derivative of the interpolant.
  t = jnp.array([0.2, 0.7])
  derivative = (flow.interpolate(x, z, t + 1e-3) - flow.interpolate(x, z, t)) / 1e-3
  chex.assert_trees_all_close(derivative, flow.target_velocity(x, z), rtol=1e-3, atol=0)


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
  chex.assert_trees_all_close(loss, expected, rtol=1e-6, atol=0)


class RecordingModel:
  """Forwards to `model`, recording the inputs and output of each forward pass."""

  def __init__(self, model):
    self.model, self.cfg, self.calls = model, model.cfg, []
    self.draw_subsets, self.null_condition = model.draw_subsets, model.null_condition

  def __call__(self, x_t, t, y, subsets):
    v = self.model(x_t, t, y, subsets)
    self.calls.append(dict(x_t=x_t, t=t, y=y, subsets=subsets, v=v))
    return v


def test_loss_config_rejects_bad_values():
  with pytest.raises(ValueError, match="time_dist='beta'"):
    flow.LossConfig(time_dist="beta").validate()
  with pytest.raises(ValueError, match="label_dropout"):
    flow.LossConfig(label_dropout=1.0).validate()


def hand_loss(call: dict, x: jax.Array, mask_weight: float, masked: bool) -> np.ndarray:
  """The training loss of the method (PAPER.md section 3), in numpy, from one recorded forward
  pass: the velocity MSE over every token, or with masking the MSE over the tokens the encoder
  kept + mask_weight * E[(1 - t)^2 ||(v - v*) M||^2] over the dropped ones (M = 1 there); no
  other (MAE) reconstruction term. Tokens are pixels (patch size 1)."""
  x_t, t, v, x = (np.asarray(a, np.float64) for a in (call["x_t"], call["t"], call["v"], x))
  t_ = t[:, None, None, None]
  noise = (x_t - t_ * x) / (1 - t_)  # x_t = (1 - t) noise + t x
  err = ((v - (x - noise)) ** 2).reshape(x.shape[0], -1, x.shape[-1]).mean(-1)  # [B, N]
  if not masked:  # routing: the sparsity stays inside the model
    return err.mean()
  kept = np.zeros(err.shape, bool)
  np.put_along_axis(kept, np.asarray(call["subsets"][0].keep), True, axis=1)
  return np.mean([e[k].mean() + mask_weight * (1 - t_b) ** 2 * e[~k].mean()
                  for e, k, t_b in zip(err, kept, t)])


@pytest.mark.parametrize("mode", ["routing", "masking"])
def test_training_loss_follows_the_method_and_optimizer_steps_reduce_it(mode):
  cfg = tiny_config(mode)
  from sgjax.models import dit  # pylint: disable=g-import-not-at-top
  model = dit.DiT(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  x, _, y = batch(cfg, size=16)
  loss_cfg = flow.LossConfig(mask_weight=0.3)
  key = jax.random.key(42)  # the same noise, times and tokens at every step

  @nnx.jit
  def step(model, optimizer):
    def loss(model):
      recorder = RecordingModel(model)
      return flow.loss_fn(recorder, x, y, key, loss_cfg), recorder.calls

    (loss, calls), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, calls

  losses = [step(model, optimizer) for _ in range(30)]
  (call,) = losses[-1][1]  # one forward pass per loss, at the training rate
  losses = [float(loss) for loss, _ in losses]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses
  # The last loss, from the model it was computed with (trained: every layer non-zero).
  expected = hand_loss(call, x, loss_cfg.mask_weight, masked=mode == "masking")
  chex.assert_trees_all_close(losses[-1], expected, rtol=1e-5, atol=0)
  if mode == "masking":
    (subset,) = call["subsets"]
    chex.assert_shape(subset.keep, (16, 32))  # N - int(0.5 N) of 64 tokens
    # The loss ignoring the mask, or masking other tokens, is far from it.
    assert abs(hand_loss(call, x, 0.3, masked=False) - expected) > 1e-2 * expected
    others = {**call, "subsets": (subset._replace(keep=jnp.roll(subset.keep, 1, axis=0)),)}
    assert abs(hand_loss(others, x, 0.3, masked=True) - expected) > 1e-3 * expected
