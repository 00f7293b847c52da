"""DiT / SiT in Flax NNX, with TREAD routing and MaskDiT masking as static-shape gathers.

One network serves both names: SiT is DiT trained with flow matching, which is how sgjax
trains every model. Layout follows DiT (Peebles & Xie, 2023): patch embedding, fixed 2D sin-cos
positions, timestep-frequency and class embeddings (one extra "null" class for guidance
dropout), adaLN-Zero blocks, and a zero-initialised final layer.

Mixed precision: parameters, the residual stream, the conditioning vector `c`, the adaLN
modulations, the norms and the final layer are float32; only the token matmuls (patch
embedding, q/k/v/out projections, MLP, MaskDiT's decoder input) and attention run in `dtype`.
The residual stream and norms are float32 under PyTorch's autocast too (TREAD and MaskDiT
train with it); autocast would also run the small per-sample layers (time MLP, adaLN) and
the final layer in 16 bits, which sgjax keeps float32 at negligible cost. With routing, the
block right after each route runs wholly in float32, as TREAD's does (`fp32_next`, there
only while routing): the first block to see merged kept and skipped tokens.

Every parameter carries logical sharding axes (see `sgjax/sharding.py` for the rules that map
them to mesh axes): `embed` (model width), `mlp` (MLP hidden), `heads` (attention q/k/v
features), `adaln` (modulation outputs), `classes`, `patch` (pixels of one patch), `freq`.

Token sparsity enters through `subsets`, drawn by `DiT.draw_subsets` from an explicit key:
one `TokenSubset` (or None = all tokens) per route for routing, a single one for masking.
`DiT.branches` evaluates several such branches (SG's two rates) in one packed pass.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgjax import sharding, sparsity
from sgjax.sparsity import Route, TokenSubset

SPARSITY_MODES = ("dense", "routing", "masking")
# Attention kernels (`jax.nn.dot_product_attention`'s `implementation`): "xla" runs on every
# backend; "cudnn" is cuDNN's fused flash attention on NVIDIA GPUs (bfloat16/float16, head
# dim a multiple of 8, at most 128 before Hopper and 256 from it), which never writes the
# [N, N] attention scores to memory.
ATTENTION_KERNELS = ("xla", "cudnn")
# Token counts of the sequences packed along a block's token axis (see `run_packed`).
Groups = tuple[int, ...] | None
# Rematerialisation of each transformer block in the backward pass: what autodiff may keep
# from the forward pass; everything else is recomputed. "none" keeps every residual.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # only the block inputs
    "dots": jax.checkpoint_policies.dots_saveable,  # matmul outputs; norms, GELU recomputed
    # Linear-layer outputs kept; attention score matmuls (batched) recomputed.
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# name -> (depth, width, heads): the standard DiT table, and "2.5B" at the depth, width and
# heads of the paper's 2.5B text-to-image TR-DiT (2.57B parameters in DiT blocks), for
# planning and benchmarking at that scale.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
         "2.5B": (34, 2048, 16)}
TIME_FREQUENCIES = 256


class PatchGrid:
  """Token geometry of a patch-embedding transformer config (input_size, patch_size,
  in_channels)."""

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size**2

  @property
  def patch_dim(self) -> int:
    return self.patch_size**2 * self.in_channels


@dataclasses.dataclass(frozen=True)
class DiTConfig(PatchGrid):
  """Architecture and sparsity of one DiT/SiT. Fields are plain values (JSON-able)."""

  input_size: int = 32  # H = W of the (latent) image
  in_channels: int = 4
  patch_size: int = 2
  width: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000  # label `num_classes` is the null class
  sparsity: str = "dense"  # dense | routing | masking
  routes: tuple[Route, ...] = ()  # routing: training routes (start, end, gamma)
  mask_gamma: float = 0.5  # masking: training sparsity rate
  decoder_depth: int = 8  # masking: MaskDiT decoder
  decoder_width: int = 512
  decoder_heads: int = 16
  dtype: str = "float32"  # compute dtype of the token matmuls; see the module docstring
  # The frequency embedding sees t * time_scale (t in [0, 1], t = 0 noise). 1000 resolves time
  # as finely as DiT's integer timesteps; SiT and TREAD feed t unscaled (1.0).
  time_scale: float = 1000.0
  remat: str = "none"  # a key of REMAT_POLICIES; saves activation memory, costs recompute
  attention: str = "xla"  # one of ATTENTION_KERNELS; same parameters and math either way

  text_conditioned = False  # conditioning is a class label (see sgjax.models.trdit)

  def validate(self, prefix: str = "model") -> "DiTConfig":
    """Raises ValueError naming the field and value of the first invalid setting."""
    positive = ("input_size", "in_channels", "patch_size", "width", "depth", "num_heads",
                "num_classes")
    for name in positive:
      if getattr(self, name) <= 0:
        raise ValueError(f"{prefix}.{name}={getattr(self, name)!r} must be positive.")
    if self.input_size % self.patch_size:
      raise ValueError(f"{prefix}.patch_size={self.patch_size} does not divide"
                       f" {prefix}.input_size={self.input_size}.")
    if self.width % self.num_heads:
      raise ValueError(f"{prefix}.num_heads={self.num_heads} does not divide"
                       f" {prefix}.width={self.width}.")
    if not self.time_scale > 0:
      raise ValueError(f"{prefix}.time_scale={self.time_scale!r} must be positive.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"{prefix}.remat={self.remat!r}: choose one of {list(REMAT_POLICIES)}.")
    self._validate_attention(prefix)
    if self.sparsity not in SPARSITY_MODES:
      raise ValueError(f"{prefix}.sparsity={self.sparsity!r}: choose one of {SPARSITY_MODES}.")
    sparsity.check_mode_routes(self.sparsity, self.routes, self.depth, prefix)
    if self.sparsity == "masking":
      sparsity.check_gamma(self.mask_gamma, f"{prefix}.mask_gamma")
      if self.decoder_depth <= 0 or self.decoder_width <= 0:
        raise ValueError(f"{prefix}.decoder_depth/decoder_width must be positive for masking.")
      if self.decoder_width % self.decoder_heads:
        raise ValueError(f"{prefix}.decoder_heads={self.decoder_heads} does not divide"
                         f" {prefix}.decoder_width={self.decoder_width}.")
    return self

  def _validate_attention(self, prefix: str) -> None:
    if self.attention not in ATTENTION_KERNELS:
      raise ValueError(f"{prefix}.attention={self.attention!r}: choose one of"
                       f" {ATTENTION_KERNELS}.")
    if self.attention != "cudnn":
      return
    if self.dtype not in ("bfloat16", "float16"):
      raise ValueError(f"{prefix}.attention='cudnn' needs {prefix}.dtype bfloat16 or float16"
                       f" (got {self.dtype!r}); use attention='xla' for other dtypes.")
    head_dims = {f"{prefix}.width / {prefix}.num_heads": self.width // self.num_heads}
    if self.sparsity == "masking":
      head_dims[f"{prefix}.decoder_width / {prefix}.decoder_heads"] = (
          self.decoder_width // self.decoder_heads)
    for name, head_dim in head_dims.items():
      if head_dim % 8 or head_dim > 256:
        raise ValueError(f"{prefix}.attention='cudnn': head dim {name} = {head_dim}; cuDNN"
                         " flash attention needs a multiple of 8 up to 256. Use"
                         " attention='xla' or another number of heads.")


def parse_model_name(name: str) -> dict[str, int]:
  """'SiT-XL/2' or 'DiT-B/4' -> {'depth', 'width', 'num_heads', 'patch_size'}."""
  sizes = "|".join(re.escape(size) for size in SIZES)
  match = re.fullmatch(rf"(?:DiT|SiT)-({sizes})/(\d+)", name)
  if not match:
    raise ValueError(f"model name {name!r}: expected DiT-<size>/<patch> or SiT-<size>/<patch>"
                     f" with size in {sorted(SIZES)}, e.g. 'SiT-XL/2'.")
  depth, width, heads = SIZES[match.group(1)]
  return dict(depth=depth, width=width, num_heads=heads, patch_size=int(match.group(2)))


def axes_metadata(*names: str | None) -> dict:
  # Parameters record their logical axes; placement happens in a jitted init with explicit
  # out_shardings (sgjax.sharding), so variables are not sharded eagerly at creation.
  return {"out_sharding": names, "eager_sharding": False}


xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()


def linear(d_in: int, d_out: int, axes: tuple, rngs: nnx.Rngs, dtype, init=xavier_uniform,
           use_bias: bool = True):
  """A linear layer computing in `dtype` whose parameters carry logical `axes`."""
  return nnx.Linear(d_in, d_out, dtype=dtype, use_bias=use_bias, kernel_init=init,
                    kernel_metadata=axes_metadata(*axes),
                    bias_metadata=axes_metadata(axes[1]), rngs=rngs)


def _layer_norm(width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Statistics in float32 whatever the compute dtype.
  return nnx.LayerNorm(width, epsilon=1e-6, use_bias=False, use_scale=False,
                       dtype=jnp.float32, rngs=rngs)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale[:, None]) + shift[:, None]


@functools.lru_cache(maxsize=None)
def sincos_pos_embed(width: int, grid_size: int) -> np.ndarray:
  """Fixed 2D sin-cos position embedding (as in MAE/DiT) -> [grid_size**2, width]."""
  if width % 4:
    raise ValueError(f"width={width} must be divisible by 4 for 2D sin-cos positions.")
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")

  def embed_1d(pos):
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  # DiT's order: the first half encodes the column (w), the second the row (h).
  return np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1).astype(np.float32)


def time_frequencies(dim: int = TIME_FREQUENCIES) -> jax.Array:
  """The [dim // 2] float32 frequencies of `timestep_embedding` (DiT's, max period 10^4)."""
  half = dim // 2
  return jnp.exp(-jnp.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)


def timestep_embedding(t: jax.Array, scale: float, dim: int = TIME_FREQUENCIES) -> jax.Array:
  """t: [B] in [0, 1] -> [B, dim]: cos, then sin, of (t * scale) * frequency."""
  args = (t.astype(jnp.float32) * scale)[:, None] * time_frequencies(dim)[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, N, p * p * C] in row-major patch order."""
  b, h, w, c = x.shape
  p = patch_size
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, patch_size: int, channels: int) -> jax.Array:
  """[B, N, p * p * C] -> [B, H, W, C]; the inverse of `patchify`."""
  b, n, _ = x.shape
  g = int(round(n**0.5))
  p = patch_size
  x = x.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * p, g * p, channels)


class Attention(nnx.Module):

  def __init__(self, width: int, num_heads: int, dtype, rngs: nnx.Rngs,
               implementation: str = "xla"):
    self.num_heads = num_heads
    self.implementation = implementation
    self.q = linear(width, width, ("embed", "heads"), rngs, dtype)
    self.k = linear(width, width, ("embed", "heads"), rngs, dtype)
    self.v = linear(width, width, ("embed", "heads"), rngs, dtype)
    self.proj = linear(width, width, ("heads", "embed"), rngs, dtype)

  def __call__(self, x: jax.Array, groups: Groups = None) -> jax.Array:  # [B, N, D] -> same
    """Self-attention within each group of `groups` (see `Block`), or over all N tokens."""
    b, n, d = x.shape

    def heads(y):  # Megatron layout: heads split over `tensor`
      y = y.reshape(b, n, self.num_heads, d // self.num_heads)
      return sharding.constrain(y, sharding.BATCH_AXES, None, "tensor", None)

    if self.implementation == "cudnn" and jax.default_backend() != "gpu":
      raise ValueError(f"model.attention='cudnn' runs only on NVIDIA GPUs; this process runs"
                       f" on {jax.default_backend()}. Use model.attention='xla'.")
    q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
    out = grouped_attention(q, k, v, groups, self.implementation)
    return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):

  def __init__(self, width: int, hidden: int, dtype, rngs: nnx.Rngs):
    self.fc1 = linear(width, hidden, ("embed", "mlp"), rngs, dtype)
    self.fc2 = linear(hidden, width, ("mlp", "embed"), rngs, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = sharding.constrain(self.fc1(x), sharding.BATCH_AXES, None, "tensor")
    return self.fc2(jax.nn.gelu(hidden, approximate=True))


class Block(nnx.Module):
  """adaLN-Zero transformer block; `cond_width` is the width of the conditioning vector.

  The residual stream x and the modulations stay float32; attention and the MLP compute in
  `dtype` and their outputs are added back in float32.
  """

  def __init__(self, width: int, num_heads: int, mlp_ratio: float, cond_width: int, dtype,
               rngs: nnx.Rngs, attention: str = "xla"):
    self.norm1 = _layer_norm(width, rngs)
    self.attn = Attention(width, num_heads, dtype, rngs, attention)
    self.norm2 = _layer_norm(width, rngs)
    self.mlp = Mlp(width, int(width * mlp_ratio), dtype, rngs)
    self.adaln = linear(cond_width, 6 * width, ("embed", "adaln"), rngs, jnp.float32,
                         init=zeros)

  def __call__(self, x: jax.Array, c: jax.Array, groups: Groups = None) -> jax.Array:
    """x: [B, N, D], c: [B, Dc]. `groups` (token counts summing to N): x packs independent
    sequences along the token axis that attend only within themselves; None: one sequence."""
    # The residual stream and modulations stay split over the batch, whole over `tensor`.
    x = sharding.constrain(x, sharding.BATCH_AXES, None, None)
    modulation = sharding.constrain(self.adaln(jax.nn.silu(c)), sharding.BATCH_AXES, None)
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(modulation, 6, -1)
    attended = self.attn(modulate(self.norm1(x), shift1, scale1), groups)
    x = x + gate1[:, None] * attended.astype(x.dtype)
    return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2)).astype(x.dtype)


def run_block(block: Block, x: jax.Array, c: jax.Array, remat: str,
              groups: Groups = None) -> jax.Array:
  """`block(x, c, groups)`, rematerialised in the backward pass under REMAT_POLICIES[remat]."""
  if remat == "none":
    return block(x, c, groups)
  return nnx.remat(lambda block, x, c: block(x, c, groups),
                   policy=REMAT_POLICIES[remat])(block, x, c)


def block_fn(block: Block, c: jax.Array, remat: str):
  """`block` as a layer `fn(x, groups)` for `run_packed`."""
  return lambda x, groups: run_block(block, x, c, remat, groups)


def _bounds(groups: tuple[int, ...]) -> list[tuple[int, int]]:
  ends = np.cumsum(groups).tolist()
  return list(zip([0] + ends[:-1], ends))


def _pack(streams: Sequence[jax.Array]) -> jax.Array:
  return streams[0] if len(streams) == 1 else jnp.concatenate(streams, axis=1)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, groups: Groups,
                      implementation: str) -> jax.Array:
  """Self-attention of q, k, v [B, N, heads, Dh] within each group of `groups` (token counts
  summing to N: packed sequences, see `run_packed`), or over all N tokens (None)."""
  outs = [jax.nn.dot_product_attention(q[:, a:z], k[:, a:z], v[:, a:z],
                                       implementation=implementation)
          for a, z in _bounds(groups or (q.shape[1],))]
  return _pack(outs)


def run_packed(fn, streams: Sequence[jax.Array], *aligned: Sequence[jax.Array]
               ) -> list[jax.Array]:
  """Applies a token-wise layer `fn(x, groups, *aligned)` to several token streams
  [B, n_i, D] at once.

  The streams are packed along the token axis into one [B, sum(n_i), D] array, so every
  linear layer is one larger matmul, and `groups` keeps attention within each stream.
  Streams that are the same array (branches before they diverge) are computed once.
  `aligned`: lists of per-stream arrays [B, n_i, ...] that go with the tokens (e.g. their
  grid positions), packed the same way.
  """
  firsts = [i for i, h in enumerate(streams) if not any(h is g for g in streams[:i])]
  groups = tuple(streams[i].shape[1] for i in firsts)
  out = fn(_pack([streams[i] for i in firsts]), groups,
           *(_pack([per_stream[i] for i in firsts]) for per_stream in aligned))
  if len(firsts) == 1:
    return [out] * len(streams)
  by_id = {id(streams[i]): out[:, a:z] for i, (a, z) in zip(firsts, _bounds(groups))}
  return [by_id[id(h)] for h in streams]


class AdaLNLinear(nnx.Module):
  """LayerNorm without affine, shift/scale from the conditioning, then a linear layer; the
  modulation and the linear layer start at zero. DiT's final layer, and MaskDiT's decoder
  input (`DecoderLayer`). The modulation is float32; the linear layer computes in `dtype`."""

  def __init__(self, width: int, cond_width: int, out_width: int, out_axis: str | None,
               dtype, *, rngs: nnx.Rngs):
    self.norm = _layer_norm(width, rngs)
    self.adaln = linear(cond_width, 2 * width, ("embed", "adaln"), rngs, jnp.float32,
                         init=zeros)
    self.linear = linear(width, out_width, ("embed", out_axis), rngs, dtype, init=zeros)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """x: [B, N, width], c: [B, cond_width] -> [B, N, out_width] float32."""
    shift, scale = jnp.split(self.adaln(jax.nn.silu(c)), 2, -1)
    return self.linear(modulate(self.norm(x), shift, scale)).astype(jnp.float32)


class MaskDecoder(nnx.Module):
  """MaskDiT decoder: full sequence, learned mask token at dropped positions."""

  def __init__(self, cfg: DiTConfig, dtype, rngs: nnx.Rngs):
    self.embed = AdaLNLinear(cfg.width, cfg.width, cfg.decoder_width, None, dtype, rngs=rngs)
    self.mask_token = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (1, 1, cfg.decoder_width)),
        **axes_metadata(None, None, "embed"))
    self.blocks = nnx.List([
        Block(cfg.decoder_width, cfg.decoder_heads, cfg.mlp_ratio, cfg.width, dtype, rngs,
              cfg.attention)
        for _ in range(cfg.decoder_depth)])
    self.grid_size = cfg.grid_size
    self.remat = cfg.remat

  def __call__(self, streams: list[jax.Array], c: jax.Array,
               subsets: Sequence[TokenSubset | None]) -> list[jax.Array]:
    """Each branch's encoder output [B, K, D] and subset -> its full sequence [B, N, Dd]
    (see `run_packed`)."""
    streams = run_packed(lambda h, _: self.embed(h, c), streams)
    full = []
    for h, subset in zip(streams, subsets):
      if subset is not None:
        b, dropped = h.shape[0], subset.num_tokens - subset.num_kept
        mask = jnp.broadcast_to(self.mask_token[...], (b, dropped, h.shape[-1]))
        h = sparsity.merge(h, mask, subset)
      full.append(h)
    pos = sincos_pos_embed(full[0].shape[-1], self.grid_size)
    streams = run_packed(lambda h, groups: h + jnp.concatenate([pos] * len(groups)), full)
    for block in self.blocks:
      streams = run_packed(block_fn(block, c, self.remat), streams)
    return streams


class DiT(nnx.Module):
  """v_theta(x_t, t, y): [B, H, W, C], [B], [B] int -> velocity [B, H, W, C]."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    w = cfg.width
    self.patch_embed = linear(cfg.patch_dim, w, ("patch", "embed"), rngs, dtype)
    # The conditioning path (time MLP, class table) is float32, like the residual stream.
    normal, f32 = nnx.initializers.normal(0.02), jnp.float32
    self.t_mlp1 = linear(TIME_FREQUENCIES, w, ("freq", "embed"), rngs, f32, init=normal)
    self.t_mlp2 = linear(w, w, ("mlp", "embed"), rngs, f32, init=normal)
    self.y_embed = nnx.Embed(cfg.num_classes + 1, w, dtype=f32, embedding_init=normal,
                             embedding_metadata=axes_metadata("classes", "embed"), rngs=rngs)
    after_route = {route.end + 1 for route in cfg.routes}
    # TREAD's fp32_next: the block after a route runs in float32 (XLA attention, since
    # cuDNN's flash kernel takes only 16-bit inputs).
    self.blocks = nnx.List([
        Block(w, cfg.num_heads, cfg.mlp_ratio, w, f32, rngs, "xla") if i in after_route
        else Block(w, cfg.num_heads, cfg.mlp_ratio, w, dtype, rngs, cfg.attention)
        for i in range(cfg.depth)])
    if cfg.sparsity == "masking":
      self.decoder = MaskDecoder(cfg, dtype, rngs)
      self.final = AdaLNLinear(cfg.decoder_width, w, cfg.patch_dim, "patch", f32, rngs=rngs)
    else:
      self.decoder = None
      self.final = AdaLNLinear(w, w, cfg.patch_dim, "patch", f32, rngs=rngs)

  def draw_subsets(self, key: jax.Array, batch_size: int,
                   gamma: float | None = None) -> tuple[TokenSubset | None, ...]:
    """Random token subsets for one forward pass.

    gamma=None uses the training rates of the config; a float applies that rate to every
    route (the test-time knob). A rate that keeps every token gives None: no gather at all.
    """
    return draw_subsets(self.cfg, key, batch_size, gamma)

  def null_condition(self, y: jax.Array) -> jax.Array:
    """The unconditional input of guidance: the null class for every label."""
    return jnp.full_like(y, self.cfg.num_classes)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array,
               subsets: Sequence[TokenSubset | None] = ()) -> jax.Array:
    return self.branches(x, t, y, (tuple(subsets),))[0]

  def branches(self, x: jax.Array, t: jax.Array, y: jax.Array,
               branch_subsets: Sequence[Sequence[TokenSubset | None]]) -> tuple[jax.Array, ...]:
    """The velocities of several sparsity branches at the same x, t and y, in one pass.

    One entry of `branch_subsets` per branch (the `subsets` of `__call__`). The branches'
    token streams are packed along the token axis (`run_packed`): each linear layer runs once
    on all branches' tokens and attention stays within each branch, so SG's weak branch
    (few kept tokens) rides along in the strong branch's matmuls. Work the branches share
    (embeddings, conditioning, blocks before the first route) is done once, even inside a
    loop body, where XLA does not merge two calls' common work. Equals calling the model
    once per branch.
    """
    cfg = self.cfg
    h = self.patch_embed(patchify(x, cfg.patch_size)).astype(jnp.float32)
    h = h + sincos_pos_embed(cfg.width, cfg.grid_size)
    c = self.t_mlp2(jax.nn.silu(self.t_mlp1(timestep_embedding(t, cfg.time_scale))))
    c = sharding.constrain(c + self.y_embed(y), sharding.BATCH_AXES, None)
    streams = [h] * len(branch_subsets)
    if cfg.sparsity == "masking":
      subsets = [s[0] if s else None for s in branch_subsets]
      streams = [h if s is None else sparsity.gather(h, s.keep)
                 for h, s in zip(streams, subsets)]
      for block in self.blocks:
        streams = run_packed(block_fn(block, c, cfg.remat), streams)
      streams = self.decoder(streams, c, subsets)
    else:
      streams = self._routed_blocks(streams, c, branch_subsets)
    outs = run_packed(lambda h, _: self.final(h, c), streams)
    return tuple(unpatchify(out, cfg.patch_size, cfg.in_channels) for out in outs)

  def _routed_blocks(self, streams, c, branch_subsets):
    """Each branch's token stream through the blocks, TREAD routes applied."""
    return run_routed(lambda i: block_fn(self.blocks[i], c, self.cfg.remat), len(self.blocks),
                      self.cfg.routes, streams, branch_subsets)


