"""FLOPs of one forward pass and of guided sampling, counted from the architecture.

No compilation: the counts follow the model config and, for sampling, the per-step guidance
settings of `sgjax.guidance.step_settings` (the same ones the sampler uses). Two conventions,
per image:
- true: 2 FLOPs per multiply-add of every matmul, attention scores and values included
  (elementwise work, normalisation and softmax are not counted);
- paper: multiply-adds of the linear layers only, no attention matmuls, as in Table 2 of the
  Sparse Guidance paper.

SiT-XL/2 with the route 2->24, per image per Euler step, against Table 2:

  setting                              ours (paper convention)   Table 2
  unguided                             114.39                    114.42
  CFG / AG / ICG                       228.78                    228.84
  SG_FLOPS (0.5 / 0.9)                  97.65                     97.67
  SG_FID, cosine rounded to 8 levels   172.97                    173.16
  SG_FID, exact cosine (num_levels=0)  172.85

The gaps are not SiT's learn-sigma head (its 4 extra output channels add 0.005). Table 2's
numbers fit a count with about 4,200 more multiply-adds per token per block (3.6 per
channel, as if the adaLN modulate and gate products were counted): 0.030 dense, 0.026 at
SG_FLOPS's token counts, which closes both gaps to 0.01. SG_FID has a second one: in the
paper convention a step costs 2 * f(0) - 0.366 G per token the two branches drop, and with
gammas summing to 0.6 they drop int(256 g) + int(256 (0.6 - g)) = 152 or 153 tokens. The exact
cosine drops 153 at 28 of 40 steps and 152 at 12; Table 2's 173.16 is what 152 at every step
gives (173.10, +0.05 for the per-token term), so their schedule's rounding differs from ours
(another step grid, or K rounded otherwise), which we cannot tell from the paper.

    python -m sgjax.flops --config=configs/imagenet256.py:model=SiT-XL/2,sparsity=routing \
        --gamma=0.5                                      # one forward pass
    python -m sgjax.flops --config=configs/imagenet256.py:model=SiT-XL/2,sparsity=routing \
        --guidance=sg --gamma_strong=0.5 --gamma_weak=0.9   # one guided sampling step
"""

from __future__ import annotations

import dataclasses
import json

from sgjax import guidance as guidance_lib
from sgjax import sparsity
from sgjax.models import dit


@dataclasses.dataclass(frozen=True)
class Flops:
  true: float  # FLOPs (2 per multiply-add, attention included)
  paper: float  # multiply-adds of linear layers only

  def __add__(self, other: "Flops") -> "Flops":
    return Flops(self.true + other.true, self.paper + other.paper)

  def __mul__(self, factor: float) -> "Flops":
    return Flops(self.true * factor, self.paper * factor)

  __rmul__ = __mul__


def _linear(tokens: int, d_in: int, d_out: int) -> Flops:
  macs = tokens * d_in * d_out
  return Flops(true=2.0 * macs, paper=float(macs))


def _block(tokens: int, width: int, mlp_ratio: float, cond_width: int) -> Flops:
  return _linear(1, cond_width, 6 * width) + _token_work(tokens, width, mlp_ratio)


def _token_work(tokens: int, width: int, mlp_ratio: float) -> Flops:
  """A block without its adaLN modulation (which depends on the conditioning only)."""
  hidden = int(width * mlp_ratio)
  linears = (4 * _linear(tokens, width, width) + _linear(tokens, width, hidden)
             + _linear(tokens, hidden, width))
  attention = 2.0 * 2.0 * tokens * tokens * width  # scores q.k and weighted sum of v
  return linears + Flops(true=attention, paper=0.0)


