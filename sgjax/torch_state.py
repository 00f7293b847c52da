"""Reads PyTorch `torch.save` files (state dicts) into numpy arrays, without torch.

The FID Inception weights and the SiT / TREAD / DiT checkpoints are published only as
PyTorch files, and torch is a 2 GB dependency we do not otherwise need. A state dict is a
pickle whose tensors point at raw storages through pickle's persistent ids; rebuilding them
needs nothing but numpy.

Two layouts exist:
- zip (torch >= 1.6): `<root>/data.pkl` plus one entry `<root>/data/<key>` of raw bytes per
  storage, and `<root>/byteorder` ("little" when absent);
- legacy (older torch): back-to-back pickles (magic number, protocol version, system info,
  the object, the list of storage keys) followed by each storage as an int64 element count
  and its little-endian bytes.

The unpickler only admits the few globals a state dict or a training checkpoint uses
(tensor rebuilders, storage types, OrderedDict, and argparse.Namespace, which SiT's and
DiT's train.py save as "args") and refuses anything else, so a hostile file cannot run code.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import dataclasses
import io
import pickle
import zipfile
from typing import Any, BinaryIO

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# torch storage class name -> numpy dtype of its elements.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}
try:  # bfloat16 comes with jax's ml_dtypes; optional here.
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  _STORAGE_DTYPES["BFloat16Storage"] = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
  pass


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  """A storage named by the pickle; its bytes are looked up once the pickle is read."""

  key: str  # the root storage's key
  dtype: np.dtype
  numel: int
  view: tuple[int, int] | None = None  # legacy views: (offset, size) in elements of the root


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  storage: _StorageRef
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _TensorRef:
  return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
  return data


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # Built with __new__ and its __dict__ restored: no code of the file runs.
    ("argparse", "Namespace"): argparse.Namespace,
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, file: BinaryIO, source: str):
    super().__init__(file)
    self.source = source
    self.storages: dict[str, _StorageRef] = {}  # root key -> the first reference to it

  def find_class(self, module: str, name: str) -> Any:
    # Protocol-2 pickles may carry Python 2 names (pickle's fix_imports, done by hand here).
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    raise pickle.UnpicklingError(
        f"{self.source}: refusing to load {module}.{name}; only tensors, storages and dicts"
        " of a plain state dict are supported (a whole pickled model: save its"
        " `model.state_dict()` with torch.save and use that file).")

  def persistent_load(self, pid: Any) -> _StorageRef:
    # zip: ('storage', type, key, location, numel);
    # legacy: ('storage', type, key, location, numel, view_metadata).
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise pickle.UnpicklingError(f"{self.source}: unknown persistent id {pid!r}.")
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"{self.source}: unknown storage type {storage_type!r}.")
    view = pid[5] if len(pid) > 5 else None  # (view key, offset, size)
    ref = _StorageRef(str(key), storage_type.dtype, int(numel),
                      None if view is None else (int(view[1]), int(view[2])))
    self.storages.setdefault(ref.key, ref)
    return ref


def _materialise(obj: Any, storages: dict[str, np.ndarray], name: str = "") -> Any:
  """Replaces every _TensorRef inside dicts / lists / tuples by a numpy array."""
  if isinstance(obj, _TensorRef):
    return _tensor_array(obj, storages, name)
  if isinstance(obj, dict):
    return type(obj)((k, _materialise(v, storages, f"{name}.{k}" if name else str(k)))
                     for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v, storages, f"{name}[{i}]") for i, v in enumerate(obj))
  return obj


def _tensor_array(t: _TensorRef, storages: dict[str, np.ndarray], name: str) -> np.ndarray:
  ref = t.storage
  flat = storages[ref.key]
  if ref.view is not None:  # legacy storage view: a slice of its root storage
    flat = flat[ref.view[0]:ref.view[0] + ref.view[1]]
  if len(t.size) != len(t.stride):
    raise ValueError(f"tensor {name!r}: size {t.size} and stride {t.stride} differ in rank.")
  if any(s == 0 for s in t.size):
    return np.zeros(t.size, ref.dtype)
  last = t.offset + sum((s - 1) * st for s, st in zip(t.size, t.stride))
  if t.offset < 0 or last >= flat.size:
    raise ValueError(f"tensor {name!r}: offset {t.offset}, size {t.size} and stride {t.stride}"
                     f" reach element {last}, past its storage of {flat.size} elements.")
  strided = np.lib.stride_tricks.as_strided(
      flat[t.offset:], shape=t.size, strides=[st * flat.itemsize for st in t.stride])
  if strided.flags.c_contiguous and flat.dtype.isnative:
    return strided  # a read-only view of the file's bytes: a large checkpoint is not copied
  return np.array(strided, dtype=ref.dtype.newbyteorder("="))  # contiguous, native order


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pickles = [n for n in names if n.endswith("data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path}: a torch zip file holds exactly one data.pkl, found {pickles}.")
    root = pickles[0][:-len("data.pkl")]
    order = "<"
    if root + "byteorder" in names:
      order = "<" if zf.read(root + "byteorder").decode().strip() == "little" else ">"
    unpickler = _Unpickler(io.BytesIO(zf.read(pickles[0])), path)
    obj = unpickler.load()
    storages = {}
    for key, ref in unpickler.storages.items():
      entry = f"{root}data/{key}"
      if entry not in names:
        raise ValueError(f"{path}: storage {key!r} has no entry {entry!r}.")
      storages[key] = np.frombuffer(zf.read(entry), dtype=ref.dtype.newbyteorder(order))
  return _materialise(obj, storages)


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    magic = pickle.load(f)
    if magic != _LEGACY_MAGIC:
      raise ValueError(f"{path}: not a PyTorch file (neither a zip archive nor the legacy"
                       " format's magic number).")
    pickle.load(f)  # protocol version
    pickle.load(f)  # system info (endianness, type sizes)
    unpickler = _Unpickler(f, path)
    obj = unpickler.load()
    keys = pickle.load(f)
    storages = {}
    for key in keys:
      ref = unpickler.storages[str(key)]
      numel = int(np.frombuffer(f.read(8), "<i8")[0])
      data = f.read(numel * ref.dtype.itemsize)
      if len(data) != numel * ref.dtype.itemsize:
        raise ValueError(f"{path}: storage {key!r} is truncated.")
      storages[str(key)] = np.frombuffer(data, dtype=ref.dtype.newbyteorder("<"))
  return _materialise(obj, storages)


def load(path: str) -> Any:
  """Loads a `torch.save` file; tensors come back as numpy arrays, dicts stay dicts."""
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  return _load_legacy(path)
