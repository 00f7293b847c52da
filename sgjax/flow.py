"""Flow matching: interpolant, velocity target, time sampling, losses, condition dropout.

Time convention (used everywhere in sgjax): t = 0 is pure noise, t = 1 is data.
    x_t = (1 - t) * z + t * x,   z ~ N(0, I),   target velocity v* = x - z,
and sampling integrates dx/dt = v from t = 0 to t = 1. (The public TREAD code runs time the
other way; convert at any boundary with it: t_tread = 1 - t.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sgjax import sparsity
from sgjax.models import dit

TIME_DISTRIBUTIONS = ("logit_normal", "uniform")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  time_dist: str = "logit_normal"
  # probability of replacing the conditioning by the null class / null caption
  label_dropout: float = 0.1
  mask_weight: float = 0.1  # masking: lambda of the dropped-token term

  def validate(self, prefix: str = "flow") -> "LossConfig":
    if self.time_dist not in TIME_DISTRIBUTIONS:
      raise ValueError(f"{prefix}.time_dist={self.time_dist!r}: choose one of"
                       f" {TIME_DISTRIBUTIONS}.")
    if not 0.0 <= self.label_dropout < 1.0:
      raise ValueError(f"{prefix}.label_dropout={self.label_dropout!r} must lie in [0, 1).")
    if self.mask_weight < 0:
      raise ValueError(f"{prefix}.mask_weight={self.mask_weight!r} must be >= 0.")
    return self


def _per_sample(t: jax.Array, like: jax.Array) -> jax.Array:
  return t.reshape((-1,) + (1,) * (like.ndim - 1))


def interpolate(x: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 - t) * noise + t * x; x, noise: [B, ...], t: [B]."""
  t = _per_sample(t, x)
  return (1 - t) * noise + t * x


def target_velocity(x: jax.Array, noise: jax.Array) -> jax.Array:
  return x - noise


def sample_time(key: jax.Array, batch_size: int, dist: str = "logit_normal") -> jax.Array:
  """[B] training times: sigmoid(N(0, 1)) (logit-normal) or U(0, 1)."""
  if dist == "logit_normal":
    return jax.nn.sigmoid(jax.random.normal(key, (batch_size,)))
  if dist == "uniform":
    return jax.random.uniform(key, (batch_size,))
  raise ValueError(f"time_dist={dist!r}: choose one of {TIME_DISTRIBUTIONS}.")


def drop_condition(key: jax.Array, cond, null, prob: float):
  """Replaces each sample's conditioning by the unconditional `null` (same structure) with
  probability `prob` (guidance dropout). cond and null: arrays or pytrees with a leading
  batch axis [B, ...]: class labels, or a caption's hidden states and mask."""
  batch = jax.tree.leaves(cond)[0].shape[0]
  drop = jax.random.bernoulli(key, prob, (batch,))
  return jax.tree.map(
      lambda c, n: jnp.where(drop.reshape((batch,) + (1,) * (c.ndim - 1)), n, c), cond, null)


def velocity_mse(v: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over every dimension."""
  return jnp.mean(jnp.square(v.astype(jnp.float32) - target))


def masked_velocity_loss(v: jax.Array, target: jax.Array, t: jax.Array, kept: jax.Array,
                         patch_size: int, mask_weight: float) -> jax.Array:
  """MaskDiT-style loss: MSE on kept tokens + lambda * E[(1 - t)^2 ||(v - v*) M||^2].

  v, target: [B, H, W, C]; t: [B]; kept: [B, N] bool (True at tokens the encoder saw).
  Each term is a mean over its own tokens and their pixel dimensions.
  """
  err = jnp.mean(jnp.square(dit.patchify(v.astype(jnp.float32) - target, patch_size)), -1)
  kept = kept.astype(jnp.float32)  # [B, N]
  dropped = 1.0 - kept
  kept_term = jnp.sum(err * kept) / jnp.maximum(jnp.sum(kept), 1.0)
  weight = jnp.square(1.0 - t)[:, None]
  dropped_term = jnp.sum(weight * err * dropped) / jnp.maximum(jnp.sum(dropped), 1.0)
  return kept_term + mask_weight * dropped_term


def loss_fn(model: dit.DiT, x: jax.Array, y, key: jax.Array,
            loss_cfg: LossConfig) -> jax.Array:
  """The training loss of one batch at the model's configured (training) sparsity.

  x: [B, H, W, C] data; y: the conditioning, [B] labels (DiT) or a caption's hidden states
  and mask (`sgjax.models.trdit`). Every random choice (time, noise, label dropout, token
  subsets) comes from `key`.
  """
  cfg = model.cfg
  batch = x.shape[0]
  k_time, k_noise, k_label, k_tokens = jax.random.split(key, 4)
  t = sample_time(k_time, batch, loss_cfg.time_dist)
  noise = jax.random.normal(k_noise, x.shape, jnp.float32)
  y = drop_condition(k_label, y, model.null_condition(y), loss_cfg.label_dropout)
  subsets = model.draw_subsets(k_tokens, batch)
  v = model(interpolate(x, noise, t), t, y, subsets)
  target = target_velocity(x, noise)
  if cfg.sparsity == "masking" and subsets[0] is not None:
    return masked_velocity_loss(v, target, t, sparsity.keep_mask(subsets[0]),
                                cfg.patch_size, loss_cfg.mask_weight)
  return velocity_mse(v, target)