def block_tokens(cfg: dit.DiTConfig, gamma: float | None = None) -> list[int]:
  """Tokens each encoder block processes in one forward pass at rate `gamma`."""
  n = cfg.num_tokens
  rates = dit.route_rates(cfg, gamma)
  tokens = [n] * cfg.depth
  if cfg.sparsity == "routing":
    for route, rate in zip(cfg.routes, rates):
      for i in range(route.start, route.end + 1):
        tokens[i] = sparsity.num_kept(n, rate)
  elif cfg.sparsity == "masking":
    tokens = [sparsity.num_kept(n, rates[0])] * cfg.depth
  return tokens


def forward_flops(cfg: dit.DiTConfig, gamma: float | None = None) -> Flops:
  """FLOPs per image of one forward pass; gamma=None uses the config's training rates."""
  if cfg.text_conditioned:
    return _trdit_forward_flops(cfg, gamma)
  n, w = cfg.num_tokens, cfg.width
  tokens = block_tokens(cfg, gamma)
  total = (_linear(n, cfg.patch_dim, w) + _linear(1, dit.TIME_FREQUENCIES, w)
           + _linear(1, w, w))
  for k in tokens:
    total += _block(k, w, cfg.mlp_ratio, w)
  out_width = w
  if cfg.sparsity == "masking":
    out_width = cfg.decoder_width
    # MaskDiT's decoder input: adaLN shift/scale, then the linear layer.
    total += _linear(1, w, 2 * w) + _linear(tokens[-1], w, out_width)
    for _ in range(cfg.decoder_depth):
      total += _block(n, out_width, cfg.mlp_ratio, w)
  return total + _linear(1, w, 2 * out_width) + _linear(n, out_width, cfg.patch_dim)


def _attention(queries: int, keys: int, width: int) -> Flops:
  return Flops(true=2.0 * 2.0 * queries * keys * width, paper=0.0)


def _trdit_forward_flops(cfg, gamma: float | None) -> Flops:
  """`forward_flops` of a TR-DiT (`sgjax.models.trdit`): the text refiner runs on all
  `text_length` tokens, padding included (static shapes), and every block's cross-attention
  projects the whole text to keys and values."""
  total = _trdit_time_flops(cfg) + _trdit_text_flops(cfg)
  for k in block_tokens(cfg, gamma):
    total += _trdit_block_flops(cfg, k)
  return total + _linear(cfg.num_tokens, cfg.width, cfg.patch_dim)


def _trdit_time_flops(cfg) -> Flops:
  """The work on x and t alone: patch embedding, timestep MLP, adaLN-single modulations."""
  w = cfg.width
  return (_linear(cfg.num_tokens, cfg.patch_dim, w) + _linear(1, dit.TIME_FREQUENCIES, w)
          + _linear(1, w, w) + _linear(1, w, 6 * w) + _linear(1, w, 2 * w))


def _trdit_text_flops(cfg) -> Flops:
  """The text's input projection and refiner."""
  w, length, hidden = cfg.width, cfg.text_length, cfg.mlp_hidden
  total = _linear(length, cfg.text_width, w)
  for _ in range(cfg.refiner_depth):
    total += (4 * _linear(length, w, w) + _attention(length, length, w)
              + 2 * _linear(length, w, hidden) + _linear(length, hidden, w))
  return total


def _trdit_block_flops(cfg, k: int) -> Flops:
  """One block on k image tokens: self-attention, cross-attention, SwiGLU."""
  w, length, hidden = cfg.width, cfg.text_length, cfg.mlp_hidden
  return (4 * _linear(k, w, w) + _attention(k, k, w)
          + 2 * _linear(k, w, w) + 2 * _linear(length, w, w) + _attention(k, length, w)
          + 2 * _linear(k, w, hidden) + _linear(k, hidden, w))


