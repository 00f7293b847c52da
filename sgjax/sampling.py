"""The jitted guided sampler: Euler or Heun from t = 0 (noise) to t = 1 (data).

One XLA program per (models, guidance, steps, solver, batch shape) does the whole trajectory:
initial noise, every step's token subsets and both guidance branches.

Static shapes under schedules. A sparsity rate fixes the number of kept tokens K, a static
shape. The step grid is static too, so each step's (gamma_strong, gamma_weak, guided-or-not)
is computed in Python (`sgjax.guidance.step_settings`, where cosine schedules are rounded to
`num_levels` levels), consecutive steps whose branches keep equal token counts are grouped
into a `Segment`, and each segment is its own `lax.fori_loop` inside the one jitted program.
A constant schedule gives one segment (three with a guidance interval); a cosine schedule at
most `num_levels` segments (+2 with an interval), since its progress is monotone. Each
segment's branches run at exactly their own K: the sparser branch is never padded.

Branches. SG's branches (same model and labels) run as one packed pass, `DiT.branches`:
both branches' tokens in the same matmuls, and the work they share (embeddings, modulations,
blocks before the first route) done once. That must be explicit: XLA does not merge two
calls' common work inside a loop body. Branches of the same model with other labels and the
same K (CFG, ICG) run as one call vmapped over a leading branch axis of size 2: one set of
larger matmuls, and, unlike concatenating the two halves into a [2B] batch, the batch axis
keeps its sharding, so no data moves between devices. Otherwise (different labels and K, or
the AG auxiliary model) the branches are two evaluations inside the same program.

Randomness. Everything comes from the sample key: the initial noise from fold_in(key, 0);
the token subsets and ICG labels of step s, solver stage j, branch b from
fold_in(fold_in(fold_in(fold_in(key, 1), s), j), b). The two branches draw independent
subsets, or, with `nested=True`, the same random permutation, so the sparser branch keeps a
subset of the denser branch's tokens. Every draw has the full batch shape from one key, never
per-device keys, so samples do not depend on the device count. (With
`jax_threefry_partitionable`, the default, each device generates only its own slice.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sgjax import flops as flops_lib
from sgjax import guidance as guidance_lib
from sgjax import sharding, sparsity
from sgjax.guidance import GuidanceConfig
from sgjax.models import dit

# Model evaluations per step of each solver (per branch).
SOLVER_STAGES = {"euler": 1, "heun": 2}
_NOISE, _TOKENS = 0, 1
_STRONG, _WEAK, _ICG_LABEL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Segment:
  """Consecutive steps [start, stop) whose branches keep the same numbers of tokens."""

  start: int
  stop: int
  gamma_strong: float  # the rate of the segment's first step (same K for all its steps)
  gamma_weak: float | None  # None: only the strong branch runs
  num_kept_strong: int
  num_kept_weak: int | None

  @property
  def shape(self) -> tuple[int, int | None]:
    """What the compiled loop body depends on."""
    return self.num_kept_strong, self.num_kept_weak


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
  """What a sampling run does and costs, per image, known before anything compiles."""

  steps: int
  solver: str
  rule: str
  step_gammas: tuple[tuple[float, float | None], ...]  # (gamma_strong, gamma_weak) per step
  segments: tuple[Segment, ...]
  nfe: int  # model evaluations per image over the whole trajectory
  flops: flops_lib.Flops  # per image, whole trajectory (sgjax.flops.trajectory_flops)

  @property
  def num_variants(self) -> int:
    """Distinct loop bodies by token counts (each segment is one fori_loop)."""
    return len({segment.shape for segment in self.segments})

  @property
  def flops_per_step(self) -> flops_lib.Flops:
    """Average FLOPs per image per sampling step: Table 2's unit."""
    return self.flops * (1.0 / self.steps)

  def summary(self) -> dict:
    """JSON-able report."""
    per_step = self.flops_per_step
    return {
        "rule": self.rule, "steps": self.steps, "solver": self.solver, "nfe": self.nfe,
        "step_gammas": [list(g) for g in self.step_gammas],
        "num_segments": len(self.segments), "num_variants": self.num_variants,
        "gflops_true": per_step.true / 1e9, "gflops_paper": per_step.paper / 1e9,
        "trajectory_gflops_true": self.flops.true / 1e9,
        "trajectory_gflops_paper": self.flops.paper / 1e9,
    }


