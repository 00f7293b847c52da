"""Benchmarks: training and sampling throughput, FLOPs, MFU, memory, compile times.

    python -m sgjax.bench --suite=all --model=DiT-S/2 --input_size=16    (CPU, minutes)
    python -m sgjax.bench --suite=all --model=SiT-XL/2 --dtype=bfloat16   (one GPU)

Every number is measured after compilation and warm-up, as the median (and min/max) over
`--repeats` rounds that time every setting of a suite once, in rotating order, so that a
machine's drift reaches all settings alike; every ratio compares medians of this one run.
The sample suite also times one pass per sampling step at each sparsity rate (where guided
sampling's time goes), and `--profile_dir` records a jax.profiler trace. Writes
`OUT/bench-<date>.json` and `.md`. Needs only jax, flax, optax and absl (no grain,
ml_collections or tensorflow-datasets), so it runs on a bare accelerator image.

`--suite=io` (not part of `all`: it writes to disk) times what surrounds the train step:
a step that saves a checkpoint (none, sync, async) and the grain input pipeline alone, by
worker processes and read threads, against the train step's steps/s. Only its second part
needs grain (imported there), and it is skipped where grain is missing.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import resource
import statistics
import tempfile
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from sgjax import cli, flops as flops_lib, paths
from sgjax import flow, guidance as guidance_lib, sampling, sharding, sparsity, train_state
from sgjax.models import dit, trdit
from sgjax.text import conditioning
from sgjax.sparsity import Route

# Dense bf16 matmul peaks (no sparsity) used for the nominal MFU, in TFLOP/s.
NOMINAL_PEAK_TFLOPS = {
    "H100": 989.0,  # H100 SXM5
    "H200": 989.0,  # same Hopper SXM tensor cores
    "A100": 312.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5": 459.0,  # v5p
    "TPU v6 lite": 918.0,  # v6e (Trillium)
}
# TREAD's route proportions: r2->24 of 28, r2->20 of 24, r2->8 of 12, and the text-to-image
# model's r2->30 of 34 (0-based, inclusive).
DEFAULT_ROUTE_END = {28: 24, 24: 20, 12: 8, 34: 30}


def time_fn(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
  """Seconds per call of `fn` (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def nominal_peak(device: jax.Device) -> float | None:
  kind = device.device_kind
  for name, peak in sorted(NOMINAL_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if name in kind:
      return peak * 1e12
  return None


def measured_matmul_peak(dtype, size: int, repeats: int) -> float:
  """FLOP/s of a large square matmul in `dtype` on the default device."""
  a = jnp.ones((size, size), dtype)
  b = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  timing = time_fn(lambda: matmul(a, b).block_until_ready(), repeats, warmup=2)
  return 2.0 * size**3 / timing["median_s"]


def peak_memory_bytes() -> tuple[int | None, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def model_config(args: dict, sparsity: str) -> dit.DiTConfig | trdit.TRDiTConfig:
  """The model the flags describe, with sparsity mode `sparsity`; routing uses --route
  (start, end) or TREAD's default for the model's depth. 'TR-DiT-<size>/<patch>' is the
  text-to-image TR-DiT at a DiT size (e.g. TR-DiT-2.5B/2), taking --text_length tokens of
  width --text_width."""
  text = args["model"].startswith("TR-")
  size = dit.parse_model_name(args["model"][3:] if text else args["model"])
  routes = ()
  if sparsity == "routing":
    end = DEFAULT_ROUTE_END.get(size["depth"], size["depth"] - 2)
    start, end = (tuple(int(v) for v in args["route"]) if args["route"]
                  else (min(2, end), end))
    routes = (Route(start, end, args["gamma"]),)
  if text:
    if sparsity == "masking":
      raise ValueError("--modes: TR-DiT trains dense or routed (no masking).")
    return trdit.TRDiTConfig(input_size=args["input_size"], in_channels=args["in_channels"],
                             text_length=args["text_length"], text_width=args["text_width"],
                             sparsity=sparsity, routes=routes, dtype=args["dtype"],
                             attention=args["attention"], **size).validate()
  return dit.DiTConfig(input_size=args["input_size"], in_channels=args["in_channels"],
                       num_classes=args["num_classes"], sparsity=sparsity, routes=routes,
                       mask_gamma=args["gamma"], dtype=args["dtype"],
                       attention=args["attention"], **size).validate()


def conditions(cfg, batch: int, key: jax.Array) -> dict[str, jax.Array]:
  """A batch's conditioning: labels, or for TR-DiT random caption hidden states with a mask
  of random lengths (what a frozen encoder hands over)."""
  if not cfg.text_conditioned:
    return {"label": jnp.arange(batch, dtype=jnp.int32) % cfg.num_classes}
  lengths = jax.random.randint(key, (batch, 1), 1, cfg.text_length + 1)
  return {"text": jax.random.normal(key, (batch, cfg.text_length, cfg.text_width)),
          "mask": jnp.arange(cfg.text_length)[None] < lengths}


def sample_condition(cfg, batch: int):
  """What the sampler takes for `batch` samples: balanced labels, or captions."""
  data = conditions(cfg, batch, jax.random.key(2))
  return data["label"] if "label" in data else data


def program_memory_bytes(compiled: jax.stages.Compiled) -> int:
  """Device memory one execution of a compiled program needs (XLA's buffer assignment):
  arguments + outputs (less donated buffers they alias) + temporaries."""
  stats = compiled.memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def compile_train(cfg: dit.DiTConfig | trdit.TRDiTConfig, batch: int):
  """One configuration's train step, compiled -> (step(state, data) -> (state, metrics),
  a fresh state (the step donates it), a batch of random data, the configuration's row)."""
  mesh = sharding.make_mesh("data")
  tx = train_state.make_optimizer(train_state.OptimConfig(lr=1e-4))
  graphdef, abstract, shardings = train_state.abstract_state(cfg, tx, mesh, "data")
  state = train_state.init_state(cfg, tx, shardings)
  condition = (conditioning.condition_fn(None) if cfg.text_conditioned  # precomputed text
               else train_state.label_condition)
  step = jax.jit(train_state.make_train_step(graphdef, tx, flow.LossConfig(), 0.9999,
                                             jax.random.key(1), condition),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)), donate_argnums=0)
  key = jax.random.key(0)
  images = jax.random.normal(key, (batch, cfg.input_size, cfg.input_size, cfg.in_channels))
  data = {"image": images, **conditions(cfg, batch, key)}
  data = jax.device_put(data, sharding.batch_sharding(mesh))
  start = time.perf_counter()
  compiled = step.lower(abstract, data).compile()
  compile_s = time.perf_counter() - start
  # Model FLOPs: forward + backward = 3x the forward pass actually run (true convention).
  return compiled, state, data, {
      "sparsity": cfg.sparsity, "batch": batch, "tokens_per_image": cfg.num_tokens,
      "compile_s": compile_s,
      "compiled_tflops_per_step": compiled.cost_analysis()["flops"] / 1e12,
      "model_tflops_per_step": 3 * flops_lib.forward_flops(cfg).true * batch / 1e12,
      "program_memory_gib": program_memory_bytes(compiled) / 2**30,
  }


def prepare_train(cfg: dit.DiTConfig | trdit.TRDiTConfig, batch: int,
                  steps: int) -> tuple[Callable[[], None], dict[str, Any]]:
  """One configuration's compiled train step -> (run `steps` steps and block, its row)."""
  compiled, state, data, row = compile_train(cfg, batch)

  def run():
    nonlocal state
    for _ in range(steps):
      state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)

  return run, row


