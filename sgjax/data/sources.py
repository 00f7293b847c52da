"""Random-access data sources. Each item is {"image": float32 [H, W, C] in model units,
"label": int32}: pixels scaled to [-1, 1], latents multiplied by their scale.

- `digits`: scikit-learn's bundled handwritten digits (1797 images 8x8, 10 classes; no
  download). A fixed split holds out 297 digits for evaluation; training uses the other 1500.
- `tfds`: any image-classification dataset prepared with tensorflow-datasets, read through
  `tfds.data_source` (ArrayRecord, random access, no TensorFlow needed).
- `scenes`: captioned scenes of two coloured digits (`sgjax.data.scenes`), items
  {"image", "caption"}: the text-to-image demo.
- `synthetic`: N(0, 1) images with uniform labels, a pure function of the index: for
  smoke runs and benchmarks on machines without the data.
- `latents`: precomputed VAE latents in ArrayRecord shards. Record schema: each record is the
  bytes of an uncompressed `.npz` (`np.savez`) holding `label` (int scalar) and either the
  VAE posterior, `mean` and `std` (float32 [H, W, C], unscaled; `python -m sgjax.latents`
  writes these, with the source `index`), from which training draws a fresh latent
  `mean + std * eps` per example and step (`sgjax.data.pipeline`), or one fixed `latent`
  (float16 or float32 [H, W, C], unscaled). See `encode_latent_record`. Text-to-image records
  hold, besides the latent, the caption's hidden states `text` (float [L, D] from a frozen
  encoder, padded to L) and its `mask` (bool [L]); `label` is then optional. `python -m
  sgjax.text_embed` writes them, with the `caption` and its `index` (which training ignores).
- `records`: the `latents` schema with a fixed `latent` that holds pixels in [-1, 1] (scale
  1, nothing to decode): `python -m sgjax.text_embed` without a VAE writes these.
"""

from __future__ import annotations

import io

import numpy as np

from sgjax import paths

DIGITS_HELDOUT = 297
DIGITS_SPLIT_SEED = 0


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """('train' | 'heldout') -> uint8 images [N, 8, 8, 1] (ink bright) and int32 labels [N].

  Pixels are round(v / 16 * 255) of scikit-learn's 0..16 values. The split is a fixed
  permutation (seed 0): the last 297 digits are held out, the first 1500 train.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
  if split == "train":
    idx = perm[:-DIGITS_HELDOUT]
  elif split == "heldout":
    idx = perm[-DIGITS_HELDOUT:]
  else:
    raise ValueError(f"data.split={split!r}: the digits have splits 'train' and 'heldout'.")
  return images[idx], labels[idx]


def from_uint8(images: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, C] -> float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """float [-1, 1] -> uint8, clipped."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
      np.uint8)


