"""Batched, data-parallel feature extraction, and ADM-format .npz image files read in batches.

A metric network runs as one jitted function over fixed-size batches sharded over the
mesh's data axes; the last batch is padded to the same size so nothing recompiles, and the
padding is cut from the outputs. Image files are streamed batch by batch: an ADM sample file
of 50k 256x256 images is 10 GB, too much to load at once on small hosts.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
import zipfile
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from sgjax import paths, sharding


class NpzArray:
  """One array of an .npz file, read in slices along its first axis without loading it all.

  np.savez stores each array as an .npy member; compressed members are inflated as read.
  """

  def __init__(self, path: str, name: str = "arr_0"):
    self.path, self.name = path, name
    with self._open() as f:
      header = _read_npy_header(f)
    if header is None:  # an .npy version without a public header reader: load it whole
      arr = paths.load_npz(path)[name]
      header = (arr.shape, arr.dtype, True)
    self.shape, self.dtype, self._load_whole = header

  @contextlib.contextmanager
  def _open(self):
    with paths.resolve(self.path).open("rb") as raw, zipfile.ZipFile(raw) as zf:
      member = f"{self.name}.npy"
      if member not in zf.namelist():
        raise KeyError(f"{self.path}: no array {self.name!r} (has"
                       f" {[n[:-4] for n in zf.namelist()]}).")
      with zf.open(member) as f:
        yield f

  def __len__(self) -> int:
    return self.shape[0]

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    if self._load_whole or self.dtype.hasobject:  # rare layouts: fall back to a full load
      arr = paths.load_npz(self.path)[self.name]
      yield from (arr[i:i + batch_size] for i in range(0, len(arr), batch_size))
      return
    row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
    with self._open() as f:
      _read_npy_header(f)  # skip to the data
      for start in range(0, len(self), batch_size):
        n = min(batch_size, len(self) - start)
        data = f.read(n * row)
        if len(data) != n * row:
          raise ValueError(f"{self.path}:{self.name} is truncated at row {start}.")
        yield np.frombuffer(data, self.dtype).reshape((n,) + self.shape[1:])

  def read(self) -> np.ndarray:
    if not len(self):
      return np.zeros(self.shape, self.dtype)
    return np.concatenate(list(self.batches(len(self))), axis=0)


def _read_npy_header(f) -> tuple[tuple[int, ...], np.dtype, bool] | None:
  """(shape, dtype, fortran order) of an .npy stream, leaving it at the data; None if the
  format version has no public reader."""
  version = np.lib.format.read_magic(f)
  readers = {(1, 0): np.lib.format.read_array_header_1_0,
             (2, 0): np.lib.format.read_array_header_2_0}
  if version not in readers:
    return None
  shape, fortran, dtype = readers[version](f)
  return tuple(shape), np.dtype(dtype), fortran


ImageSource = np.ndarray | NpzArray


def _batches(images: ImageSource, batch_size: int) -> Iterator[np.ndarray]:
  if isinstance(images, NpzArray):
    return images.batches(batch_size)
  return (images[i:i + batch_size] for i in range(0, len(images), batch_size))


def nnx_apply(model: nnx.Module) -> tuple[Callable[[Any, jax.Array], Any], Any]:
  """(apply(params, batch), params) for a model whose __call__ maps a batch to features.

  Parameters travel as an argument, never as constants baked into the compiled program.
  Models of one structure share one `apply`, so reloading a network does not recompile it.
  """
  graphdef, state = nnx.split(model)
  return _apply_for(graphdef), state


@functools.lru_cache(maxsize=16)
def _apply_for(graphdef) -> Callable[[Any, jax.Array], Any]:
  return lambda state, x: nnx.merge(graphdef, state)(x)


def extract(apply: Callable[[Any, jax.Array], dict[str, jax.Array]], params: Any,
            images: ImageSource, batch_size: int = 256, mesh: Mesh | None = None,
            name: str = "features") -> dict[str, np.ndarray]:
  """Runs `apply(params, batch)` over all images -> {key: [N, ...] numpy array}.

  Batches are sharded over the mesh's data axes (default: all devices data-parallel);
  `batch_size` is rounded up to a multiple of the data-parallel size.
  """
  mesh = mesh or sharding.make_mesh("data")
  dp = sharding.data_parallel_size(mesh)
  batch_size = -(-batch_size // dp) * dp
  params = jax.device_put(params, sharding.replicated(mesh))
  fn = jax.jit(apply, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)))
  total = len(images)
  outputs: list[dict[str, np.ndarray]] = []
  done, start, last_report = 0, time.time(), -1
  pending = None  # the previous batch's outputs, fetched once the next batch is dispatched

  def fetch(out, n):
    outputs.append({k: np.asarray(v)[:n] for k, v in out.items()})

  for batch in _batches(images, batch_size):
    n = len(batch)
    if n < batch_size:  # pad: one static shape, one compile
      pad = np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)
      batch = np.concatenate([batch, pad], axis=0)
    out = fn(params, jax.device_put(batch, sharding.batch_sharding(mesh)))
    if pending is not None:
      fetch(*pending)
    pending = (out, n)
    done += n
    percent = 100 * done // max(total, 1)
    if percent // 10 != last_report // 10 or done == total:
      last_report = percent
      _progress(f"{name}: {done}/{total} images ({done / (time.time() - start):.1f}/s)",
                final=done == total)
  if pending is None:
    raise ValueError(f"{name}: no images to extract features from.")
  fetch(*pending)
  return {k: np.concatenate([o[k] for o in outputs], axis=0) for k in outputs[0]}


def _progress(message: str, final: bool) -> None:
  """A one-line progress bar on stderr when attached to a terminal, else a log line."""
  if sys.stderr.isatty():
    sys.stderr.write("\r" + message + ("\n" if final else ""))
    sys.stderr.flush()
  else:
    logging.info(message)

