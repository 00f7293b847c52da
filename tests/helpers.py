"""Small models and batches shared by the tests."""

import jax
import jax.numpy as jnp
from flax import nnx

from sgjax.models import dit
from sgjax.sparsity import Route


def tiny_config(sparsity="routing", **overrides) -> dit.DiTConfig:
  fields = dict(input_size=8, in_channels=2, patch_size=1, width=32, depth=4, num_heads=4,
                num_classes=10, sparsity=sparsity,
                routes=(Route(1, 2, 0.5),) if sparsity == "routing" else (),
                decoder_depth=2, decoder_width=16, decoder_heads=2)
  fields.update(overrides)
  return dit.DiTConfig(**fields)


def perturbed_model(cfg: dit.DiTConfig, seed: int = 0) -> dit.DiT:
  """A model whose zero-initialised layers (adaLN-Zero, final) are made non-zero, so that
  every block affects the output."""
  model = dit.DiT(cfg, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def batch(cfg: dit.DiTConfig, size: int = 8, seed: int = 0):
  kx, kt, ky = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (size, cfg.input_size, cfg.input_size, cfg.in_channels))
  t = jax.random.uniform(kt, (size,))
  y = jax.random.randint(ky, (size,), 0, cfg.num_classes)
  return x, t, y
