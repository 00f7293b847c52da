import json
import math
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from sgjax import flops
from sgjax.models import dit
from sgjax.sparsity import Route
from tests.helpers import batch, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Table 2 of the paper, GFLOPs (paper convention) per image per Euler step of SiT-XL/2 with
# the route 2->24. Our count lies 0.031 below its unguided 114.42 and 0.021 below its
# SG_FLOPS 97.67 (Table 2 seems to count ~4,200 more multiply-adds per token and block; see
# sgjax/flops.py): hence a tolerance of 0.035 per forward pass, 0.07 per two-branch step.
TABLE_2 = dict(unguided=114.42, cfg=228.84, sg_flops=97.67)  # SG_FID: 173.16, see below
FORWARD_TOL = 0.035


def sit_xl2_paper_macs(kept: int) -> int:
  """Multiply-adds of SiT-XL/2's linear layers in one forward pass (Table 2's convention),
  with `kept` of the 256 tokens in the routed blocks 2..24, counted by hand."""
  n, w, patch = 256, 1152, 2 * 2 * 4
  block = lambda k: 6 * w * w + k * (4 * w * w + 2 * 4 * w * w)  # adaLN; q, k, v, out; MLP
  return (n * patch * w + 256 * w + w * w  # patch embedding, time MLP (labels: a lookup)
          + 5 * block(n) + 23 * block(kept)  # 28 blocks
          + 2 * w * w + n * w * patch)  # final adaLN and linear layer