def write_results(out_dir: str, meta: dict, results: dict, table: str) -> str:
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  base = paths.join(out_dir, f"bench-{stamp}")
  paths.write_json(base + ".json", {**meta, **results})
  paths.write_text(base + ".md", table)
  return base


def markdown(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
  """rows -> a Markdown table; columns: (key, header, format)."""
  lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
           "|" + "---|" * len(columns)]
  for row in rows:
    cells = []
    for key, _, fmt in columns:
      value = row.get(key)
      cells.append("" if value is None else format(value, fmt))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


TRAIN_COLUMNS = [
    ("sparsity", "sparsity", "s"), ("images_per_s", "images/s", ".1f"),
    ("step_s", "step s (median)", ".4f"), ("compile_s", "compile s", ".1f"),
    ("compiled_tflops_per_step", "compiled TFLOP/step", ".3f"),
    ("achieved_tflops", "model TFLOP/s", ".2f"),
    ("mfu_measured_peak", "MFU (measured peak)", ".1%"),
    ("mfu_nominal_peak", "MFU (nominal peak)", ".1%"),
    ("speedup_measured", "speedup vs dense", ".2f"),
    ("speedup_predicted", "predicted (FLOPs)", ".2f"),
    ("speedup_efficiency", "measured / predicted", ".1%"),
    ("program_memory_gib", "step memory GiB (XLA)", ".2f"),
]


