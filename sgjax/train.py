"""Training entry point.

    python -m sgjax.train --config=configs/digits.py --workdir=runs/digits
    python -m sgjax.train --config=configs/imagenet256.py:model=SiT-XL/2,sparsity=routing \
        --workdir=/shared/runs/sit_xl --config.data.path='/data/latents/train-*'

Starting again with the same workdir resumes from its latest checkpoint. SIGTERM / SIGINT
(pod preemption, Ctrl-C) save a checkpoint and exit with status 75 (`EXIT_PREEMPTED`), so a
scheduler can tell a stop to resume from a finished run (status 0).
"""

from __future__ import annotations

import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from sgjax import checkpoint, config as config_lib, distributed, flow, logs, paths, sample
from sgjax import cli, sharding, train_state
from sgjax.data import pipeline, sources
from sgjax.text import conditioning

FLAGS = flags.FLAGS
# sysexits' EX_TEMPFAIL: stopped early with a checkpoint; rerunning the command resumes.
EXIT_PREEMPTED = 75


class Preempted(Exception):
  """Training stopped on a signal after saving a checkpoint at `step`."""

  def __init__(self, step: int):
    super().__init__(f"stopped at step {step} with a checkpoint; run the same command to"
                     " resume")
    self.step = step


class Preemption:
  """Turns the first SIGTERM/SIGINT of any process into a checkpoint and stop, taken at the
  same step by every process.

  Hosts run apart by the steps they have dispatched, and a signal may reach only some of
  them, so a local flag would stop them at different steps (one saving, another waiting in
  the next step's collectives). Each step, `poll` starts an all-reduce of every process's
  flag, laid out like the batch, and reads the previous step's result: all processes get
  the same answer for the same step, and the read never drains the device queue.
  """

  def __init__(self, batch_sharding, local_rows: int):
    self.requested = False
    self._sharding, self._local_rows = batch_sharding, local_rows
    self._any = jax.jit(jnp.any, out_shardings=sharding.replicated(batch_sharding.mesh))
    self._pending = None
    self._previous = {sig: signal.signal(sig, self._handle)
                      for sig in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # a second signal: stop now
      raise KeyboardInterrupt
    logging.warning("received %s: saving a checkpoint and stopping",
                    signal.Signals(signum).name)
    self.requested = True

  def poll(self) -> bool:
    """Call once per step after dispatching it: whether any process had been signalled by
    the previous step's poll."""
    flags = jax.make_array_from_process_local_data(
        self._sharding, np.full((self._local_rows,), self.requested))
    previous, self._pending = self._pending, self._any(flags)
    return previous is not None and bool(previous)

  def close(self) -> None:
    """Puts the signal handlers of before back (a later Ctrl-C acts as it did then)."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def prepare_workdir(config, workdir: str, saved: dict | None, step: int | None = None) -> None:
  """Refuses a workdir that holds another run; writes the resolved config.json.

  `saved` is the config of the checkpoint resumed from, at `step` (the authority when there is
  one); without a checkpoint, config.json of a run that stopped before its first save is
  compared, so that its logs are not cut back for a different run.
  """
  path = paths.join(workdir, "config.json")
  current = config.to_dict()
  if saved is None and paths.resolve(path).exists():
    saved = paths.read_json(path)
  if saved is not None:
    for change in config_lib.resume_changes(saved, current, step):
      logging.info("resuming with a changed setting: %s", change)
  if jax.process_index() == 0:
    checkpoint.write_config_json(workdir, current)


def check_batch(batch: dict, model_cfg, where: str) -> None:
  """Raises ValueError, naming the problem, when a host batch does not fit the model."""
  image_shape = (model_cfg.input_size, model_cfg.input_size, model_cfg.in_channels)
  if model_cfg.text_conditioned:
    pipeline.check_batch(batch, image_shape, None, where)
    conditioning.check_batch(batch, model_cfg, where)
  else:
    pipeline.check_batch(batch, image_shape, model_cfg.num_classes, where)


def check_batch_size(batch_size: int, mesh) -> None:
  dp = sharding.data_parallel_size(mesh)
  if batch_size % dp or batch_size % jax.process_count():
    raise ValueError(
        f"train.batch_size={batch_size} is not divisible by the data-parallel size {dp}"
        f" (mesh {dict(mesh.shape)}) and the {jax.process_count()} processes; choose a"
        f" multiple of {dp * jax.process_count() // np.gcd(dp, jax.process_count())}.")


def train(config, workdir: str, devices=None) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir` on `devices` (default: all) to
  `config.train.steps`; returns the last logged metrics. Raises `Preempted` after saving when
  a signal stopped it earlier."""
  # Everything that can fail on bad input fails here, before any compilation.
  config_lib.validate(config)
  model_cfg = config_lib.model_config(config.model)
  loss_cfg = flow.LossConfig(**config.flow)
  optim_cfg = train_state.OptimConfig.from_train_config(config.train)
  mesh = sharding.make_mesh(config.mesh.preset, config.mesh.tensor, devices,
                            config.mesh.dcn_data)
  check_batch_size(config.train.batch_size, mesh)
  # Every process opens the checkpoints the same way (orbax synchronises them).
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_ckpts,
                                 keep_every=config.train.get("keep_every", 0))
  # Abstract init -> shardings -> the state of the newest checkpoint that reads, if any.
  tx = train_state.make_optimizer(optim_cfg)
  graphdef, abstract, shardings = train_state.abstract_state(
      model_cfg, tx, mesh, config.mesh.preset, config.seed)

  def resume(step: int):
    saved = ckpt.restore_config(step)
    config_lib.resume_changes(saved, config.to_dict(), step)  # another run: before its weights
    return saved, ckpt.restore(step, abstract)

  # Damaged newer steps are reported and set aside: they would block saving those steps.
  start, resumed = ckpt.newest_intact(resume, set_aside=True)
  saved, state = resumed or (None, None)
  prepare_workdir(config, workdir, saved, start)
  source = sources.make_source(config.data, "train", model_cfg)
  condition = train_state.label_condition
  if model_cfg.text_conditioned:
    encoder = conditioning.make_encoder(config.text, model_cfg)
    if encoder is not None:
      source = conditioning.TokenizedSource(source, encoder)
    condition = conditioning.condition_fn(encoder)
  check_batch({k: np.asarray(v)[None] for k, v in source[0].items()}, model_cfg,
              "the dataset's first example")

  if start is None:
    start = 0
    state = train_state.init_state(model_cfg, tx, shardings, config.seed)
  else:
    logging.info("resuming from the checkpoint at step %d", start)
  # The data stream resumes at the batch after the last step, whatever the process count.
  data_iter = pipeline.make_iterator(
      source, global_batch=config.train.batch_size, seed=config.seed, flip=config.data.flip,
      start_step=start, num_workers=config.data.num_workers,
      shard_index=jax.process_index(), shard_count=jax.process_count())

  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = jax.jit(
      train_state.make_train_step(graphdef, tx, loss_cfg, optim_cfg.ema_decay,
                                  jax.random.fold_in(jax.random.key(config.seed), 1),
                                  condition),
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)

  logger = logs.MetricLogger(workdir, start_step=start, total_steps=config.train.steps,
                             batch_size=config.train.batch_size,
                             tokens_per_image=model_cfg.num_tokens,
                             enabled=jax.process_index() == 0)
  # EMA sample grids of class-conditional runs while training; latents would need the VAE
  # to become pictures.
  previews = (config.train.sample_every > 0 and sample.latent_scale_of(config) is None
              and not model_cfg.text_conditioned)
  preemption = Preemption(batch_sharding, config.train.batch_size // jax.process_count())
  pending, last = [], {}
  last_saved, preempted = start, False
  try:
    # Traced under the mesh, the models keep their activation shardings (sharding.constrain).
    with jax.set_mesh(mesh):
      for step in range(start + 1, config.train.steps + 1):
        local = next(data_iter)
        # Cheap on the host; an out-of-range label would silently turn into NaN embeddings.
        check_batch(local, model_cfg, f"batch of step {step}")
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
                 for k, v in local.items()}
        state, metrics = step_fn(state, batch)
        pending.append(metrics)
        preempted = preemption.poll()
        stop = preempted or step == config.train.steps
        save = stop or step % config.train.ckpt_every == 0
        if save or step % config.train.log_every == 0:
          last = _summarise(jax.device_get(pending), step, last_saved)
          pending = []
          logger.write(step, last)
        if save:
          ckpt.save(step, state, config.to_dict())
          last_saved = step
        if previews and step % config.train.sample_every == 0:
          sample.preview_grid(nnx.merge(graphdef, state["ema"]), mesh,
                              paths.join(workdir, "samples", f"step_{step:07d}.png"),
                              seed=config.seed)
        if preempted:
          break
  finally:
    preemption.close()
    ckpt.wait()
    ckpt.close()
    logger.close()
    if hasattr(data_iter, "close"):
      data_iter.close()
  if preempted:
    raise Preempted(last_saved)
  return last


def _summarise(metrics: list[dict], step: int, last_saved: int) -> dict[str, float]:
  summary = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
  bad = sorted(k for k, v in summary.items() if not np.isfinite(v))
  if bad:
    raise FloatingPointError(
        f"{', '.join(bad)} became non-finite by step {step}; the last good checkpoint"
        f" (step {last_saved}) is kept. Lower train.lr or set train.grad_clip, then resume.")
  return summary


def define_flags() -> None:
  """Flags of this entry point (defined only when it runs, so modules import cleanly)."""
  config_flags.DEFINE_config_file("config", None, "Config file: configs/NAME.py[:arg].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, config.json).")
  distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize_from_flags()  # multi-host jobs: before any JAX computation
  logs.quiet_libraries()
  try:
    train(FLAGS.config, FLAGS.workdir)
  except Preempted as e:
    logging.warning("%s", e)
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