def _num_kept(cfg: dit.DiTConfig, gamma: float) -> int:
  dit.route_rates(cfg, gamma)  # a dense model rejects gamma > 0 here, naming the problem
  return sparsity.num_kept(cfg.num_tokens, gamma)


def make_plan(model_cfg: dit.DiTConfig, guidance: GuidanceConfig, *, steps: int = 40,
              solver: str = "euler", aux_cfg: dit.DiTConfig | None = None) -> SamplingPlan:
  """Per-step gammas, segments and cost of a run; validates every setting up front."""
  guidance.validate()
  if solver not in SOLVER_STAGES:
    raise ValueError(f"solver={solver!r}: choose one of {sorted(SOLVER_STAGES)}.")
  weak_cfg = flops_lib.weak_branch_config(model_cfg, guidance, aux_cfg)
  settings = guidance_lib.step_settings(guidance, steps)
  segments: list[Segment] = []
  for step, setting in enumerate(settings):
    shape = (_num_kept(model_cfg, setting.gamma_strong),
             None if not setting.guided else _num_kept(weak_cfg, setting.gamma_weak))
    if (guidance.rule in guidance_lib.SPARSITY_GAP_RULES and setting.guided
        and shape[1] >= shape[0]):
      raise ValueError(
          f"guidance gamma_strong={setting.gamma_strong:g} and gamma_weak="
          f"{setting.gamma_weak:g} keep {shape[0]} and {shape[1]} of {model_cfg.num_tokens}"
          f" tokens at step {step}: rule {guidance.rule!r} needs the weak branch to keep"
          " fewer tokens (a capacity gap); move the rates further apart.")
    if segments and segments[-1].shape == shape:
      segments[-1] = dataclasses.replace(segments[-1], stop=step + 1)
    else:
      segments.append(Segment(step, step + 1, setting.gamma_strong, setting.gamma_weak, *shape))
  stages = SOLVER_STAGES[solver]
  return SamplingPlan(
      steps=steps, solver=solver, rule=guidance.rule,
      step_gammas=tuple((s.gamma_strong, s.gamma_weak) for s in settings),
      segments=tuple(segments),
      nfe=stages * sum(1 + s.guided for s in settings),
      flops=flops_lib.trajectory_flops(model_cfg, guidance, aux_cfg, steps, stages))


# velocity(x [B, H, W, C], t [] float32, step [] int32, stage: int, segment) -> v [B, H, W, C]
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array, int, Segment], jax.Array]


def integrate(velocity: VelocityFn, x: jax.Array, *, steps: int, solver: str = "euler",
              segments: tuple[Segment, ...] | None = None) -> jax.Array:
  """Integrates dx/dt = velocity from t = 0 to 1 on a uniform grid of `steps` steps.

  Traceable (call it inside jit). Each segment is one `lax.fori_loop`; `segments=None` runs
  all steps as one segment (velocity then gets segment=None). Heun's second evaluation, at
  the step's end time, uses the same segment settings as its first.
  """
  if solver not in SOLVER_STAGES:
    raise ValueError(f"solver={solver!r}: choose one of {sorted(SOLVER_STAGES)}.")
  if segments is None:
    segments = (None,)
  dt = 1.0 / steps

  def body(step, x, segment):
    t = step.astype(jnp.float32) / steps
    v = velocity(x, t, step, 0, segment)
    if solver == "euler":
      return x + dt * v
    v_end = velocity(x + dt * v, t + dt, step, 1, segment)
    return x + (0.5 * dt) * (v + v_end)

  for segment in segments:
    start, stop = (0, steps) if segment is None else (segment.start, segment.stop)
    x = jax.lax.fori_loop(start, stop, functools.partial(body, segment=segment), x)
  return x