def run_train_suite(args: dict, peak: float, nominal: float | None) -> list[dict]:
  """Train steps of each sparsity mode, compiled and warmed, then timed in interleaved rounds
  of `steps_per_repeat` steps; speedups vs dense are ratios of the medians."""
  rows, runs = {}, {}
  for mode in args["modes"]:
    cfg = model_config(args, mode)
    logging.info("train bench: compiling %s %s batch %d", args["model"], mode, args["batch"])
    runs[mode], rows[mode] = prepare_train(cfg, args["batch"], args["steps_per_repeat"])
    runs[mode]()  # warm-up
  logging.info("train bench: %d interleaved rounds", args["repeats"])
  times = time_interleaved(runs, args["repeats"])
  # XLA counts FLOPs of every op on CPU; on GPU its count misses the library matmuls, so the
  # prediction there uses the library's model FLOPs.
  flops_key = ("compiled_tflops_per_step" if jax.devices()[0].platform == "cpu"
               else "model_tflops_per_step")
  steps = args["steps_per_repeat"]
  for mode, row in rows.items():
    step_s = statistics.median(times[mode]) / steps
    achieved = row["model_tflops_per_step"] * 1e12 / step_s
    row.update(step_s=step_s, step_min_s=min(times[mode]) / steps,
               step_max_s=max(times[mode]) / steps, images_per_s=row["batch"] / step_s,
               tokens_per_s=row["batch"] * row["tokens_per_image"] / step_s,
               achieved_tflops=achieved / 1e12, mfu_measured_peak=achieved / peak,
               mfu_nominal_peak=achieved / nominal if nominal else None)
  for row in rows.values():
    if "dense" in rows:
      row["speedup_measured"] = rows["dense"]["step_s"] / row["step_s"]
      row["speedup_predicted"] = rows["dense"][flops_key] / row[flops_key]
      row["speedup_efficiency"] = row["speedup_measured"] / row["speedup_predicted"]
    print(json.dumps(row), flush=True)
  return list(rows.values())


