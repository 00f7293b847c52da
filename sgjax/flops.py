"""FLOPs of one forward pass, counted from the architecture (no compilation).

Two conventions, per image:
- true: 2 FLOPs per multiply-add of every matmul, attention scores and values included
  (elementwise work, normalisation and softmax are not counted);
- paper: multiply-adds of the linear layers only, no attention matmuls, as in Table 2 of the
  Sparse Guidance paper (SiT-XL/2 dense: 114.39 GMACs).

    python -m sgjax.flops --config=configs/imagenet256.py:model=SiT-XL/2,sparsity=routing \
        --gamma=0.5
"""

from __future__ import annotations

import dataclasses
import json

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
  hidden = int(width * mlp_ratio)
  linears = (_linear(1, cond_width, 6 * width) + 4 * _linear(tokens, width, width)
             + _linear(tokens, width, hidden) + _linear(tokens, hidden, width))
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
  n, w = cfg.num_tokens, cfg.width
  tokens = block_tokens(cfg, gamma)
  total = (_linear(n, cfg.patch_dim, w) + _linear(1, dit.TIME_FREQUENCIES, w)
           + _linear(1, w, w))
  for k in tokens:
    total += _block(k, w, cfg.mlp_ratio, w)
  out_width = w
  if cfg.sparsity == "masking":
    out_width = cfg.decoder_width
    total += _linear(tokens[-1], w, out_width)
    for _ in range(cfg.decoder_depth):
      total += _block(n, out_width, cfg.mlp_ratio, w)
  return total + _linear(1, w, 2 * out_width) + _linear(n, out_width, cfg.patch_dim)


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


def main(argv):
  del argv
  from sgjax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.model_config(FLAGS.config.model)
  print(json.dumps(report(cfg, FLAGS.gamma, FLAGS.config.model.get("name", ""))))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_float("gamma", 0.0, "Inference sparsity rate applied to every route.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
