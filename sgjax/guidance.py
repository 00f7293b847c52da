"""Guidance rules and sparsity schedules (PAPER.md section 4), as pure functions.

Every rule combines a strong and a weak velocity prediction the same way,

    guided_velocity = omega * v_strong + (1 - omega) * v_weak,

and differs only in what the weak branch is:

  rule     strong branch        weak branch
  none     v(c; gamma_strong)   (not evaluated)
  cfg      v(c; gamma_strong)   v(null; gamma_weak)
  sg       v(c; gamma_strong)   v(c; gamma_weak)          0 <= gamma_strong < gamma_weak < 1
  cfg+sg   v(c; gamma_strong)   v(null; gamma_weak)       same constraint as sg
  ag       v_main(c; gs)        v_aux(c; gw)              aux: a worse model (early checkpoint)
  ag+sg    v_main(c; gs)        v_aux(c; gw)              aux with its own sparsity
  icg      v(c; gamma_strong)   v(c_rand; gamma_weak)     c_rand uniform over all classes

With the default gammas (0, 0) `cfg`, `ag` and `icg` are the dense rules of the paper's
Table 2. Gammas may follow a cosine schedule over the sampling steps, and guidance may be
restricted to an interval of t, outside which only the strong branch runs. The paper's best
ImageNet setting (SG_FID: AG+SG, aux gamma 0.6 -> 0.0, main gamma 0.0 -> 0.6) reads

    GuidanceConfig(rule="ag+sg", omega=..., schedule="cosine", gamma_strong=0.0,
                   gamma_strong_end=0.6, gamma_weak=0.6, gamma_weak_end=0.0)

ICG follows Sadat et al.: the weak branch's class is drawn uniformly from all classes,
independently of the sample's own (so it may equal it), and drawn afresh at every model
evaluation (every step, and each stage of a Heun step), from that evaluation's key.

Time runs as in `sgjax.flow`: t = 0 is noise, t = 1 is data. Guidance intervals published in
the other direction convert as (t_min, t_max) = (1 - t_hi, 1 - t_lo): REPA's [0, 0.7] with
t = 1 as noise is (0.3, 1.0) here. EDM-style intervals in sigma (x = data + sigma * noise)
convert through the interpolant x_t = (1 - t) z + t x, whose x_t / t has noise level
sigma = (1 - t) / t, i.e. t = 1 / (1 + sigma): sigma in (0.28, 5.42] is t in [0.156, 0.781).
(EDM2's latents have another scale than SD-VAE's, so such intervals transfer only roughly.)

Per-step settings are plain Python on the static step grid: the sampler (sgjax.sampling)
and the FLOPs accounting (sgjax.flops) both read them from `step_settings`, so the gammas
sampled with and the FLOPs reported always agree.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sgjax import sparsity

RULES = ("none", "cfg", "sg", "cfg+sg", "ag", "ag+sg", "icg")
SCHEDULES = ("constant", "cosine")
# Rules whose weak branch is the auxiliary model; rules whose weak label is the null class.
AUX_RULES = ("ag", "ag+sg")
NULL_LABEL_RULES = ("cfg", "cfg+sg")
# Rules whose guidance signal is the sparsity gap alone: gamma_strong < gamma_weak required.
SPARSITY_GAP_RULES = ("sg", "cfg+sg")
# (gamma_strong, gamma_weak) of the paper's SG_FLOPS setting (Table 2): what a sparsity-gap
# rule given neither rate runs with (`default_gammas`).
SG_FLOPS_GAMMAS = (0.5, 0.9)


def default_gammas(rule: str, gamma_strong: float | None,
                   gamma_weak: float | None) -> tuple[float, float]:
  """(gamma_strong, gamma_weak) with unset (None) rates filled in.

  A sparsity-gap rule given neither rate takes SG_FLOPS_GAMMAS (at the dense 0 / 0 it has no
  guidance signal and is refused); otherwise an unset rate is 0, dense.
  """
  if gamma_strong is None and gamma_weak is None and rule in SPARSITY_GAP_RULES:
    return SG_FLOPS_GAMMAS
  return (0.0 if gamma_strong is None else gamma_strong,
          0.0 if gamma_weak is None else gamma_weak)


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
  """One guidance setting. Fields are plain values (JSON-able, hashable)."""

  rule: str = "cfg"
  omega: float = 1.5  # guidance scale; 1 = the strong branch alone
  gamma_strong: float = 0.0  # sparsity rate of the strong branch (at the first step)
  gamma_weak: float = 0.0  # sparsity rate of the weak branch (at the first step)
  schedule: str = "constant"  # constant | cosine
  # cosine: the rate at the last step; None keeps that branch's rate constant.
  gamma_strong_end: float | None = None
  gamma_weak_end: float | None = None
  # cosine: the schedule's progress is rounded to this many levels, so each branch takes at
  # most `num_levels` distinct rates (and the sampler compiles at most that many variants);
  # 0 follows the cosine exactly, each step at its own rate and K (up to one variant a step).
  num_levels: int = 8
  # (t_min, t_max): guide only steps starting at t_min <= t <= t_max; None guides every step.
  # t = 0 is noise, t = 1 data (see the module docstring to convert published intervals).
  interval: tuple[float, float] | None = None

  @property
  def guided(self) -> bool:
    return self.rule != "none"

  @property
  def uses_aux(self) -> bool:
    return self.rule in AUX_RULES

  @property
  def slug(self) -> str:
    """A folder name that identifies the setting, e.g. 'sg-w2-gs0.5-gw0.9'."""
    parts = [self.rule.replace("+", "_"), f"w{self.omega:g}", f"gs{self.gamma_strong:g}",
             f"gw{self.gamma_weak:g}"]
    if self.schedule != "constant":
      parts += [self.schedule, f"gse{self.gamma_strong_end}", f"gwe{self.gamma_weak_end}",
                f"L{self.num_levels}" if self.num_levels else "exact"]
    if self.interval is not None:
      parts.append(f"t{self.interval[0]:g}_{self.interval[1]:g}")
    return "-".join(parts)

  def validate(self, prefix: str = "guidance") -> "GuidanceConfig":
    """Raises ValueError naming the field and value of the first invalid setting.

    Warns (without raising) for settings that are legal but rarely intended: omega < 1
    (pushes samples *towards* the weak branch), and an ag+sg auxiliary that is never sparser
    than the main model.
    """
    if self.rule not in RULES:
      raise ValueError(f"{prefix}.rule={self.rule!r}: choose one of {RULES}.")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"{prefix}.schedule={self.schedule!r}: choose one of {SCHEDULES}.")
    if not math.isfinite(self.omega):
      raise ValueError(f"{prefix}.omega={self.omega!r} must be finite.")
    for name in ("gamma_strong", "gamma_weak", "gamma_strong_end", "gamma_weak_end"):
      value = getattr(self, name)
      if value is not None:
        sparsity.check_gamma(value, f"{prefix}.{name}")
    if self.schedule == "constant":
      for name in ("gamma_strong_end", "gamma_weak_end"):
        if getattr(self, name) is not None:
          raise ValueError(f"{prefix}.{name}={getattr(self, name)!r} is set but {prefix}."
                           "schedule='constant'; end rates apply only to schedule='cosine'.")
    if (not isinstance(self.num_levels, int) or isinstance(self.num_levels, bool)
        or self.num_levels < 0 or self.num_levels == 1):
      raise ValueError(f"{prefix}.num_levels={self.num_levels!r} must be an int >= 2, or 0"
                       " to follow the cosine exactly.")
    if self.interval is not None:
      if len(self.interval) != 2 or not 0.0 <= self.interval[0] <= self.interval[1] <= 1.0:
        raise ValueError(f"{prefix}.interval={self.interval!r}: expected (t_min, t_max) with"
                         " 0 <= t_min <= t_max <= 1.")
    # Both branches follow the same cosine weight, so their gap is a convex combination of
    # the gaps at the two ends: checking the ends checks every step.
    ends = [(self.gamma_strong, self.gamma_weak), self.end_gammas]
    if self.rule in SPARSITY_GAP_RULES:
      for (strong, weak), where in zip(ends, ("", "_end")):
        if strong >= weak:
          raise ValueError(
              f"{prefix}.gamma_strong{where}={strong!r} must be < {prefix}.gamma_weak{where}="
              f"{weak!r} for rule {self.rule!r}: the guidance signal is the capacity gap, so"
              " the weak branch must be the sparser one (0 <= gamma_strong < gamma_weak < 1).")
    if self.rule == "ag+sg" and all(strong >= weak for strong, weak in ends):
      warnings.warn(f"{prefix}: rule 'ag+sg' with gamma_strong >= gamma_weak at every step;"
                    " the auxiliary model is never sparser than the main one.", stacklevel=2)
    if self.guided and self.omega < 1.0:
      warnings.warn(f"{prefix}.omega={self.omega!r} < 1 moves samples towards the weak"
                    " branch; guidance uses omega > 1 (omega = 1: no guidance).", stacklevel=2)
    return self

  @property
  def end_gammas(self) -> tuple[float, float]:
    """(gamma_strong, gamma_weak) at the last step."""
    strong = self.gamma_strong if self.gamma_strong_end is None else self.gamma_strong_end
    weak = self.gamma_weak if self.gamma_weak_end is None else self.gamma_weak_end
    return strong, weak


def guided_velocity(v_strong: jax.Array, v_weak: jax.Array, omega) -> jax.Array:
  """omega * v_strong + (1 - omega) * v_weak: every rule of PAPER.md section 4."""
  return omega * v_strong + (1 - omega) * v_weak


def independent_labels(key: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """ICG: [B] classes drawn uniformly from all `num_classes`, independently of `labels`."""
  return jax.random.randint(key, labels.shape, 0, num_classes, dtype=labels.dtype)


def weak_labels(rule: str, labels: jax.Array, key: jax.Array, num_classes: int) -> jax.Array:
  """The weak branch's class labels [B] for `rule`; label `num_classes` is the null class."""
  if rule in NULL_LABEL_RULES:
    return jnp.full_like(labels, num_classes)
  if rule == "icg":
    return independent_labels(key, labels, num_classes)
  return labels