# name -> guidance; the paper's Table 2 set (sg_flops: SG 0.5/0.9; sg_fid: AG+SG with cosine
# schedules) plus SG 0.5/0.8, CFG+SG and SG 0.1/0.8. AG / AG+SG use a second, randomly
# initialised model of the same size as the auxiliary (what matters here is its cost).
SAMPLE_SETTINGS = {
    "unguided": guidance_lib.GuidanceConfig(rule="none"),
    "cfg": guidance_lib.GuidanceConfig(rule="cfg", omega=1.5),
    "ag": guidance_lib.GuidanceConfig(rule="ag", omega=1.5),
    "icg": guidance_lib.GuidanceConfig(rule="icg", omega=1.5),
    "sg_flops": guidance_lib.GuidanceConfig(rule="sg", omega=1.5,
                                                         gamma_strong=0.5, gamma_weak=0.9),
    "sg_0.5_0.8": guidance_lib.GuidanceConfig(rule="sg", omega=1.5, gamma_strong=0.5,
                                              gamma_weak=0.8),
    "cfg+sg_0.2_0.7": guidance_lib.GuidanceConfig(rule="cfg+sg", omega=1.5,
                                                  gamma_strong=0.2, gamma_weak=0.7),
    # The paper's text-to-image HPSv3 setting (its GenEval one is cfg+sg_0.2_0.7).
    "sg_0.1_0.8": guidance_lib.GuidanceConfig(rule="sg", omega=1.8, gamma_strong=0.1,
                                              gamma_weak=0.8),
    "sg_fid": guidance_lib.GuidanceConfig(
        rule="ag+sg", omega=1.5, schedule="cosine", gamma_strong=0.0, gamma_strong_end=0.6,
        gamma_weak=0.6, gamma_weak_end=0.0),
}
SAMPLE_COLUMNS = [
    ("setting", "setting", "s"), ("images_per_s", "images/s", ".2f"),
    ("batch_s", "s per batch (median)", ".3f"), ("compile_s", "compile s", ".1f"),
    ("num_variants", "variants", "d"), ("gflops_true", "GFLOPs/img/step (true)", ".2f"),
    ("gflops_paper", "GFLOPs/img/step (paper)", ".2f"),
    ("speedup_vs_unguided", "speedup vs unguided", ".2f"),
    ("predicted_vs_unguided", "predicted", ".2f"),
    ("efficiency_vs_unguided", "measured / predicted", ".1%"),
    ("speedup_vs_cfg", "speedup vs CFG", ".2f"), ("predicted_vs_cfg", "predicted", ".2f"),
    ("efficiency_vs_cfg", "measured / predicted (vs CFG)", ".1%"),
]


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each blocking fn, timed in rounds that call every fn once.

  On a shared or throttling machine speed drifts over minutes; timing the settings one after
  another would fold that drift into their ratios, while rounds expose all to the same drift.
  Each round starts one fn later than the last, so no fn always follows the same one (a
  program can pay for the memory its predecessor left behind).
  """
  names = list(fns)
  times = {name: [] for name in names}
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - start)
  return times


def run_sample_suite(args: dict) -> list[dict]:
  """Images/s and FLOPs of each guidance setting on a routed model with random weights.

  Settings are compiled and warmed first, then timed in interleaved rounds; speedups are
  ratios of the medians. Predicted speedups come from XLA's compiled FLOPs of the sampling
  program that is timed, where the backend counts them (CPU), else from the library's true
  FLOPs.
  """
  unknown = [name for name in args["settings"] if name not in SAMPLE_SETTINGS]
  if unknown:
    raise ValueError(f"--settings: unknown {unknown}; known: {list(SAMPLE_SETTINGS)}.")
  cfg = model_config(args, "routing")
  make = train_state.make_model_fn(cfg, 0)
  model, aux_model = make(), train_state.make_model_fn(cfg, 1)()
  batch = args["sample_batch"]
  labels = sample_condition(cfg, batch)
  count_compiled = jax.devices()[0].platform == "cpu"
  rows, runs = {}, {}
  for name in args["settings"]:
    guidance = SAMPLE_SETTINGS[name]
    logging.info("sample bench: compiling %s", name)
    sampler = sampling.Sampler(model, guidance, steps=args["sample_steps"],
                               aux_model=aux_model if guidance.uses_aux else None)
    runs[name] = lambda sampler=sampler: jax.block_until_ready(sampler(labels, 0))
    start = time.perf_counter()
    runs[name]()
    summary = sampler.plan.summary()
    rows[name] = {"setting": name, "first_call_s": time.perf_counter() - start,
                  "num_variants": summary["num_variants"],
                  "gflops_true": summary["gflops_true"],
                  "gflops_paper": summary["gflops_paper"], "nfe": summary["nfe"]}
    if count_compiled and guidance.schedule == "constant" and guidance.interval is None:
      # The program just timed (a cache hit: no second compilation). One segment, so one
      # loop, whose body XLA's cost analysis counts once: one step's FLOPs.
      compiled = sampler.lower(labels, 0).compile()
      rows[name]["compiled_gflops_per_image_step"] = (compiled.cost_analysis()["flops"]
                                                      / batch / 1e9)
  logging.info("sample bench: %d interleaved rounds", args["repeats"])
  times = time_interleaved(runs, args["repeats"])
  flops_key = "compiled_gflops_per_image_step" if count_compiled else "gflops_true"
  for name, row in rows.items():
    median = statistics.median(times[name])
    row.update(batch_s=median, batch_min_s=min(times[name]), batch_max_s=max(times[name]),
               images_per_s=batch / median, compile_s=row.pop("first_call_s") - median)
  for name, row in rows.items():
    for ref in ("unguided", "cfg"):
      if ref not in rows:
        continue
      row[f"speedup_vs_{ref}"] = rows[ref]["batch_s"] / row["batch_s"]
      if flops_key in row and flops_key in rows[ref]:
        row[f"predicted_vs_{ref}"] = rows[ref][flops_key] / row[flops_key]
        row[f"efficiency_vs_{ref}"] = row[f"speedup_vs_{ref}"] / row[f"predicted_vs_{ref}"]
    print(json.dumps(row), flush=True)
  return list(rows.values())


FORWARD_COLUMNS = [
    ("gamma", "gamma", ".2f"), ("kept_tokens", "kept tokens", "d"),
    ("step_ms", "ms per step (median)", ".2f"),
    ("gflops_per_image", "GFLOPs/img/step", ".3f"), ("achieved_gflops", "GFLOP/s", ".1f"),
    ("flops_efficiency", "GFLOP/s vs dense", ".1%"),
]


def run_forward_profile(args: dict) -> list[dict]:
  """Where guided sampling's time goes: one pass of the routed model per step at each rate.

  A guided step costs about f(gamma_strong) + f(gamma_weak); predictions from FLOPs assume
  every pass runs at the same FLOP/s. Each rate is timed as an unguided sampler at that rate
  (the same loop as guided sampling, whose weight layouts XLA hoists out of the loop, unlike
  a lone forward call), so a measured speedup that falls short shows whether the sparse
  passes themselves run slower per FLOP (small matmuls, gathers) or the time goes elsewhere.
  """
  cfg = model_config(args, "routing")
  model = train_state.make_model_fn(cfg, 0)()
  # Two steps: the loop (and what XLA hoists out of it) without a whole trajectory's time.
  batch, steps = args["sample_batch"], 2
  labels = sample_condition(cfg, batch)
  count_compiled = jax.devices()[0].platform == "cpu"
  rows, runs = [], {}
  for gamma in sorted({0.0, *(float(g) for g in args["forward_gammas"])}):
    sampler = sampling.Sampler(model, guidance_lib.GuidanceConfig(rule="none",
                                                                  gamma_strong=gamma),
                               steps=steps)
    runs[gamma] = lambda sampler=sampler: jax.block_until_ready(sampler(labels, 0))
    runs[gamma]()  # compile and warm up
    # The program just run (a cache hit); its loop body, counted once, is one step.
    flops = (sampler.lower(labels, 0).compile().cost_analysis()["flops"]
             if count_compiled else flops_lib.forward_flops(cfg, gamma).true * batch)
    rows.append({"gamma": gamma, "kept_tokens": sparsity.num_kept(cfg.num_tokens, gamma),
                 "gflops_per_image": flops / batch / 1e9})
  times = time_interleaved(runs, args["repeats"])
  for row, seconds in zip(rows, times.values()):
    median = statistics.median(seconds) / steps
    row.update(step_ms=median * 1e3, step_min_ms=min(seconds) / steps * 1e3,
               step_max_ms=max(seconds) / steps * 1e3,
               achieved_gflops=row["gflops_per_image"] * batch / median)
  for row in rows:
    row["flops_efficiency"] = row["achieved_gflops"] / rows[0]["achieved_gflops"]
    print(json.dumps(row), flush=True)
  return rows


CHECKPOINT_COLUMNS = [
    ("save", "checkpoint save", "s"), ("step_s", "checkpointing step s (median)", ".3f"),
    ("vs_plain_step", "vs plain step", ".2f"), ("written_s", "until written s", ".3f"),
    ("next_step_s", "next step s", ".3f"),
]


def run_checkpoint_suite(args: dict, root: str) -> list[dict]:
  """How long a train step that saves a checkpoint holds training up: no save, sync, async.

  The dense model of the flags saves its whole train state (parameters, EMA, Adam moments)
  through `sgjax.checkpoint.Checkpointer` into `root`, as training does. Each round times
  every setting once, in rotating order: a train step and its save, from dispatching the step
  until the next one could be dispatched (`step_s`: a sync save returns once the checkpoint
  is written, an async one once the state is copied to host memory, orbax writing it in
  background threads); then one more step (`next_step_s`: beside the write, when async),
  while a thread waits for the checkpoint to be complete (`written_s`, from dispatching the
  first step).
  """
  from sgjax import checkpoint  # pylint: disable=g-import-not-at-top  (orbax: io suite only)
  cfg = model_config(args, "dense")
  logging.info("io bench: compiling %s dense batch %d", args["model"], args["batch"])
  compiled, state, data, _ = compile_train(cfg, args["batch"])
  state_gib = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) / 2**30
  savers = {"none": None,
            "sync": checkpoint.Checkpointer(paths.join(root, "sync"), keep=2, async_save=False),
            "async": checkpoint.Checkpointer(paths.join(root, "async"), keep=2)}
  times = {name: [] for name in savers}
  step = 0

  def checkpointing_step(name: str) -> None:
    nonlocal state, step
    saver, written, waiter = savers[name], [], None
    step += 1
    start = time.perf_counter()
    state, _ = compiled(state, data)
    if saver is None:
      jax.block_until_ready(state)
    else:
      saver.save(step, state, {"bench": "io"})
    saved = time.perf_counter()
    if saver is not None:

      def wait():
        try:
          saver.wait()
          written.append(time.perf_counter())
        except BaseException as e:  # pylint: disable=broad-exception-caught  (raised below)
          written.append(e)

      waiter = threading.Thread(target=wait)
      waiter.start()
    state, _ = compiled(state, data)  # donates the state an async save may still be writing
    jax.block_until_ready(state)
    next_done = time.perf_counter()
    if waiter is not None:
      waiter.join()
      if isinstance(written[0], BaseException):
        raise written[0]
    times[name].append({"step_s": saved - start, "next_step_s": next_done - saved,
                        "written_s": written[0] - start if written else None})

  try:
    for name in savers:  # warm-up: orbax's first save sets up its folders and threads
      checkpointing_step(name)
      times[name].clear()
    logging.info("io bench: %d interleaved rounds of checkpointing steps", args["repeats"])
    time_interleaved({name: lambda name=name: checkpointing_step(name) for name in savers},
                     args["repeats"])
  finally:
    for saver in savers.values():
      if saver is not None:
        saver.close()  # waits for a write in flight
  rows = []
  for name, rounds in times.items():
    seconds = {key: [r[key] for r in rounds if r[key] is not None] for key in rounds[0]}
    rows.append({"save": name, "batch": args["batch"], "state_gib": state_gib,
                 **{key: statistics.median(v) if v else None for key, v in seconds.items()},
                 "step_min_s": min(seconds["step_s"]), "step_max_s": max(seconds["step_s"])})
  for row in rows:
    row["vs_plain_step"] = row["step_s"] / rows[0]["step_s"]
    print(json.dumps(row), flush=True)
  return rows


LOADER_COLUMNS = [
    ("loader", "input", "s"), ("batches_per_s", "batches/s", ".2f"),
    ("images_per_s", "images/s", ".0f"), ("vs_train_step", "batches per train step", ".1f"),
    ("first_batch_s", "first batch s", ".2f"),
]


def write_latent_posteriors(directory: str, records: int, shape: tuple[int, ...],
                            shards: int = 4) -> str:
  """`records` random VAE posteriors (`mean`, `std` float32 `shape`, a label) in ArrayRecord
  shards, as `python -m sgjax.latents` writes them -> the shards' glob pattern."""
  # pylint: disable-next=g-import-not-at-top
  from array_record.python import array_record_module
  from sgjax.data import sources  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for shard in range(shards):
    writer = array_record_module.ArrayRecordWriter(
        paths.join(directory, f"train-{shard:05d}-of-{shards:05d}.array_record"),
        "group_size:1")
    for index in range(shard, records, shards):
      writer.write(sources.encode_latent_record(
          None, index % 1000, mean=rng.standard_normal(shape, np.float32),
          std=np.exp(rng.standard_normal(shape, np.float32) - 3), index=np.int64(index)))
    writer.close()
  return paths.join(directory, "train-*.array_record")