def _trdit_shared_flops(cfg, kept: list[int], same_labels: bool) -> Flops:
  """`shared_branch_flops` of a TR-DiT, whose modulations depend on t alone."""
  n, w = cfg.num_tokens, cfg.width
  first = min((route.start for route in cfg.routes), default=cfg.depth)
  if not same_labels:  # cfg: the null caption. In the vmapped call (equal token counts) the
    # work on x and t is shared, and so is block 0 up to the text: its self-attention and its
    # cross-attention's queries, unless a route starting at block 0 gives each branch other
    # tokens.
    if kept[0] != kept[1]:
      return Flops(0.0, 0.0)
    shared = _trdit_time_flops(cfg)
    if first > 0 or kept[0] == n:
      shared += 5 * _linear(n, w, w) + _attention(n, n, w)
    return shared
  if kept == [n, n]:
    return forward_flops(cfg, 0.0)
  # sg (`TRDiT.branches`): the text and its keys and values in every block, and the blocks
  # before the first route.
  return (_trdit_time_flops(cfg) + _trdit_text_flops(cfg) + first * _trdit_block_flops(cfg, n)
          + (cfg.depth - first) * 2 * _linear(cfg.text_length, w, w))


def report(cfg: dit.DiTConfig, gamma: float | None, name: str = "") -> dict:
  """The JSON object printed by `python -m sgjax.flops`."""
  flops = forward_flops(cfg, gamma)
  return {
      "model": name,
      "sparsity": cfg.sparsity,
      "gamma": gamma,
      "tokens": cfg.num_tokens,
      "block_tokens": block_tokens(cfg, gamma),
      "gflops_true": flops.true / 1e9,
      "gflops_paper": flops.paper / 1e9,
      "note": "per image per forward pass; true = 2 FLOPs per multiply-add incl. attention,"
              " paper = linear-layer multiply-adds only (Table 2 convention)",
  }


def weak_branch_config(model_cfg: dit.DiTConfig, guidance: guidance_lib.GuidanceConfig,
                       aux_cfg: dit.DiTConfig | None = None) -> dit.DiTConfig:
  """The architecture of the weak branch: the auxiliary model for ag rules (default: the
  same architecture as the main model, e.g. its early checkpoint), else the main model."""
  return (aux_cfg or model_cfg) if guidance.uses_aux else model_cfg


def shared_branch_flops(cfg: dit.DiTConfig, gamma_strong: float, gamma_weak: float,
                        same_labels: bool) -> Flops:
  """True FLOPs that two branches of one model compute identically, per image.

  Both branches see the same x_t and t, so the patch and time embeddings are equal; with the
  same labels (sg) so is the conditioning vector, hence every adaLN modulation and, for
  routing, every block before the first route; if neither branch drops a token, all of it.
  The sampler computes that work once where it evaluates the branches as one call: with the
  same labels (`DiT.branches`, `TRDiT.branches`: the packed pass) and at equal token counts
  (vmapped over the branches, x and t unbatched). Different labels at different token
  counts take two calls, which share nothing inside the sampling loop. True step FLOPs
  subtract the shared work; the paper convention (Table 2) counts both branches in full:
  its `paper` part is 0.
  """
  n, w = cfg.num_tokens, cfg.width
  kept = [min(block_tokens(cfg, gamma)) for gamma in (gamma_strong, gamma_weak)]
  if cfg.text_conditioned:
    return Flops(_trdit_shared_flops(cfg, kept, same_labels).true, 0.0)
  if same_labels and kept == [n, n]:
    return Flops(forward_flops(cfg, 0.0).true, 0.0)
  if not same_labels and kept[0] != kept[1]:
    return Flops(0.0, 0.0)
  shared = (_linear(n, cfg.patch_dim, w) + _linear(1, dit.TIME_FREQUENCIES, w)
            + _linear(1, w, w))
  if same_labels:
    out_width = w
    shared += cfg.depth * _linear(1, w, 6 * w)
    if cfg.sparsity == "masking":
      out_width = cfg.decoder_width
      shared += _linear(1, w, 2 * w) + cfg.decoder_depth * _linear(1, w, 6 * out_width)
    shared += _linear(1, w, 2 * out_width)
    if cfg.sparsity == "routing":
      shared += min(route.start for route in cfg.routes) * _token_work(n, w, cfg.mlp_ratio)
  return Flops(shared.true, 0.0)


