"""Train state, its shardings, the optimizer and the jitted train step.

The state is a plain pytree so that jit, orbax and optax all see the same thing:
    {"step": int32 [], "params": dict, "ema": dict, "opt_state": optax state}
where params and ema are `nnx.to_pure_dict` trees of the model's parameters. The model's
graph (its structure, `graphdef`) stays outside and is merged with params inside the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from sgjax import flow, sharding
from sgjax.models import registry

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 1e-4
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 0.0
  warmup_steps: int = 0
  lr_schedule: str = "constant"  # constant | cosine (to 0 at `steps`)
  steps: int = 1
  grad_clip: float = 0.0  # global-norm clipping; 0 = off
  ema_decay: float = 0.9999

  @classmethod
  def from_train_config(cls, train) -> "OptimConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in train.items() if k in names})


def learning_rate(cfg: OptimConfig) -> optax.Schedule:
  if cfg.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1),
                                              max(cfg.steps, cfg.warmup_steps + 1))
  if cfg.warmup_steps:
    return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  return optax.constant_schedule(cfg.lr)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  # Always a chain of the same shape, so a run may resume with clipping switched on or off.
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
  adamw = optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  return optax.chain(clip, adamw)


def make_model_fn(model_cfg: registry.ModelConfig, seed: int) -> Callable[[], registry.Model]:
  # Parameters come from the config's seed alone, whatever the mesh.
  return lambda: registry.build(model_cfg, rngs=nnx.Rngs(params=jax.random.fold_in(
      jax.random.key(seed), 0)))


def abstract_state(model_cfg: registry.ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                   preset: str, seed: int = 0):
  """(graphdef, abstract state with shardings, shardings): nothing is allocated."""
  graphdef, abstract_params = nnx.split(nnx.eval_shape(make_model_fn(model_cfg, seed)))
  param_shardings = nnx.to_pure_dict(
      sharding.state_shardings(abstract_params, mesh, preset))
  params = nnx.to_pure_dict(abstract_params)
  opt_state = jax.eval_shape(tx.init, params)
  replicated = sharding.replicated(mesh)
  opt_shardings = optax.tree_utils.tree_map_params(
      tx, lambda _, s: s, opt_state, param_shardings,
      transform_non_params=lambda _: replicated)
  shardings = {"step": replicated, "params": param_shardings, "ema": param_shardings,
               "opt_state": opt_shardings}
  shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "ema": params,
            "opt_state": opt_state}
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return graphdef, abstract, shardings


def init_state(model_cfg: registry.ModelConfig, tx: optax.GradientTransformation,
               shardings: State, seed: int = 0) -> State:
  """A fresh state, created by one jitted program straight into its shardings."""
  make_model = make_model_fn(model_cfg, seed)

  def init():
    params = nnx.to_pure_dict(nnx.state(make_model(), nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "ema": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params)}

  return jax.jit(init, out_shardings=shardings)()


def label_condition(batch: dict[str, jax.Array]) -> jax.Array:
  """The conditioning of a class-conditional batch: its labels."""
  return batch["label"]


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_cfg: flow.LossConfig,
                    ema_decay: float, base_key: jax.Array, condition=label_condition):
  """train_step(state, batch) -> (state, metrics); every random choice of step s comes from
  fold_in(base_key, s), so a resumed run replays exactly. `condition(batch)` gives the
  model's conditioning (labels, or a caption's hidden states: `sgjax.text`), traced inside
  the step."""

  def train_step(state: State, batch: dict[str, jax.Array]):
    key = jax.random.fold_in(base_key, state["step"])

    def loss_of(params):
      return flow.loss_fn(nnx.merge(graphdef, params), batch["image"], condition(batch), key,
                          loss_cfg)

    loss, grads = jax.value_and_grad(loss_of)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state["ema"],
                       params)
    # param_norm overflows as soon as an update blows the weights up, even while this step's
    # loss is still finite: checking it keeps such weights out of checkpoints.
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params)}
    return {"step": state["step"] + 1, "params": params, "ema": ema,
            "opt_state": opt_state}, metrics

  return train_step