def cosine_weight(step: int, steps: int) -> float:
  """1 at the first step, 0 at the last, following half a cosine period."""
  if steps <= 1:
    return 1.0
  return 0.5 * (1.0 + math.cos(math.pi * step / (steps - 1)))


def schedule_weight(guidance: GuidanceConfig, step: int, steps: int) -> float:
  """The weight of the start rates at `step`, rounded to `num_levels` levels in [0, 1]
  (num_levels 0: the exact cosine)."""
  if guidance.schedule == "constant":
    return 1.0
  if guidance.num_levels == 0:
    return cosine_weight(step, steps)
  levels = guidance.num_levels - 1
  return round(cosine_weight(step, steps) * levels) / levels


def interpolate_gamma(start: float, end: float, weight: float) -> float:
  # weight * start + (1 - weight) * end is exact at weight 0 and 1, so the end rates are hit
  # exactly (start + weight * (end - start) need not be).
  return weight * start + (1.0 - weight) * end


class StepGuidance(NamedTuple):
  """The guidance of one sampling step."""

  t: float  # time at the start of the step (t = 0 noise, t = 1 data)
  gamma_strong: float
  gamma_weak: float | None  # None: only the strong branch runs at this step

  @property
  def guided(self) -> bool:
    return self.gamma_weak is not None


def step_times(steps: int) -> list[float]:
  """The start time of each step of a uniform grid from t = 0 to 1."""
  return [step / steps for step in range(steps)]


def in_interval(guidance: GuidanceConfig, t: float) -> bool:
  if guidance.interval is None:
    return True
  t_min, t_max = guidance.interval
  return t_min <= t <= t_max


def step_settings(guidance: GuidanceConfig, steps: int) -> tuple[StepGuidance, ...]:
  """(t, gamma_strong, gamma_weak or None) of each of `steps` uniform sampling steps.

  Whether a step is guided is decided at its start time; a Heun step uses the same setting
  for both of its evaluations.
  """
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1.")
  end_strong, end_weak = guidance.end_gammas
  out = []
  for step, t in enumerate(step_times(steps)):
    weight = schedule_weight(guidance, step, steps)
    strong = interpolate_gamma(guidance.gamma_strong, end_strong, weight)
    weak = interpolate_gamma(guidance.gamma_weak, end_weak, weight)
    guided = guidance.guided and in_interval(guidance, t)
    out.append(StepGuidance(t, strong, weak if guided else None))
  return tuple(out)
