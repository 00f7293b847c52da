"""How far a bfloat16 forward pass lands from the float32 one, for one set of random weights.

    python -m benchmarks.bf16_error [--model=SiT-XL/2] [--batch=4] [--gamma=0.5]

Builds the model twice from the same parameters (float32 in both: only the compute dtype
differs), randomises every parameter (adaLN and the final layer start at zero, which would
make every block an identity), and prints the max and mean relative error of the bf16
velocity against float32, dense and with the TREAD route at `--gamma` (the same kept
tokens in both). Any sgjax version whose `DiTConfig` has `dtype` runs it, so the numbers
before and after a precision change come from the same script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgjax.models import dit
from sgjax.sparsity import Route


def randomise(params, key: jax.Array):
  """Kernels uniform in +-1/sqrt(fan_in), biases N(0, 0.05), the class table N(0, 0.5)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    if "embedding" in jax.tree_util.keystr(path):
      out.append(0.5 * jax.random.normal(k, leaf.shape))
    elif leaf.ndim >= 2:
      bound = leaf.shape[0] ** -0.5
      out.append(jax.random.uniform(k, leaf.shape, minval=-bound, maxval=bound))
    else:
      out.append(0.05 * jax.random.normal(k, leaf.shape))
  return jax.tree.unflatten(treedef, out)


def relative_errors(v: np.ndarray, reference: np.ndarray) -> dict[str, float]:
  err = np.abs(v.astype(np.float64) - reference)
  return {"max_rel": float(err.max() / np.abs(reference).max()),
          "mean_rel": float(err.mean() / np.abs(reference).mean())}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="SiT-XL/2")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--gamma", type=float, default=0.5)
  args = parser.parse_args()
  size = dit.parse_model_name(args.model)
  route_end = {28: 24, 24: 20, 12: 8}.get(size["depth"], size["depth"] - 2)
  cfg = dit.DiTConfig(**size, input_size=32, in_channels=4, num_classes=1000,
                      sparsity="routing", routes=(Route(2, route_end, args.gamma),))
  model = dit.DiT(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  params = randomise(params, jax.random.key(1))
  bf16_graphdef, _ = nnx.split(nnx.eval_shape(
      lambda: dit.DiT(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))))

  keys = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(keys[0], (args.batch, 32, 32, 4))
  t = jnp.linspace(0.05, 0.95, args.batch)
  y = jax.random.randint(keys[1], (args.batch,), 0, 1000)
  subsets = dit.draw_subsets(cfg, keys[2], args.batch, args.gamma)

  def forward(params, subsets, bf16: bool):
    return nnx.merge(bf16_graphdef if bf16 else graphdef, params)(x, t, y, subsets)

  forward = jax.jit(forward, static_argnums=2)
  results = {"model": args.model, "batch": args.batch, "jax": jax.__version__,
             "device": jax.devices()[0].device_kind}
  for name, s in (("dense", (None,)), (f"routed_gamma{args.gamma:g}", subsets)):
    reference = np.asarray(forward(params, s, False), np.float64)
    results[name] = relative_errors(np.asarray(forward(params, s, True)), reference)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