def _stack(a, b):
  return jax.tree.map(lambda u, w: jnp.stack([u, w]), a, b)


def branch_velocity(model: dit.DiT, aux_model: dit.DiT | None, rule: str, segment: Segment,
                    x: jax.Array, t: jax.Array, labels: jax.Array, key: jax.Array, omega,
                    nested: bool = False) -> jax.Array:
  """The guided velocity of one evaluation at a segment's sparsity. Traceable.

  x: [B, H, W, C], t: [B], labels: [B] int, or a text-to-image model's caption condition
  (`sgjax.models.trdit`); key: this evaluation's key. Not validated:
  `make_plan` / `GuidanceConfig.validate` check settings, so invariants such as
  gamma_strong == gamma_weak can be tested here.
  """
  batch = x.shape[0]
  key_strong = jax.random.fold_in(key, _STRONG)
  strong_subsets = dit.draw_subsets(model.cfg, key_strong, batch, segment.gamma_strong)
  if segment.gamma_weak is None:
    return model(x, t, labels, strong_subsets)
  weak_model = aux_model if rule in guidance_lib.AUX_RULES else model
  if model.cfg.text_conditioned:  # cfg rules: the null caption; sg: the same caption
    labels_weak = (model.null_condition(labels) if rule in guidance_lib.NULL_LABEL_RULES
                   else labels)
  else:
    labels_weak = guidance_lib.weak_labels(rule, labels, jax.random.fold_in(key, _ICG_LABEL),
                                           model.cfg.num_classes)
  # nested: the same key gives the same random permutation per route, whose first K_weak
  # entries are a subset of its first K_strong (or the other way round).
  key_weak = key_strong if nested else jax.random.fold_in(key, _WEAK)
  weak_subsets = dit.draw_subsets(weak_model.cfg, key_weak, batch, segment.gamma_weak)
  if weak_model is model and labels_weak is labels:
    # sg: the same conditioning. One pass, the branches' tokens packed along the token axis
    # and their common work done once (see `DiT.branches`).
    v_strong, v_weak = model.branches(x, t, labels, (strong_subsets, weak_subsets))
  elif weak_model is model and segment.num_kept_strong == segment.num_kept_weak:
    # Other labels, equal shapes (cfg, icg): one call over a leading branch axis. x and t
    # stay unbatched, so the work on them is done once.
    forward = jax.vmap(lambda y, subsets: model(x, t, y, subsets), axis_size=2)
    v = forward(_stack(labels, labels_weak), _stack(strong_subsets, weak_subsets))
    v_strong, v_weak = v[0], v[1]
  else:
    v_strong = model(x, t, labels, strong_subsets)
    v_weak = weak_model(x, t, labels_weak, weak_subsets)
  return guidance_lib.guided_velocity(v_strong, v_weak, omega)


def _evaluation_key(key: jax.Array, step: jax.Array, stage: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, _TOKENS), step), stage)