def guided_step_flops(model_cfg: dit.DiTConfig, guidance: guidance_lib.GuidanceConfig,
                      aux_cfg: dit.DiTConfig | None = None, step: int = 0, steps: int = 1,
                      stages: int = 1) -> Flops:
  """FLOPs per image of sampling step `step` of `steps`.

  f(gamma_strong) + f(gamma_weak) on a guided step, f(gamma_strong) alone on an unguided one
  (rule none, or outside the guidance interval), times `stages` model evaluations per step
  (Euler 1, Heun 2). Table 2 of the paper counts Euler steps. True FLOPs count the work both
  branches share once (`shared_branch_flops`), as the compiled step does.
  """
  setting = guidance_lib.step_settings(guidance, steps)[step]
  total = forward_flops(model_cfg, setting.gamma_strong)
  if setting.guided:
    total += forward_flops(weak_branch_config(model_cfg, guidance, aux_cfg), setting.gamma_weak)
    if not guidance.uses_aux:  # one model: some work is common to both branches
      same_labels = guidance.rule not in guidance_lib.NULL_LABEL_RULES + ("icg",)
      total += -1.0 * shared_branch_flops(model_cfg, setting.gamma_strong, setting.gamma_weak,
                                          same_labels)
  return total * stages


def trajectory_flops(model_cfg: dit.DiTConfig, guidance: guidance_lib.GuidanceConfig,
                     aux_cfg: dit.DiTConfig | None = None, steps: int = 40,
                     stages: int = 1) -> Flops:
  """FLOPs per image of a whole sampling run: the sum of its steps' `guided_step_flops`."""
  total = Flops(0.0, 0.0)
  for step in range(steps):
    total += guided_step_flops(model_cfg, guidance, aux_cfg, step, steps, stages)
  return total


def guided_report(cfg: dit.DiTConfig, guidance: guidance_lib.GuidanceConfig, steps: int,
                  name: str = "") -> dict:
  """The JSON object printed by `python -m sgjax.flops --guidance=...`: the sampler's plan
  (validated as sampling would), with its FLOPs per image."""
  from sgjax import sampling  # pylint: disable=g-import-not-at-top  (it builds on this module)
  return {
      "model": name, "sparsity": cfg.sparsity, "omega": guidance.omega,
      "gamma_strong": guidance.gamma_strong,
      "gamma_weak": guidance.gamma_weak if guidance.guided else None,
      "schedule": guidance.schedule,
      **sampling.make_plan(cfg, guidance, steps=steps).summary(),
      "note": "gflops_* per image per Euler sampling step (averaged over the steps; both"
              " branches of a guided step); nfe per image; true = 2 FLOPs per multiply-add"
              " incl. attention, paper = linear-layer multiply-adds only (Table 2 convention);"
              " ag rules assume an auxiliary model of the same architecture",
  }


def main(argv):
  del argv
  from sgjax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.model_config(FLAGS.config.model)
  name = FLAGS.config.model.get("name", "")
  if FLAGS.guidance is None:
    print(json.dumps(report(cfg, FLAGS.gamma, name)))
    return
  from sgjax import sample  # pylint: disable=g-import-not-at-top
  print(json.dumps(guided_report(cfg, sample.guidance_from_flags(), FLAGS.steps, name)))


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_float("gamma", 0.0, "Inference sparsity rate applied to every route (one"
                     " forward pass; ignored with --guidance).")
  from sgjax import sample  # pylint: disable=g-import-not-at-top
  # --guidance (default: none given) reports one guided sampling step instead of a forward pass.
  sample.define_guidance_flags(default_rule=None)
  flags.DEFINE_integer("steps", 40, "Euler sampling steps (matters for schedules).")
  flags.mark_flags_as_required(["config"])
  from sgjax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
