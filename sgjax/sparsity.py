"""Token sparsity as static shapes: random subsets, gather and merge, routes.

A sparsity rate gamma removes `int(N * gamma)` of N tokens (TREAD's rule), so exactly
`K = N - int(N * gamma)` tokens are kept. The kept set is a uniformly random subset per
sample, drawn from an explicit PRNG key. Everything here has static shapes: K is a Python int
fixed by gamma, so the blocks that see the kept tokens really run on K tokens and their FLOPs
fall with gamma (no boolean masks multiplied into dense compute).

A subset is stored as a permutation split in two (`keep`, `drop`) plus its inverse
(`restore`): gathering with `keep` selects the kept tokens, and concatenating kept and
dropped tokens and gathering with `restore` puts every token back in place. Gathers only, no
scatter, which XLA lowers well on every backend.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp


def num_kept(num_tokens: int, gamma: float) -> int:
  """K = N - int(N * gamma), the number of tokens kept at sparsity rate gamma."""
  check_gamma(gamma, "gamma")
  return num_tokens - int(num_tokens * gamma)


def check_gamma(gamma: float, name: str) -> None:
  if not 0.0 <= gamma < 1.0:
    raise ValueError(f"{name}={gamma!r}: a sparsity rate must lie in [0, 1).")


@dataclasses.dataclass(frozen=True)
class Route:
  """TREAD route: blocks `start..end` (inclusive, 0-based) see only the kept tokens."""

  start: int
  end: int
  gamma: float


def check_routes(routes: Sequence[Route], depth: int, name: str = "routes") -> None:
  """Raises ValueError unless routes lie inside [0, depth) and do not overlap."""
  previous_end = -1
  for i, route in enumerate(sorted(routes, key=lambda r: r.start)):
    where = f"{name}[{i}]=({route.start}, {route.end}, {route.gamma})"
    if not 0 <= route.start <= route.end < depth:
      raise ValueError(
          f"{where}: a route needs 0 <= start <= end < depth={depth} (blocks are 0-based and"
          " `end` is inclusive).")
    if route.start <= previous_end:
      raise ValueError(f"{where}: overlaps the previous route, which ends at block"
                       f" {previous_end}; routes must not overlap.")
    check_gamma(route.gamma, f"{where}.gamma")
    previous_end = route.end


def check_mode_routes(mode: str, routes: Sequence[Route], depth: int, prefix: str) -> None:
  """A model config's routes: at least one, valid, for sparsity mode "routing"; none else."""
  if mode == "routing":
    if not routes:
      raise ValueError(f"{prefix}.routes is empty: routing needs at least one route"
                       " (start, end, gamma).")
    check_routes(routes, depth, f"{prefix}.routes")
  elif routes:
    raise ValueError(f"{prefix}.routes={tuple(routes)!r} is set but {prefix}.sparsity="
                     f"{mode!r}; routes apply only to sparsity='routing'.")


class TokenSubset(NamedTuple):
  """A random subset of K of N tokens per sample (K and N static, from the shapes)."""

  keep: jax.Array  # [B, K] int32: indices of the kept tokens
  drop: jax.Array  # [B, N - K] int32: indices of the dropped tokens
  restore: jax.Array  # [B, N] int32: inverse permutation of concat(keep, drop)

  @property
  def num_kept(self) -> int:
    return self.keep.shape[-1]

  @property
  def num_tokens(self) -> int:
    return self.restore.shape[-1]


def random_subset(key: jax.Array, batch_size: int, num_tokens: int, gamma: float) -> TokenSubset:
  """Uniformly random subset of exactly K tokens for each of `batch_size` samples."""
  k = num_kept(num_tokens, gamma)
  # argsort of iid uniforms is a uniformly random permutation; the values depend only on
  # the key and the shape, never on how the batch is sharded.
  perm = jnp.argsort(jax.random.uniform(key, (batch_size, num_tokens)), axis=-1)
  perm = perm.astype(jnp.int32)
  restore = jnp.argsort(perm, axis=-1).astype(jnp.int32)
  return TokenSubset(keep=perm[:, :k], drop=perm[:, k:], restore=restore)


def gather(x: jax.Array, indices: jax.Array) -> jax.Array:
  """x: [B, N, D], indices: [B, M] -> [B, M, D]."""
  return jnp.take_along_axis(x, indices[..., None], axis=1)


def merge(kept: jax.Array, dropped: jax.Array, subset: TokenSubset) -> jax.Array:
  """Puts kept [B, K, D] and dropped [B, N - K, D] tokens back in place -> [B, N, D]."""
  return gather(jnp.concatenate([kept, dropped], axis=1), subset.restore)


def keep_mask(subset: TokenSubset) -> jax.Array:
  """[B, N] bool, True at kept tokens."""
  return subset.restore < subset.num_kept
