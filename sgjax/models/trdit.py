"""TR-DiT: the paper's text-to-image transformer, in Flax NNX, with TREAD routing.

Llama-style blocks (PAPER.md section 5): RMSNorm pre-norm, no biases anywhere, self-attention
with axial 2D rotary position embeddings (RoPE), cross-attention to the text tokens with
their padding mask, and a SwiGLU feed-forward of expansion 8/3 (rounded up to a multiple of
`mlp_multiple`). Two choices the paper leaves open, documented here:

- Timestep conditioning is PixArt-alpha's adaLN-single: one MLP maps t to six modulations
  (shift, scale, gate for attention and for the feed-forward), shared by all blocks, to which
  each block adds its own learned table. Per-block adaLN as in DiT would add 6 * width^2
  parameters a block, 0.86B at the 2.5B model's width. Tables and the shared projection
  start at zero, so every block starts as the identity (adaLN-Zero's property); so does
  cross-attention, whose output projection starts at zero.
- q and k are RMS-normalised per head before RoPE (as in SD3 and Lumina), which keeps
  attention logits bounded in bf16 at this scale.
- `pos_embed="sincos"` (not the paper's: its 2.5B config keeps "none") also adds DiT's fixed
  2D sin-cos table to the patch tokens. RoPE alone is relative, so a token learns where it
  stands only from the canvas's edges; the text-to-image demo's tiny model, trained for
  minutes, does not, and draws digits far better with the table (`configs/t2i.py`).

Text enters as the hidden states of a frozen encoder [B, L, text_width] and their mask
[B, L]. A 2-layer transformer (`refiner_depth`) refines them at the model's width before
every block's cross-attention reads them. A caption whose mask is all False is the null
caption of guidance: its hidden states are replaced by a learned null embedding with a full
mask, so CFG's weak branch and guidance dropout only clear the mask (`null_condition`).

Routing applies to image tokens only. The route's blocks see the kept image tokens, each
with its 2D grid position gathered alongside, so RoPE rotates a kept token exactly as in the
full sequence; text tokens and cross-attention keys and values are never routed. Masking
(MaskDiT) is implemented for DiT only.

Mixed precision as in `sgjax.models.dit`: parameters, residual stream, modulations, norms,
text refiner output and the final layer are float32; token matmuls and attention run in
`dtype`, and the block after each route runs in float32 (TREAD's fp32_next).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgjax import sharding, sparsity
from sgjax.models import dit
from sgjax.models.dit import axes_metadata, linear
from sgjax.sparsity import Route, TokenSubset

SPARSITY_MODES = ("dense", "routing")
# "none": positions only through RoPE, as the paper's model; "sincos": DiT's fixed 2D sin-cos
# table is also added to the patch tokens (before any route, so kept tokens carry it).
POS_EMBEDS = ("none", "sincos")
# The conditioning of a text-to-image model: {"text": float [B, L, text_width],
# "mask": bool [B, L]} (True at real tokens; an all-False row is the null caption).
Condition = dict


@dataclasses.dataclass(frozen=True)
class TRDiTConfig(dit.PatchGrid):
  """Architecture and sparsity of one TR-DiT. Fields are plain values (JSON-able)."""

  input_size: int = 64  # H = W of the latent image
  in_channels: int = 4
  patch_size: int = 2
  width: int = 2048
  depth: int = 34
  num_heads: int = 16
  mlp_multiple: int = 256  # SwiGLU hidden = 8/3 * width, rounded up to a multiple of this
  text_width: int = 2560  # hidden width of the frozen text encoder
  text_length: int = 256  # text tokens per caption (the encoder's padded length)
  refiner_depth: int = 2  # transformer blocks refining the text before cross-attention
  sparsity: str = "dense"  # dense | routing
  routes: tuple[Route, ...] = ()
  dtype: str = "float32"
  time_scale: float = 1000.0  # the frequency embedding sees t * time_scale
  rope_theta: float = 10000.0
  remat: str = "none"  # a key of dit.REMAT_POLICIES
  attention: str = "xla"  # one of dit.ATTENTION_KERNELS
  pos_embed: str = "none"  # one of POS_EMBEDS: also add a fixed absolute embedding?

  text_conditioned = True  # conditioning is text (not class labels)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    return -(-(8 * self.width // 3) // self.mlp_multiple) * self.mlp_multiple

  def validate(self, prefix: str = "model") -> "TRDiTConfig":
    """Raises ValueError naming the field and value of the first invalid setting."""
    for name in ("input_size", "in_channels", "patch_size", "width", "depth", "num_heads",
                 "mlp_multiple", "text_width", "text_length"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{prefix}.{name}={getattr(self, name)!r} must be positive.")
    if self.refiner_depth < 0:
      raise ValueError(f"{prefix}.refiner_depth={self.refiner_depth} must be >= 0.")
    if self.input_size % self.patch_size:
      raise ValueError(f"{prefix}.patch_size={self.patch_size} does not divide"
                       f" {prefix}.input_size={self.input_size}.")
    if self.width % self.num_heads or self.head_dim % 4:
      raise ValueError(f"{prefix}.width={self.width} / {prefix}.num_heads={self.num_heads}"
                       " must be a whole head dim divisible by 4 (axial RoPE rotates pairs"
                       " of channels along two axes).")
    if not self.time_scale > 0 or not self.rope_theta > 1:
      raise ValueError(f"{prefix}.time_scale must be > 0 and {prefix}.rope_theta > 1.")
    if self.remat not in dit.REMAT_POLICIES:
      raise ValueError(f"{prefix}.remat={self.remat!r}: choose one of"
                       f" {list(dit.REMAT_POLICIES)}.")
    if self.attention not in dit.ATTENTION_KERNELS:
      raise ValueError(f"{prefix}.attention={self.attention!r}: choose one of"
                       f" {dit.ATTENTION_KERNELS}.")
    if self.attention == "cudnn" and self.dtype not in ("bfloat16", "float16"):
      raise ValueError(f"{prefix}.attention='cudnn' needs {prefix}.dtype bfloat16 or float16.")
    if self.pos_embed not in POS_EMBEDS:
      raise ValueError(f"{prefix}.pos_embed={self.pos_embed!r}: choose one of {POS_EMBEDS}.")
    if self.sparsity not in SPARSITY_MODES:
      raise ValueError(f"{prefix}.sparsity={self.sparsity!r}: TR-DiT supports"
                       f" {SPARSITY_MODES} (MaskDiT masking is implemented for DiT only).")
    sparsity.check_mode_routes(self.sparsity, self.routes, self.depth, prefix)
    return self


def grid_positions(grid_size: int) -> np.ndarray:
  """[N, 2] int32 (row, column) of each token in `dit.patchify`'s row-major order."""
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  return np.stack([rows.reshape(-1), cols.reshape(-1)], -1).astype(np.int32)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """positions [B, N, 2] (row, column) -> rotation angles [B, N, head_dim // 2]: the first
  half of the rotated pairs turns with the row, the second with the column."""
  quarter = head_dim // 4
  freqs = theta ** (-jnp.arange(quarter, dtype=jnp.float32) / quarter)
  pos = positions.astype(jnp.float32)
  return jnp.concatenate([pos[..., :1] * freqs, pos[..., 1:] * freqs], -1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates x [B, N, H, Dh] by angles [B, N, Dh // 2]; channel i pairs with i + Dh // 2."""
  half = x.shape[-1] // 2
  cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _rms_norm(width: int, rngs: nnx.Rngs, use_scale: bool = True,
              axis: str = "embed") -> nnx.RMSNorm:
  return nnx.RMSNorm(width, epsilon=1e-6, dtype=jnp.float32, use_scale=use_scale,
                     scale_metadata=axes_metadata(axis), rngs=rngs)


class Attention(nnx.Module):
  """Multi-head attention without biases, q/k RMS-normalised per head: x's tokens attend to
  `context` [B, L, width] (default: x itself), to the keys where `mask` [B, L] is True (default:
  all); `angles` rotates queries and keys (RoPE; self-attention only)."""

  def __init__(self, width: int, num_heads: int, dtype, rngs: nnx.Rngs, *,
               implementation: str = "xla", out_init=dit.xavier_uniform):
    self.num_heads = num_heads
    self.implementation = implementation
    head_dim = width // num_heads
    self.q = linear(width, width, ("embed", "heads"), rngs, dtype, use_bias=False)
    self.k = linear(width, width, ("embed", "heads"), rngs, dtype, use_bias=False)
    self.v = linear(width, width, ("embed", "heads"), rngs, dtype, use_bias=False)
    self.proj = linear(width, width, ("heads", "embed"), rngs, dtype, init=out_init,
                       use_bias=False)
    self.q_norm = nnx.RMSNorm(head_dim, epsilon=1e-6, dtype=jnp.float32, rngs=rngs)
    self.k_norm = nnx.RMSNorm(head_dim, epsilon=1e-6, dtype=jnp.float32, rngs=rngs)

  def __call__(self, x: jax.Array, *, angles: jax.Array | None = None,
               context: jax.Array | None = None, mask: jax.Array | None = None,
               groups: dit.Groups = None) -> jax.Array:
    b, n, d = x.shape
    source = x if context is None else context

    def heads(y):  # Megatron layout: heads split over `tensor`
      y = y.reshape(b, y.shape[1], self.num_heads, d // self.num_heads)
      return sharding.constrain(y, sharding.BATCH_AXES, None, "tensor", None)

    dtype = self.q.dtype
    q = self.q_norm(heads(self.q(x))).astype(dtype)
    k = self.k_norm(heads(self.k(source))).astype(dtype)
    v = heads(self.v(source))
    if angles is not None:
      q, k = apply_rope(q, angles), apply_rope(k, angles)
    if mask is None:  # image self-attention, within each packed sequence (`dit.run_packed`)
      out = dit.grouped_attention(q, k, v, groups, self.implementation)
    else:  # keys under the text's padding mask (the refiner, cross-attention)
      out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :],
                                         implementation="xla")
    return self.proj(out.reshape(b, n, d))


class SwiGLU(nnx.Module):

  def __init__(self, width: int, hidden: int, dtype, rngs: nnx.Rngs):
    self.gate = linear(width, hidden, ("embed", "mlp"), rngs, dtype, use_bias=False)
    self.up = linear(width, hidden, ("embed", "mlp"), rngs, dtype, use_bias=False)
    self.down = linear(hidden, width, ("mlp", "embed"), rngs, dtype, use_bias=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = jax.nn.silu(self.gate(x)) * self.up(x)
    return self.down(sharding.constrain(hidden, sharding.BATCH_AXES, None, "tensor"))


class TextBlock(nnx.Module):
  """A pre-norm transformer block over the text tokens (the refiner)."""

  def __init__(self, cfg: TRDiTConfig, dtype, rngs: nnx.Rngs):
    self.norm1 = _rms_norm(cfg.width, rngs)
    self.attn = Attention(cfg.width, cfg.num_heads, dtype, rngs)
    self.norm2 = _rms_norm(cfg.width, rngs)
    self.mlp = SwiGLU(cfg.width, cfg.mlp_hidden, dtype, rngs)

  def __call__(self, text: jax.Array, mask: jax.Array) -> jax.Array:
    normed = self.norm1(text)
    text = text + self.attn(normed, context=normed, mask=mask).astype(text.dtype)
    return text + self.mlp(self.norm2(text)).astype(text.dtype)


class Block(nnx.Module):
  """Self-attention (RoPE), cross-attention to the text, SwiGLU; adaLN-single modulation."""

  def __init__(self, cfg: TRDiTConfig, dtype, rngs: nnx.Rngs, attention: str):
    w = cfg.width
    self.norm1 = _rms_norm(w, rngs, use_scale=False)
    self.attn = Attention(w, cfg.num_heads, dtype, rngs, implementation=attention)
    self.norm_cross = _rms_norm(w, rngs)
    self.cross = Attention(w, cfg.num_heads, dtype, rngs, out_init=dit.zeros)
    self.norm2 = _rms_norm(w, rngs, use_scale=False)
    self.mlp = SwiGLU(w, cfg.mlp_hidden, dtype, rngs)
    self.table = nnx.Param(jnp.zeros((6, w), jnp.float32), **axes_metadata(None, "embed"))

  def __call__(self, x: jax.Array, modulation: jax.Array, angles: jax.Array,
               text: jax.Array, mask: jax.Array, groups: dit.Groups = None) -> jax.Array:
    """x [B, N, D], modulation [B, 6, D], angles [B, N, Dh / 2], text [B, L, D], mask [B, L];
    `groups`: x packs several sequences of image tokens (see `dit.Block`)."""
    x = sharding.constrain(x, sharding.BATCH_AXES, None, None)
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.unstack(modulation + self.table, axis=1)
    attended = self.attn(dit.modulate(self.norm1(x), shift1, scale1), angles=angles,
                         groups=groups)
    x = x + gate1[:, None] * attended.astype(x.dtype)
    x = x + self.cross(self.norm_cross(x), context=text, mask=mask).astype(x.dtype)
    return x + gate2[:, None] * self.mlp(dit.modulate(self.norm2(x), shift2, scale2)).astype(
        x.dtype)


class TRDiT(nnx.Module):
  """v_theta(x_t, t, text): [B, H, W, C], [B], Condition -> velocity [B, H, W, C]."""

  def __init__(self, cfg: TRDiTConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    dtype, f32 = jnp.dtype(cfg.dtype), jnp.float32
    w, normal = cfg.width, nnx.initializers.normal(0.02)
    self.patch_embed = linear(cfg.patch_dim, w, ("patch", "embed"), rngs, dtype, use_bias=False)
    self.t_mlp1 = linear(dit.TIME_FREQUENCIES, w, ("freq", "embed"), rngs, f32, init=normal,
                         use_bias=False)
    self.t_mlp2 = linear(w, w, ("mlp", "embed"), rngs, f32, init=normal, use_bias=False)
    self.t_modulation = linear(w, 6 * w, ("embed", "adaln"), rngs, f32, init=dit.zeros,
                               use_bias=False)
    self.null_text = nnx.Param(normal(rngs.params(), (cfg.text_length, cfg.text_width)),
                               **axes_metadata(None, "text"))
    self.text_norm = _rms_norm(cfg.text_width, rngs, axis="text")
    self.text_in = linear(cfg.text_width, w, ("text", "embed"), rngs, dtype, use_bias=False)
    self.refiner = nnx.List([TextBlock(cfg, dtype, rngs) for _ in range(cfg.refiner_depth)])
    after_route = {route.end + 1 for route in cfg.routes}
    self.blocks = nnx.List([
        Block(cfg, f32, rngs, "xla") if i in after_route else Block(cfg, dtype, rngs,
                                                                      cfg.attention)
        for i in range(cfg.depth)])
    self.final_norm = _rms_norm(w, rngs, use_scale=False)
    self.final_modulation = linear(w, 2 * w, ("embed", "adaln"), rngs, f32, init=dit.zeros,
                                   use_bias=False)
    self.final = linear(w, cfg.patch_dim, ("embed", "patch"), rngs, f32, init=dit.zeros,
                        use_bias=False)

  def draw_subsets(self, key: jax.Array, batch_size: int,
                   gamma: float | None = None) -> tuple[TokenSubset | None, ...]:
    """Random image-token subsets for one forward pass (see `dit.DiT.draw_subsets`)."""
    return dit.draw_subsets(self.cfg, key, batch_size, gamma)

  @staticmethod
  def null_condition(cond: Condition) -> Condition:
    """The unconditional input of guidance: the same tensors with an all-False mask."""
    return {**cond, "mask": jnp.zeros_like(cond["mask"])}

  def encode_text(self, cond: Condition) -> tuple[jax.Array, jax.Array]:
    """(refined text [B, L, width] float32, mask [B, L]); null captions take the learned
    null embedding under a full mask."""
    text, mask = cond["text"], cond["mask"].astype(bool)
    if text.shape[1:] != (self.cfg.text_length, self.cfg.text_width):
      raise ValueError(f"text hidden states of shape {text.shape[1:]}, but the model takes"
                       f" [model.text_length={self.cfg.text_length}, model.text_width="
                       f"{self.cfg.text_width}]; encode with the encoder the model was"
                       " configured for.")
    null = ~jnp.any(mask, axis=-1)
    text = jnp.where(null[:, None, None], self.null_text[...], text.astype(jnp.float32))
    mask = mask | null[:, None]
    text = self.text_in(self.text_norm(text)).astype(jnp.float32)
    for block in self.refiner:
      text = block(text, mask)
    return text, mask

  def __call__(self, x: jax.Array, t: jax.Array, cond: Condition,
               subsets: Sequence[TokenSubset | None] = ()) -> jax.Array:
    return self.branches(x, t, cond, (subsets,))[0]

  def branches(self, x: jax.Array, t: jax.Array, cond: Condition,
               branch_subsets: Sequence[Sequence[TokenSubset | None]]) -> tuple[jax.Array, ...]:
    """The velocities of several sparsity branches at the same x, t and text, in one pass.

    As `dit.DiT.branches`: the branches' image tokens are packed along the token axis (each
    with its grid position), self-attention stays within each branch, cross-attention reads
    the one refined text, and the work the branches share (embeddings, modulations, the text
    refiner, the text's keys and values in every block, blocks before the first route) is
    done once. Equals calling the model once per branch.
    """
    cfg = self.cfg
    h = self.patch_embed(dit.patchify(x, cfg.patch_size)).astype(jnp.float32)
    if cfg.pos_embed == "sincos":
      h = h + dit.sincos_pos_embed(cfg.width, cfg.grid_size)
    c = self.t_mlp2(jax.nn.silu(self.t_mlp1(dit.timestep_embedding(t, cfg.time_scale))))
    c = sharding.constrain(c, sharding.BATCH_AXES, None)
    modulation = self.t_modulation(jax.nn.silu(c)).reshape(-1, 6, cfg.width)
    text, mask = self.encode_text(cond)
    positions = jnp.broadcast_to(grid_positions(cfg.grid_size), (h.shape[0], cfg.num_tokens, 2))

    def layer(block):  # a layer for `dit.run_packed`

      def run(h, groups, positions):
        angles = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        fn = lambda block, *args: block(*args, groups)
        if cfg.remat != "none":
          fn = nnx.remat(fn, policy=dit.REMAT_POLICIES[cfg.remat])
        return fn(block, h, modulation, angles, text, mask)

      return run

    # The routes' blocks see each branch's kept image tokens with their own grid positions.
    streams = dit.run_routed(lambda i: layer(self.blocks[i]), cfg.depth, cfg.routes,
                             [h] * len(branch_subsets), branch_subsets,
                             [positions] * len(branch_subsets))
    shift, scale = jnp.split(self.final_modulation(jax.nn.silu(c)), 2, -1)
    outs = dit.run_packed(
        lambda h, _: self.final(dit.modulate(self.final_norm(h), shift, scale)), streams)
    return tuple(dit.unpatchify(out.astype(jnp.float32), cfg.patch_size, cfg.in_channels)
                 for out in outs)
