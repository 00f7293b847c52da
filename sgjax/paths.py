"""Files of runs, outputs and data, local or in an object store (gs://, s3://: any URL that
etils.epath and orbax accept).

Local paths are made absolute. Writes are whole-file and never leave a half-written file
behind: a local file is written beside its destination and renamed over it; an object store
makes a single object write visible only when it is complete, so the object is written in
place (a rename there is a copy). GCS needs `gcsfs` (pinned in requirements.txt) and the
usual credentials (`gcloud auth application-default login`, or a VM's service account).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from typing import IO, Any, Iterator

import numpy as np
from etils import epath

PathLike = str | os.PathLike
_PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def is_remote(path: PathLike) -> bool:
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """`path` as an epath.Path: URLs as they are, local paths absolute."""
  if is_remote(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def join(path: PathLike, *parts: str) -> str:
  """`path`/parts as a string (URL or absolute local path), for flags, configs and logs."""
  return os.fspath(resolve(path).joinpath(*parts))


def glob(pattern: PathLike) -> list[str]:
  """The files matching `pattern`, sorted; wildcards (* ? [) in its last component only,
  as in '/data/latents/train-*.array_record' or 'gs://bucket/latents/train-*'."""
  path = resolve(pattern)
  if any(c in os.fspath(path.parent) for c in "*?["):
    raise ValueError(f"{os.fspath(pattern)!r}: only the last component of a path may hold"
                     " wildcards (*, ?, [...]).")
  if not path.parent.is_dir():
    return []
  return sorted(os.fspath(p) for p in path.parent.glob(path.name))


@contextlib.contextmanager
def open_write(path: PathLike, mode: str = "w") -> Iterator[IO[Any]]:
  """A file to write `path` through ("w" or "wb"); the destination changes only if the block
  completes. Creates missing parent folders."""
  path = resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(path):
    with path.open(mode) as f:
      yield f
    return
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
  try:
    with tmp.open(mode) as f:
      yield f
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_text(path: PathLike, text: str) -> None:
  with open_write(path, "w") as f:
    f.write(text)


def write_bytes(path: PathLike, data: bytes) -> None:
  with open_write(path, "wb") as f:
    f.write(data)


def write_json(path: PathLike, obj: Any, **dump_kwargs) -> None:
  write_text(path, json.dumps(obj, indent=2, **dump_kwargs) + "\n")


def read_text(path: PathLike) -> str:
  return resolve(path).read_text()


def read_json(path: PathLike) -> Any:
  return json.loads(read_text(path))


def save_npz(path: PathLike, *args: np.ndarray, **arrays: np.ndarray) -> None:
  """np.savez to `path` (arr_0, arr_1... for positional arrays, as np.savez names them)."""
  with open_write(path, "wb") as f:
    np.savez(f, *args, **arrays)


def load_npz(path: PathLike) -> dict[str, np.ndarray]:
  """Every array of an .npz file, read into memory."""
  with resolve(path).open("rb") as f:
    with np.load(f) as data:
      return {name: data[name] for name in data.files}


def save_figure(fig, path: PathLike, **savefig_kwargs) -> None:
  """A matplotlib figure as the image format `path`'s suffix names."""
  buf = io.BytesIO()
  fig.savefig(buf, format=resolve(path).suffix.lstrip(".") or "png", **savefig_kwargs)
  write_bytes(path, buf.getvalue())


def save_image(image, path: PathLike) -> None:
  """A PIL image as the format `path`'s suffix names."""
  buf = io.BytesIO()
  image.save(buf, format=_PIL_FORMATS.get(resolve(path).suffix.lower(), "PNG"))
  write_bytes(path, buf.getvalue())