def run_routed(layer, depth: int, routes, streams: Sequence[jax.Array],
               branch_subsets, *aligned: Sequence[jax.Array]) -> list[jax.Array]:
  """Each branch's token stream through `depth` layers, TREAD routes applied, the branches
  packed (`run_packed`). `layer(i)` is layer i as `fn(x, groups, *aligned)`; branch b's
  `branch_subsets[b][r]` is its TokenSubset for route r (None: keep every token). `aligned`:
  per-stream arrays that go with the tokens (positions), gathered with the kept ones."""
  by_start = {route.start: r for r, route in enumerate(routes)}
  i = 0
  while i < depth:
    r = by_start.get(i)
    subsets = [s[r] if s and r is not None else None for s in branch_subsets]
    if all(subset is None for subset in subsets):
      streams = run_packed(layer(i), streams, *aligned)
      i += 1
      continue
    # TREAD: layers start..end see the kept tokens; the others skip them unchanged.
    keep = lambda arrays: [a if s is None else sparsity.gather(a, s.keep)
                           for a, s in zip(arrays, subsets)]
    kept, kept_aligned = keep(streams), [keep(arrays) for arrays in aligned]
    for j in range(routes[r].start, routes[r].end + 1):
      kept = run_packed(layer(j), kept, *kept_aligned)
    streams = [k if s is None else sparsity.merge(k, sparsity.gather(h, s.drop), s)
               for h, k, s in zip(streams, kept, subsets)]
    i = routes[r].end + 1
  return streams


def route_rates(cfg: DiTConfig, gamma: float | None) -> tuple[float, ...]:
  """The sparsity rate of each route (routing) or of the encoder (masking) for one pass."""
  if cfg.sparsity == "routing":
    return tuple(route.gamma if gamma is None else gamma for route in cfg.routes)
  if cfg.sparsity == "masking":
    return (cfg.mask_gamma if gamma is None else gamma,)
  if gamma:
    raise ValueError(f"gamma={gamma}: a dense model (model.sparsity='dense') has no route to"
                     " apply a sparsity rate to; use a routing or masking model.")
  return ()


def draw_subsets(cfg: DiTConfig, key: jax.Array, batch_size: int,
                 gamma: float | None = None) -> tuple[TokenSubset | None, ...]:
  """See `DiT.draw_subsets`."""
  subsets = []
  for i, rate in enumerate(route_rates(cfg, gamma)):
    if sparsity.num_kept(cfg.num_tokens, rate) == cfg.num_tokens:
      subsets.append(None)
    else:
      subsets.append(sparsity.random_subset(jax.random.fold_in(key, i), batch_size,
                                            cfg.num_tokens, rate))
  return tuple(subsets)
