"""Small models, batches and data files shared by the tests."""

import glob
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
from array_record.python import array_record_data_source, array_record_module
from flax import nnx

from configs import digits
from sgjax.data import sources
from sgjax.metrics import inception
from sgjax.models import dit, registry
from sgjax.sparsity import Route

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runlocal(**train_overrides):
  """The digits config's seconds-long `runlocal` variant, with config.train overrides."""
  config = digits.get_config("runlocal")
  config.train.update(train_overrides)
  return config


def losses(workdir) -> dict[int, float]:
  """{step: loss} of a run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def tiny_config(sparsity="routing", **overrides) -> dit.DiTConfig:
  fields = dict(input_size=8, in_channels=2, patch_size=1, width=32, depth=4, num_heads=4,
                num_classes=10, sparsity=sparsity,
                routes=(Route(1, 2, 0.5),) if sparsity == "routing" else (),
                decoder_depth=2, decoder_width=16, decoder_heads=2)
  fields.update(overrides)
  return dit.DiTConfig(**fields)


def perturbed_model(cfg, seed: int = 0):
  """A model (DiT or TR-DiT) whose zero-initialised layers (adaLN-Zero, final) are made
  non-zero, so that every block affects the output."""
  model = registry.build(cfg, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def batch(cfg: dit.DiTConfig, size: int = 8, seed: int = 0):
  kx, kt, ky = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (size, cfg.input_size, cfg.input_size, cfg.in_channels))
  t = jax.random.uniform(kt, (size,))
  y = jax.random.randint(ky, (size,), 0, cfg.num_classes)
  return x, t, y


def write_latent_shard(path: str, latents: np.ndarray, labels) -> None:
  """One ArrayRecord shard of the `latents` source: latents [N, H, W, C], labels [N]."""
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for latent, label in zip(latents, labels):
    writer.write(sources.encode_latent_record(latent, int(label)))
  writer.close()


def random_inception_weights(seed: int = 0) -> dict[str, np.ndarray]:
  """pytorch-fid-named tensors: He-scaled convs, identity BatchNorm, small logits layer."""
  rng = np.random.default_rng(seed)
  state = {}
  for name, shape in inception.state_dict_shapes().items():
    if name.endswith(("running_var", "bn.weight")):
      value = np.ones(shape)
    elif name.endswith(("running_mean", "bn.bias")):
      value = 0.01 * rng.standard_normal(shape)
    elif len(shape) == 4:
      value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    else:
      value = 0.01 * rng.standard_normal(shape)
    state[name] = value.astype(np.float32)
  state["fc.bias"] = np.zeros(inception.NUM_LOGITS, np.float32)  # in the file, unused
  return state


def image_folder(root, per_class: int = 6, corrupt: bool = True) -> str:
  """Two class folders of random PNGs of assorted sizes (and a broken file) -> folder:ROOT."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for c, name in enumerate(("n01_cat", "n02_dog")):
    os.makedirs(root / name)
    for i in range(per_class):
      size = (20 + 4 * (i % 6), 18 + 2 * c)  # other sizes and aspect ratios
      Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(
          root / name / f"{i}.png")
  if corrupt:
    (root / "n02_dog" / "broken.png").write_bytes(b"\x89PNG truncated")
  return f"folder:{root}"


def latent_records(out: str, field: str | None = None) -> list:
  """(index, flipped) of every record of the shards in `out`, or the array `field` of each."""
  items = []
  for shard in sorted(glob.glob(os.path.join(out, "train-*.array_record"))):
    source = array_record_data_source.ArrayRecordDataSource([shard])
    for i in range(len(source)):
      raw = np.load(io.BytesIO(source[i]))
      items.append((int(raw["index"]), bool(raw["flipped"])) if field is None else raw[field])
  return items


def run_command(module: str, *args: str, timeout: float = 300,
                **env: str) -> subprocess.CompletedProcess:
  """`python -m module args` from the repository root, with this process's environment (the
  fake devices and compilation cache of conftest.py, but no SGJAX_TRACEBACK) plus `env`."""
  env = {**{k: v for k, v in os.environ.items() if k != "SGJAX_TRACEBACK"}, **env}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, check=False, env=env)


def user_error_line(result: subprocess.CompletedProcess, prog: str) -> str:
  """The one `PROG: error: ...` line of a command that failed on a user error (exit status 2,
  no traceback; log lines may come before it)."""
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
  assert errors == lines[-1:], lines[-5:]
  return errors[0]