def run_loader_suite(args: dict, root: str, train_step_s: float) -> list[dict]:
  """Batches/s of the input pipeline alone, by worker processes and read threads, against
  the train step's steps/s at the same batch (`vs_train_step` > 1: the input keeps ahead).

  `--loader_records` random VAE posteriors of the model's input shape are written as
  ArrayRecord shards into `root` (local) and read through `sgjax.data.pipeline.make_iterator`
  as training reads them (global shuffle, a latent drawn per example, host batches); each
  combination of --loader_workers and --loader_threads is one setting. Rounds time
  `--loader_batches` batches of each setting in rotating order; each timing starts after
  taking the batches the setting's buffers filled while the others ran, so it measures the
  rate batches are made at, not the rate stored ones are handed out.
  """
  from sgjax.data import pipeline, sources  # pylint: disable=g-import-not-at-top  (grain)
  batch, count = args["batch"], args["loader_batches"]
  shape = (args["input_size"], args["input_size"], args["in_channels"])
  logging.info("io bench: writing %d latent posteriors %s", args["loader_records"], shape)
  source = sources.LatentSource(write_latent_posteriors(root, args["loader_records"], shape),
                                scale=0.18215)
  rows = {"train step": {"loader": "train step (no save)", "batches_per_s": 1 / train_step_s}}
  runs, times, first = {}, {}, None
  with contextlib.ExitStack() as stack:
    for workers in (int(w) for w in args["loader_workers"]):
      for threads in (int(t) for t in args["loader_threads"]):
        name = f"num_workers={workers}, read_threads={threads}"
        start = time.perf_counter()
        iterator = pipeline.make_iterator(source, global_batch=batch, seed=0,
                                          num_workers=workers, read_threads=threads)
        stack.callback(iterator.close)  # ends worker processes
        batch0 = next(iterator)
        first = first or batch0
        rows[name] = {"loader": name, "num_workers": workers, "read_threads": threads,
                      "first_batch_s": time.perf_counter() - start,
                      "same_batches": all(np.array_equal(batch0[k], first[k]) for k in first)}
        times[name] = []
        # Batches a setting can hold ready: its buffer, or each worker's buffer and queue.
        stored = max(workers, 1) * (threads + 2)

        def run(iterator=iterator, stored=stored, seconds=times[name]):
          for _ in range(stored):
            next(iterator)
          start = time.perf_counter()
          for _ in range(count):
            next(iterator)
          seconds.append(time.perf_counter() - start)

        runs[name] = run
    logging.info("io bench: %d interleaved rounds of %d batches", args["repeats"], count)
    time_interleaved(runs, args["repeats"])
  for name, seconds in times.items():
    rows[name].update(batches_per_s=count / statistics.median(seconds),
                      batches_min_per_s=count / max(seconds),
                      batches_max_per_s=count / min(seconds))
  for row in rows.values():
    row.update(batch=batch, images_per_s=batch * row["batches_per_s"],
               vs_train_step=row["batches_per_s"] * train_step_s)
    print(json.dumps(row), flush=True)
  return list(rows.values())