@functools.lru_cache(maxsize=32)
def _programs(graphdef, aux_graphdef, rule: str, plan_key: tuple, nested: bool,
              mesh: Mesh | None):
  """(sample, velocity) jitted functions, cached on everything static so that repeated
  `sample` calls (many batches, an omega sweep) reuse one compilation."""
  steps, solver, segments = plan_key
  out_sharding = None if mesh is None else sharding.batch_sharding(mesh)

  def merge(states):
    model = nnx.merge(graphdef, states[0])
    aux = None if aux_graphdef is None else nnx.merge(aux_graphdef, states[1])
    return model, aux

  def sample_fn(states, labels, key, omega):
    model, aux = merge(states)
    cfg = model.cfg
    batch = jax.tree.leaves(labels)[0].shape[0]
    shape = (batch, cfg.input_size, cfg.input_size, cfg.in_channels)
    x = jax.random.normal(jax.random.fold_in(key, _NOISE), shape, jnp.float32)
    if out_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, out_sharding)

    def velocity(x, t, step, stage, segment):
      t = jnp.broadcast_to(t, (batch,))
      return branch_velocity(model, aux, rule, segment, x, t, labels,
                             _evaluation_key(key, step, stage), omega, nested)

    return integrate(velocity, x, steps=steps, solver=solver, segments=segments)

  def velocity_fn(states, x, t, labels, key, omega, segment):
    model, aux = merge(states)
    return branch_velocity(model, aux, rule, segment, x, t, labels, key, omega, nested)

  return (jax.jit(sample_fn, out_shardings=out_sharding),
          jax.jit(velocity_fn, static_argnames=("segment",)))


def _check_text_condition(cond, cfg) -> dict[str, jax.Array]:
  """A caption condition {"text" [B, L, D], "mask" [B, L]} checked against the model."""
  if not isinstance(cond, dict) or set(cond) != {"text", "mask"}:
    raise ValueError("a text-to-image model samples from captions: pass {'text': hidden"
                     " states [B, L, D], 'mask': [B, L]} (sgjax.text.conditioning."
                     "encode_captions), not class labels.")
  text, mask = jnp.asarray(cond["text"], jnp.float32), jnp.asarray(cond["mask"], bool)
  if text.shape[1:] != (cfg.text_length, cfg.text_width) or mask.shape != text.shape[:2]:
    raise ValueError(f"text hidden states {text.shape} and mask {mask.shape}: the model takes"
                     f" [B, {cfg.text_length}, {cfg.text_width}] and [B, {cfg.text_length}]"
                     " (model.text_length, model.text_width).")
  return {"text": text, "mask": mask}


