"""Training logs: a progress line, TensorBoard event files and WORKDIR/metrics.jsonl.

Only process 0 writes. On resume, metrics.jsonl is cut back to the restored step so that the
file never holds two different losses for one step.
"""

from __future__ import annotations

import json
import logging as py_logging
import platform
import time

from absl import logging

from sgjax import paths


class _DropLibraryChatter(py_logging.Filter):
  """Hides orbax's per-save INFO lines (dozens per checkpoint); warnings still show."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def quiet_libraries() -> None:
  py_logging.getLogger("absl").addFilter(_DropLibraryChatter())


def read_jsonl(path: str, last_step: int | None = None) -> list[str]:
  """The lines of a metrics.jsonl (none if it does not exist), without those past
  `last_step`."""
  if not paths.resolve(path).exists():
    return []
  return [line + "\n" for line in paths.read_text(path).splitlines() if line.strip() and (
      last_step is None or json.loads(line)["step"] <= last_step)]


class MetricLogger:
  """Writes one record per logged step and prints step, loss, images/s, tokens/s, ETA.

  metrics.jsonl is rewritten whole at each record (object stores have no append), so a
  reader never sees a partial line.
  """

  def __init__(self, workdir: str, *, start_step: int, total_steps: int, batch_size: int,
               tokens_per_image: int, enabled: bool = True):
    self.enabled = enabled
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.tokens_per_image = tokens_per_image
    self._last = (start_step, time.perf_counter())
    self._tb = None
    self._first = True
    if enabled:
      self._jsonl = paths.join(workdir, "metrics.jsonl")
      self._lines = read_jsonl(self._jsonl, start_step)
      paths.write_text(self._jsonl, "".join(self._lines))
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(paths.join(workdir, "tensorboard"), purge_step=start_step + 1)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    now = time.perf_counter()
    last_step, last_time = self._last
    self._last = (step, now)
    first, self._first = self._first, False
    if not self.enabled:
      return
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    # The first interval of a process includes compilation: no throughput for it.
    if step > last_step and now > last_time and not first:
      steps_per_s = (step - last_step) / (now - last_time)
      record["images_per_s"] = steps_per_s * self.batch_size
      record["tokens_per_s"] = record["images_per_s"] * self.tokens_per_image
      eta = (self.total_steps - step) / steps_per_s
      logging.info("step %d/%d  loss %.4f  %.1f img/s  %.0f tok/s  ETA %s", step,
                   self.total_steps, record["loss"], record["images_per_s"],
                   record["tokens_per_s"], _duration(eta))
    self._lines.append(json.dumps(record) + "\n")
    paths.write_text(self._jsonl, "".join(self._lines))
    for name, value in record.items():
      if name != "step":
        self._tb.add_scalar(f"train/{name}", value, step)

  def close(self) -> None:
    if self.enabled:
      self._tb.close()


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