def matmul_flops(jaxpr) -> int:
  """2 FLOPs per multiply-add of every dot_general in `jaxpr` and in the jaxprs nested in it."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
      rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract + rhs_batch]
      total += 2 * math.prod(lhs) * math.prod(rhs_free)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          total += matmul_flops(sub)
  return total


@pytest.mark.parametrize("mode", ["routing", "masking"])
def test_library_flops_are_the_forward_matmuls_and_bound_its_compiled_cost(mode):
  # 256 tokens at width 64: attention scores and values are 35-42% of the matmul FLOPs, so a
  # wrong attention term cannot hide in a tolerance.
  cfg = tiny_config(mode, width=64, num_heads=2, depth=3, input_size=16, patch_size=1,
                    routes=(Route(1, 1, 0.5),) if mode == "routing" else (),
                    decoder_depth=1, decoder_width=32, decoder_heads=1)
  size = 4
  x, t, y = batch(cfg, size)
  graphdef, state = nnx.split(dit.DiT(cfg, rngs=nnx.Rngs(0)))
  for gamma in (0.0, 0.5, 0.75):

    def forward(state, x, t, y, key, gamma=gamma):
      model = nnx.merge(graphdef, state)
      return model(x, t, y, model.draw_subsets(key, size, gamma))

    traced = jax.jit(forward).trace(state, x, t, y, jax.random.key(0))
    library = flops.forward_flops(cfg, gamma).true
    # Every matmul of the traced program, counted from its shapes: exactly the library's sum.
    assert matmul_flops(traced.jaxpr.jaxpr) / size == library, (gamma, library)
    if gamma != 0.5:  # (compiling is the slow part)
      # XLA's cost analysis adds the elementwise work (norms, GELU, softmax, modulation) the
      # library leaves out: 4.0-5.6% more at these sizes.
      compiled = traced.lower().compile().cost_analysis()["flops"] / size
      assert library < compiled < 1.07 * library, (gamma, compiled, library)


def test_paper_convention_reproduces_table_2():
  cfg = dit.DiTConfig(**dit.parse_model_name("SiT-XL/2"), sparsity="routing",
                      routes=(Route(2, 24, 0.5),))
  gflops = lambda g: flops.forward_flops(cfg, g).paper / 1e9
  assert gflops(0.0) == pytest.approx(sit_xl2_paper_macs(256) / 1e9, rel=1e-12)
  assert gflops(0.9) == pytest.approx(sit_xl2_paper_macs(26) / 1e9, rel=1e-12)
  assert abs(gflops(0.0) - TABLE_2["unguided"]) <= FORWARD_TOL
  assert abs(gflops(0.5) + gflops(0.9) - TABLE_2["sg_flops"]) <= FORWARD_TOL
  # Training rates by default.
  assert flops.forward_flops(cfg).paper == flops.forward_flops(cfg, 0.5).paper


def test_dense_model_rejects_a_sparsity_rate():
  with pytest.raises(ValueError, match="dense"):
    flops.forward_flops(tiny_config("dense"), 0.5)


def run_flops_cli(*args):
  out = subprocess.run([sys.executable, "-m", "sgjax.flops", *args], cwd=ROOT, check=True,
                       capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_flops_command_prints_table_2_numbers():
  config = "--config=configs/imagenet256.py:model=SiT-XL/2,sparsity=routing"
  dense = run_flops_cli(config, "--gamma=0")
  half, most = run_flops_cli(config, "--gamma=0.5"), run_flops_cli(config, "--gamma=0.9")
  assert abs(dense["gflops_paper"] - TABLE_2["unguided"]) <= FORWARD_TOL
  assert abs(half["gflops_paper"] + most["gflops_paper"] - TABLE_2["sg_flops"]) <= FORWARD_TOL
  assert half["gflops_true"] < dense["gflops_true"]
  assert dense["block_tokens"] == [256] * 28


def test_guided_flops_cli_prints_table_2_numbers():
  config = "--config=configs/imagenet256.py:model=SiT-XL/2,sparsity=routing"
  none = run_flops_cli(config, "--guidance=none")
  cfg = run_flops_cli(config, "--guidance=cfg", "--omega=1.5")
  sg = run_flops_cli(config, "--guidance=sg", "--gamma_strong=0.5", "--gamma_weak=0.9")
  assert abs(none["gflops_paper"] - TABLE_2["unguided"]) <= FORWARD_TOL
  assert abs(cfg["gflops_paper"] - TABLE_2["cfg"]) <= 2 * FORWARD_TOL
  assert abs(sg["gflops_paper"] - TABLE_2["sg_flops"]) <= FORWARD_TOL
  assert sg["gflops_true"] < none["gflops_true"] < cfg["gflops_true"]
  assert (none["nfe"], cfg["nfe"], sg["nfe"]) == (40, 80, 80)
  assert sg["rule"] == "sg" and sg["num_variants"] == 1
  # --gamma alone still reports one forward pass.
  assert run_flops_cli(config, "--gamma=0.5")["block_tokens"][2] == 128


def test_guided_step_flops_of_the_papers_settings():
  cfg = dit.DiTConfig(**dit.parse_model_name("SiT-XL/2"), sparsity="routing",
                      routes=(Route(2, 24, 0.5),))
  gflops = lambda g, **kw: flops.trajectory_flops(cfg, g, **kw).paper / 40 / 1e9
  GuidanceConfig = flops.guidance_lib.GuidanceConfig
  for rule in ("cfg", "ag", "icg"):
    assert gflops(GuidanceConfig(rule)) == pytest.approx(2 * sit_xl2_paper_macs(256) / 1e9,
                                                         rel=1e-12)
    assert abs(gflops(GuidanceConfig(rule)) - TABLE_2["cfg"]) <= 2 * FORWARD_TOL
  # SG_FID (AG+SG): main gamma 0 -> 0.6, aux gamma 0.6 -> 0, cosine over 40 Euler steps with
  # its progress rounded to 8 levels; step by step, the two branches drop
  # int(256 gs) + int(256 gw) = 152 or 153 tokens.
  sg_fid = GuidanceConfig("ag+sg", schedule="cosine", gamma_strong=0.0, gamma_strong_end=0.6,
                          gamma_weak=0.6, gamma_weak_end=0.0)
  weights = [round(0.5 * (1 + math.cos(math.pi * step / 39)) * 7) / 7 for step in range(40)]
  gammas = [((1 - w) * 0.6, w * 0.6) for w in weights]
  kept = lambda gamma: 256 - int(256 * gamma)
  by_hand = sum(sit_xl2_paper_macs(kept(gs)) + sit_xl2_paper_macs(kept(gw))
                for gs, gw in gammas) / 40 / 1e9
  assert gflops(sg_fid) == pytest.approx(by_hand, rel=1e-12)
  # From Table 2 alone: a step costs 2 f(0) = 228.84 less c per token the branches drop, with
  # c = (228.84 - 97.67) / (128 + 230) from SG_FLOPS. On our schedule that gives 173.02, and
  # ours (172.97) is 0.044 below it: our 0.031-per-pass gap at both branches, less 0.00012 per
  # dropped token.
  c = (TABLE_2["cfg"] - TABLE_2["sg_flops"]) / (256 - kept(0.5) + 256 - kept(0.9))
  table_2 = sum(TABLE_2["cfg"] - c * (512 - kept(gs) - kept(gw)) for gs, gw in gammas) / 40
  assert abs(gflops(sg_fid) - table_2) <= 0.05
  # Table 2 prints 173.16: the same formula at 152 dropped tokens on every step (173.15);
  # ours drops 153 on the 14 steps nearest the ends (the rounding of the cosine), 0.13 less.
  # Their step grid or rounding of K is not in the paper, so that gap remains.
  # Heun evaluates twice per step.
  sg = GuidanceConfig("sg", gamma_strong=0.5, gamma_weak=0.9)
  assert gflops(sg, stages=2) == pytest.approx(2 * gflops(sg))


def test_true_flops_count_work_shared_by_both_branches_once():
  cfg = tiny_config("routing")
  GuidanceConfig = flops.guidance_lib.GuidanceConfig
  one = flops.forward_flops(cfg, 0.0)
  # SG at equal gammas 0: both branches are the same computation.
  same = flops.guided_step_flops(cfg, GuidanceConfig("sg"))
  assert same.true == pytest.approx(one.true) and same.paper == pytest.approx(2 * one.paper)
  # CFG shares only the x and t embeddings; AG (another model) shares nothing.
  cfg_step = flops.guided_step_flops(cfg, GuidanceConfig("cfg")).true
  assert 1.9 * one.true < cfg_step < 2 * one.true
  assert flops.guided_step_flops(cfg, GuidanceConfig("ag")).true == pytest.approx(2 * one.true)
  # CFG+SG at different token counts: two calls in the sampler, nothing shared.
  cfg_sg = flops.guided_step_flops(cfg, GuidanceConfig("cfg+sg", gamma_strong=0.2,
                                                       gamma_weak=0.7)).true
  two = flops.forward_flops(cfg, 0.2).true + flops.forward_flops(cfg, 0.7).true
  assert cfg_sg == pytest.approx(two)
  # SG shares the embeddings, the modulations and the block before the route.
  sg = flops.guided_step_flops(cfg, GuidanceConfig("sg", gamma_strong=0.2, gamma_weak=0.7)).true
  assert sg < two - flops.forward_flops(cfg, 0.0).true / cfg.depth