class Sampler:
  """Guided sampling of one model (+ auxiliary model for ag rules) with one guidance setting.

  Build once, call per batch: compilation is cached on the model structure, the plan and the
  batch shape; omega and the parameters are runtime arguments.
  """

  def __init__(self, model: dit.DiT, guidance: GuidanceConfig, *, steps: int = 40,
               solver: str = "euler", aux_model: dit.DiT | None = None,
               mesh: Mesh | None = None, nested: bool = False):
    if guidance.uses_aux != (aux_model is not None):
      raise ValueError(f"guidance.rule={guidance.rule!r} "
                       + ("needs an aux_model (the weak branch's model)." if guidance.uses_aux
                          else f"takes no aux_model; only {guidance_lib.AUX_RULES} use one."))
    if model.cfg.text_conditioned and guidance.rule == "icg":
      raise ValueError("guidance rule 'icg' draws random class labels; a text-to-image model"
                       " takes none, cfg, sg, cfg+sg, ag or ag+sg.")
    if aux_model is not None:
      names = (("input_size", "in_channels", "text_length", "text_width")
               if model.cfg.text_conditioned else ("input_size", "in_channels", "num_classes"))
      for name in names:
        if getattr(aux_model.cfg, name, None) != getattr(model.cfg, name):
          raise ValueError(f"aux_model.cfg.{name}={getattr(aux_model.cfg, name, None)} differs"
                           f" from the main model's {getattr(model.cfg, name)}.")
    self.guidance = guidance
    self.plan = make_plan(model.cfg, guidance, steps=steps, solver=solver,
                          aux_cfg=None if aux_model is None else aux_model.cfg)
    self.mesh = mesh
    self.model_cfg = model.cfg
    graphdef, state = nnx.split(model)
    aux_graphdef, aux_state = (None, None) if aux_model is None else nnx.split(aux_model)
    self._states = (state, aux_state)
    plan_key = (steps, solver, self.plan.segments)
    self._sample, self._velocity = _programs(graphdef, aux_graphdef, guidance.rule, plan_key,
                                             nested, mesh)
    if mesh is not None and not jax.config.jax_threefry_partitionable:
      logging.warning("jax_threefry_partitionable is off: samples still do not depend on the"
                      " device count, but every device generates the full batch's noise.")

  def _inputs(self, labels, key):
    cfg = self.model_cfg
    if cfg.text_conditioned:
      labels = _check_text_condition(labels, cfg)
    else:
      labels = jnp.asarray(labels, jnp.int32)
      if labels.ndim != 1:
        raise ValueError(f"labels.shape={labels.shape}: expected [B].")
      values = np.asarray(labels)  # the sampler is called from the host, never under jit
      if values.size and (values.min() < 0 or values.max() >= cfg.num_classes):
        raise ValueError(f"labels must lie in [0, {cfg.num_classes}) (class-conditional"
                         f" sampling); got values in [{values.min()}, {values.max()}].")
    if isinstance(key, int):
      key = jax.random.key(key)
    if self.mesh is not None:
      devices = sharding.data_parallel_size(self.mesh)
      batch = jax.tree.leaves(labels)[0].shape[0]
      if batch % devices:
        raise ValueError(f"batch size {batch} must be divisible by the {devices}"
                         " data-parallel devices of the mesh.")
      labels = jax.device_put(labels, sharding.batch_sharding(self.mesh))
    return labels, key, jnp.float32(self.guidance.omega)

  def _traced_in_mesh(self):
    # Under the mesh, the models keep their activation shardings (sharding.constrain).
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def __call__(self, labels: jax.Array, key: jax.Array | int) -> jax.Array:
    """labels: [B] int (or a text model's caption condition), key: the sample seed -> images
    [B, H, W, C] float32 at t = 1."""
    with self._traced_in_mesh():
      return self._sample(self._states, *self._inputs(labels, key))

  def lower(self, labels: jax.Array, key: jax.Array | int) -> jax.stages.Lowered:
    """The lowered sampling program (for cost analysis or HLO inspection)."""
    with self._traced_in_mesh():
      return self._sample.lower(self._states, *self._inputs(labels, key))

  def compile(self, labels: jax.Array, key: jax.Array | int) -> None:
    """Compiles the sampling program for `labels`' batch without running it; later calls with
    a batch of that shape reuse the executable (jit's cache), so they time sampling alone."""
    self.lower(labels, key).compile()

  def segment(self, step: int) -> Segment:
    for segment in self.plan.segments:
      if segment.start <= step < segment.stop:
        return segment
    raise ValueError(f"step={step} outside [0, {self.plan.steps}).")

  def velocity(self, x: jax.Array, t: jax.Array, labels: jax.Array, key: jax.Array | int,
               step: int = 0) -> jax.Array:
    """The jitted guided velocity of one evaluation with step `step`'s settings.

    x: [B, H, W, C], t: [B] in [0, 1], labels: [B]; key draws this evaluation's subsets.
    """
    labels, key, omega = self._inputs(labels, key)
    with self._traced_in_mesh():
      return self._velocity(self._states, x, t, labels, key, omega, segment=self.segment(step))


def sample(model: dit.DiT, guidance: GuidanceConfig, labels: jax.Array, key: jax.Array | int,
           *, steps: int = 40, solver: str = "euler", aux_model: dit.DiT | None = None,
           mesh: Mesh | None = None, nested: bool = False) -> tuple[jax.Array, SamplingPlan]:
  """Guided samples for `labels` [B] from seed `key` -> (images [B, H, W, C], plan).

  A `Sampler` in one call; repeated calls with the same settings reuse the compilation.
  """
  sampler = Sampler(model, guidance, steps=steps, solver=solver, aux_model=aux_model,
                    mesh=mesh, nested=nested)
  return sampler(labels, key), sampler.plan
