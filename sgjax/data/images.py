"""Labelled image collections to encode (`sgjax.latents`) and ADM's preprocessing.

- `folder:DIR`: one sub-folder per class (ImageNet's synset folders), classes sorted by name,
  label = position; images sorted by path within each class.
- `tfds:NAME[:SPLIT]`: a prepared tensorflow-datasets image dataset (read with
  `tfds.data_source`, no TensorFlow), labels and class names from the dataset.
"""

from __future__ import annotations

import os

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def adm_center_crop(image, size: int) -> np.ndarray:
  """ADM's preprocessing (guided-diffusion's `center_crop_arr`): halve with a box filter while
  the short side is at least 2 * size, resize bicubically to a short side of `size`, then crop
  the centre. PIL image -> uint8 [size, size, 3]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = image.convert("RGB")
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size),
                       resample=Image.Resampling.BICUBIC)
  array = np.asarray(image)
  top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
  return array[top:top + size, left:left + size]


class FolderImages:
  """Images in class sub-folders; `load(i)` decodes image i (raises on a corrupt file)."""

  def __init__(self, directory: str):
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"--source=folder:{directory}: no such folder.")
    self.class_names = sorted(d.name for d in os.scandir(directory) if d.is_dir())
    self.paths, self.labels = [], []
    for label, name in enumerate(self.class_names):
      files = sorted(e.path for e in os.scandir(os.path.join(directory, name))
                     if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
      self.paths += files
      self.labels += [label] * len(files)
    if not self.paths:
      raise ValueError(f"--source=folder:{directory} holds no images: expected one sub-folder"
                       f" per class with {', '.join(IMAGE_EXTENSIONS)} files.")

  def __len__(self) -> int:
    return len(self.paths)

  def name(self, i: int) -> str:
    return self.paths[i]

  def load(self, i: int):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(self.paths[i]) as image:
      image.load()  # decode now, so a truncated file fails here
      return image.copy()


class TfdsImages:
  """A prepared tfds image-classification dataset."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises assorted types for "not prepared"
      raise FileNotFoundError(f"--source=tfds:{name}:{split} is not prepared under"
                              f" data_dir={data_dir!r} ({type(e).__name__}: {e}).") from None
    self._spec = f"tfds:{name}:{split}"
    label = self._source.dataset_info.features["label"]
    self.class_names = list(getattr(label, "names", []) or range(label.num_classes))
    if not len(self._source):
      raise ValueError(f"--source={self._spec} holds no images.")

  def __len__(self) -> int:
    return len(self._source)

  def name(self, i: int) -> str:
    return f"{self._spec}[{i}]"

  @property
  def labels(self):
    return _LazyLabels(self._source)

  def load(self, i: int):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    image = np.asarray(self._source[i]["image"])
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


class _LazyLabels:

  def __init__(self, source):
    self._source = source

  def __getitem__(self, i: int) -> int:
    return int(self._source[i]["label"])


def open_images(spec: str, data_dir: str | None = None):
  """`folder:DIR` or `tfds:NAME[:SPLIT]` -> FolderImages / TfdsImages."""
  kind, _, rest = spec.partition(":")
  if kind == "folder" and rest:
    return FolderImages(rest)
  if kind == "tfds" and rest:
    name, _, split = rest.partition(":")
    return TfdsImages(name, split or "train", data_dir)
  raise ValueError(f"--source={spec!r}: expected folder:DIR or tfds:NAME[:SPLIT].")