class ArraySource:
  """In-memory images (model units) and labels."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


class TfdsSource:
  """A tensorflow-datasets image dataset, center-cropped and resized to `image_size`."""

  def __init__(self, name: str, split: str, data_dir: str | None, image_size: int):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:  # download=False: a missing dataset fails now instead of retrying the network
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                      download=False)
    except Exception as e:  # tfds raises assorted types for "not prepared"
      raise FileNotFoundError(
          f"tfds dataset {name!r} (split {split!r}) is not prepared under data_dir="
          f"{data_dir or '~/tensorflow_datasets'!r}. Prepare it once on a machine with network"
          f" access (`tfds build {name} --data_dir=DIR --file_format=array_record`), copy DIR"
          " here and pass --config.data.data_dir=DIR. sgjax never downloads at training time."
          f" ({type(e).__name__}: {e})") from e
    self.image_size = image_size

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    item = self._source[i]
    image = _center_crop_resize(np.asarray(item["image"]), self.image_size)
    return {"image": from_uint8(image), "label": np.int32(item["label"])}


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  from PIL import Image  # pylint: disable=g-import-not-at-top
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  crop = image[top:top + side, left:left + side]
  squeeze = crop.ndim == 3 and crop.shape[-1] == 1
  pil = Image.fromarray(crop[..., 0] if squeeze else crop)
  out = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
  return out[..., None] if squeeze else out


def encode_latent_record(latent: np.ndarray, label: int | None, **arrays) -> bytes:
  """One ArrayRecord record of the `latents` source: a fixed `latent`, or (latent=None) the
  posterior given as `mean=` and `std=` arrays, plus any other arrays (e.g. `index=`, or a
  caption's `text=` and `mask=`, with label None)."""
  buf = io.BytesIO()
  if latent is not None:
    arrays["latent"] = latent
  if label is not None:
    arrays["label"] = np.int32(label)
  np.savez(buf, **arrays)
  return buf.getvalue()


class LatentSource:
  """Precomputed latents from ArrayRecord shards matching a glob pattern."""

  def __init__(self, pattern: str, scale: float):
    shards = paths.glob(pattern)
    if not shards:
      raise FileNotFoundError(
          f"data.path={pattern!r} matches no ArrayRecord shard. Encode the dataset to latents"
          " first (records as documented in sgjax/data/sources.py) and point data.path at"
          " them, e.g. --config.data.path='/data/imagenet256_latents/train-*.array_record'.")
    import grain  # pylint: disable=g-import-not-at-top
    self._source = grain.sources.ArrayRecordDataSource(shards)
    self.scale = scale

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    record = np.load(io.BytesIO(self._source[i]))
    item = {name: record[name] for name in ("text", "mask") if name in record}
    if "label" in record:
      item["label"] = np.int32(record["label"])
    if "latent" in record:
      item["image"] = record["latent"].astype(np.float32) * self.scale
    else:  # the posterior: the pipeline draws image + std * eps
      item["image"] = record["mean"].astype(np.float32) * self.scale
      item["std"] = record["std"].astype(np.float32) * self.scale
    return item


class SyntheticSource:
  """`size` random images [image_size, image_size, channels] and labels, fixed per index."""

  def __init__(self, size: int, image_size: int, channels: int, num_classes: int):
    self.size, self.shape, self.num_classes = size, (image_size, image_size, channels), num_classes

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i):
    rng = np.random.default_rng(int(i))
    return {"image": rng.standard_normal(self.shape, np.float32),
            "label": np.int32(rng.integers(self.num_classes))}


def make_source(data_cfg, split: str = "train", model_cfg=None):
  """The source named by config.data (source, path, name, data_dir, image_size...);
  `model_cfg` gives the shapes of synthetic data."""
  kind = data_cfg.source
  if kind == "digits":
    images, labels = digits_split(split)
    return ArraySource(from_uint8(images), labels)
  if kind == "tfds":
    return TfdsSource(data_cfg.name, split, data_cfg.get("data_dir"), data_cfg.image_size)
  if kind == "latents":
    return LatentSource(data_cfg.path, data_cfg.latent_scale)
  if kind == "records":  # the latents schema holding pixels
    source = LatentSource(data_cfg.path, 1.0)
    if "std" in source[0]:
      raise ValueError(f"data.path={data_cfg.path!r} holds VAE posteriors (mean, std), not"
                       " pixels: train with data.source=latents, data.vae and the VAE's"
                       " data.latent_scale.")
    return source
  if kind == "scenes":  # captioned digit scenes (text-to-image demo)
    from sgjax.data import scenes  # pylint: disable=g-import-not-at-top
    return scenes.SceneSource(split, data_cfg.size, 0)
  if kind == "synthetic":
    return SyntheticSource(10_000, model_cfg.input_size, model_cfg.in_channels,
                           model_cfg.num_classes)
  raise ValueError(f"data.source={kind!r}: choose one of 'digits', 'tfds', 'latents',"
                   " 'records', 'scenes', 'synthetic'.")