def run_io_suite(args: dict) -> tuple[list[dict], list[dict]]:
  """(checkpointing step rows, input pipeline rows); the latter empty without grain or with
  no --loader_workers. Checkpoints go to --checkpoint_dir (default: a temporary folder, like
  the dataset)."""
  with tempfile.TemporaryDirectory(prefix="sgjax-bench-io-") as tmp:
    checkpoints = run_checkpoint_suite(args, args["checkpoint_dir"] or paths.join(tmp, "ckpt"))
    if importlib.util.find_spec("grain") is None:
      logging.warning("io bench: grain is not installed; the input pipeline is not measured.")
      return checkpoints, []
    if not args["loader_workers"]:
      return checkpoints, []
    return checkpoints, run_loader_suite(args, tmp, checkpoints[0]["step_s"])


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags of this entry point (defined only when it runs, so modules import cleanly)."""
  flags.DEFINE_enum("suite", "all", ["train", "sample", "all", "io"], "What to measure: train"
                    " steps, sampling, all (both), or io: the step time of a checkpointing step"
                    " (none, sync, async) and the input pipeline (needs grain) against the train"
                    " step. io writes to disk and is not part of all.")
  flags.DEFINE_string("model", "DiT-S/2", "DiT-/SiT-/TR-DiT- S|B|L|XL|2.5B / patch (TR-DiT:"
                      " the text-to-image model).")
  flags.DEFINE_integer("text_length", 256, "TR-DiT: text tokens per caption.")
  flags.DEFINE_integer("text_width", 2560, "TR-DiT: the text encoder's hidden width.")
  flags.DEFINE_integer("input_size", 32, "Latent (or pixel) height = width.")
  flags.DEFINE_integer("in_channels", 4, "Input channels.")
  flags.DEFINE_integer("num_classes", 1000, "Number of classes.")
  flags.DEFINE_string("dtype", "float32", "Compute dtype (bfloat16 on accelerators).")
  flags.DEFINE_enum("attention", "xla", list(dit.ATTENTION_KERNELS), "Attention kernel"
                    " (cudnn: cuDNN flash attention, NVIDIA GPUs with bfloat16).")
  flags.DEFINE_float("gamma", 0.5, "Training sparsity rate of routed / masked models.")
  flags.DEFINE_list("route", None, "start,end of the route (0-based, inclusive); default:"
                    " TREAD's (2->24 of 28 blocks, 2->8 of 12).")
  flags.DEFINE_list("modes", ["dense", "routing", "masking"], "Sparsity modes to train. Their"
                    " train states are all held at once (interleaved timing): SiT-XL/2 takes"
                    " about 11 GiB each.")
  flags.DEFINE_integer("batch", 32, "Training batch size.")
  flags.DEFINE_list("settings", list(SAMPLE_SETTINGS), "Guidance settings to sample with.")
  flags.DEFINE_list("forward_gammas", ["0.5", "0.8", "0.9"], "Sparsity rates at which the"
                    " sample suite times one pass per sampling step (beside dense).")
  flags.DEFINE_integer("sample_batch", 64, "Sampling batch size.")
  flags.DEFINE_integer("sample_steps", 40, "Euler steps per sampling run.")
  flags.DEFINE_integer("repeats", 5, "Timed repeats (the median is reported).")
  flags.DEFINE_integer("steps_per_repeat", 3, "Train steps per timed repeat.")
  flags.DEFINE_integer("matmul_size", 4096, "Matrix size of the peak-FLOP/s probe.")
  flags.DEFINE_string("checkpoint_dir", None, "io: folder (local or gs://) for the"
                      " checkpoints; default: a temporary folder, removed after.")
  flags.DEFINE_list("loader_workers", ["0", "2"], "io: worker process counts of the input"
                    " pipeline to time (empty: skip it).")
  flags.DEFINE_list("loader_threads", ["0", "4"], "io: read thread counts per process to time"
                    " (each combination with --loader_workers is a setting).")
  flags.DEFINE_integer("loader_records", 4096, "io: latent posteriors in the dataset.")
  flags.DEFINE_integer("loader_batches", 50, "io: batches per timed round of each setting.")
  flags.DEFINE_string("out", "results", "Folder for bench-<date>.json / .md.")
  flags.DEFINE_string("profile_dir", None, "Write a jax.profiler trace of the measured runs"
                      " here (open with TensorBoard's profile plugin or Perfetto).")


def main(argv):
  del argv
  device = jax.devices()[0]
  dtype = jnp.dtype(FLAGS.dtype)
  peak = measured_matmul_peak(dtype, FLAGS.matmul_size, FLAGS.repeats)
  nominal = nominal_peak(device)
  meta = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device_kind": device.device_kind, "platform": device.platform,
      "device_count": jax.device_count(), "jax_version": jax.__version__,
      "flags": {name: FLAGS[name].value for name in (
          "suite", "model", "input_size", "in_channels", "dtype", "attention", "gamma", "route",
          "modes", "batch", "settings", "forward_gammas", "sample_batch", "sample_steps", "repeats",
          "steps_per_repeat", "loader_workers", "loader_threads", "loader_records",
          "loader_batches")},
      "measured_matmul_peak_tflops": peak / 1e12,
      "nominal_peak_tflops": nominal / 1e12 if nominal else None,
  }
  args = dict(FLAGS.flag_values_dict())
  results, table = {}, (f"{FLAGS.model}, {FLAGS.dtype}, {FLAGS.attention} attention,"
                        f" {device.device_kind}, jax {jax.__version__}, {meta['date']};"
                        f" measured {FLAGS.dtype} matmul peak {peak / 1e12:.2f} TFLOP/s\n\n")
  profiling = contextlib.nullcontext()
  if FLAGS.profile_dir:
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # XLA host and device activity; Python tracing slows runs
    profiling = jax.profiler.trace(FLAGS.profile_dir, profiler_options=options)
  with profiling:
    table += run_suites(args, peak, nominal, results)
  memory, memory_kind = peak_memory_bytes()
  meta.update(peak_memory_gib=memory / 2**30, peak_memory_kind=memory_kind)
  table += f"\nPeak memory of the whole run ({memory_kind}): {memory / 2**30:.2f} GiB\n"
  base = write_results(FLAGS.out, meta, results, table)
  print(table)
  print(f"wrote {base}.json and {base}.md"
        + (f"; profile in {FLAGS.profile_dir}" if FLAGS.profile_dir else ""))


def run_suites(args: dict, peak: float, nominal: float | None, results: dict) -> str:
  """Runs the suites `args["suite"]` names into `results`; returns their Markdown tables."""
  table = ""
  if args["suite"] in ("train", "all"):
    results["train"] = run_train_suite(args, peak, nominal)
    table += f"### Training (batch {args['batch']})\n\n" + markdown(results["train"],
                                                                   TRAIN_COLUMNS) + "\n"
  if args["suite"] in ("sample", "all"):
    results["sample"] = run_sample_suite(args)
    results["forward"] = run_forward_profile(args)
    table += (f"### Sampling (batch {args['sample_batch']}, {args['sample_steps']} Euler"
              " steps, routed model)\n\n" + markdown(results["sample"], SAMPLE_COLUMNS)
              + f"\n### One pass per sampling step at each sparsity rate (batch"
              f" {args['sample_batch']}, unguided sampler)\n\n"
              + markdown(results["forward"], FORWARD_COLUMNS))
  if args["suite"] == "io":
    results["checkpoint"], results["loader"] = run_io_suite(args)
    size = args["input_size"]
    table += (f"### Checkpointing step (dense model, batch {args['batch']}; train state"
              f" {results['checkpoint'][0]['state_gib']:.2f} GiB: parameters, EMA, Adam)\n\n"
              + markdown(results["checkpoint"], CHECKPOINT_COLUMNS))
    if results["loader"]:
      table += (f"\n### Input pipeline alone vs the train step (batch {args['batch']},"
                f" {args['loader_records']} ArrayRecord VAE posteriors {size}x{size}x"
                f"{args['in_channels']})\n\n" + markdown(results["loader"], LOADER_COLUMNS))
  return table


if __name__ == "__main__":
  define_flags()
  cli.run(main)
