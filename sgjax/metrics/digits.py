"""Metrics for the embedded digits dataset: a small classifier's accuracy and feature space.

Inception features mean nothing on 8x8 grey digits, so sample quality is judged by a
classifier trained here on the fixed training split (an MLP, deterministic from its seed,
cached under $SGJAX_CACHE or ~/.cache/sgjax keyed by a hash of its settings):
- class accuracy: fraction of conditional samples classified as the requested label;
- digits-FID: Frechet distance of its penultimate features, samples vs the held-out digits;
- diversity: mean pairwise feature distance of the samples relative to the held-out set's
  (below 1: samples are less varied than real digits, e.g. guidance collapsing modes);
- precision / recall with k = 3 in the same feature space (ADM's definition).
The feature-FID has a floor (real training digits vs held-out digits, a few units), so it
cannot rank settings alone: report the other numbers beside it.

Images are uint8 [N, 8, 8, 1], pixel = round(v / 16 * 255) of scikit-learn's 0..16 values
(ink bright, background 0).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from sgjax.data import sources
from sgjax.data.sources import digits_split
from sgjax.metrics import adm, cache_dir, features

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """Everything the classifier's weights depend on; its hash names the cache file."""

  hidden: tuple[int, ...] = (256, 128)  # the last width is the feature dimension
  learning_rate: float = 2e-3
  weight_decay: float = 1e-4
  batch_size: int = 100
  epochs: int = 60
  seed: int = 0
  version: int = 1  # bump when the training recipe changes

  def cache_key(self) -> str:
    settings = dict(dataclasses.asdict(self), split_seed=sources.DIGITS_SPLIT_SEED,
                    heldout=sources.DIGITS_HELDOUT)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class Classifier(nnx.Module):
  """Pixel MLP: 64 -> hidden... (ReLU) -> 10. The last hidden layer gives the features."""

  def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
    widths = (int(np.prod(IMAGE_SHAPE)),) + tuple(cfg.hidden)
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths, widths[1:])])
    self.head = nnx.Linear(widths[-1], NUM_CLASSES, rngs=rngs)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """images: uint8 [B, 8, 8, 1] -> {features: [B, hidden[-1]], logits: [B, 10]}."""
    x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    return {"features": x, "logits": self.head(x)}


def train_classifier(cfg: ClassifierConfig = ClassifierConfig()) -> Classifier:
  """Trains on the training split (AdamW, cross-entropy); a few seconds on 2 CPU cores."""
  images, labels = digits_split("train")
  model = Classifier(cfg, rngs=nnx.Rngs(cfg.seed))
  graphdef, params = nnx.split(model)
  tx = optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)
  steps_per_epoch = len(labels) // cfg.batch_size
  rng = np.random.default_rng(cfg.seed)
  order = np.stack([rng.permutation(len(labels))[:steps_per_epoch * cfg.batch_size]
                    for _ in range(cfg.epochs)]).reshape(-1, cfg.batch_size)  # [steps, b]

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train(params, order):
    def step(carry, idx):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params, jnp.asarray(images)[idx], jnp.asarray(labels)[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), order)
    return params

  return nnx.merge(graphdef, train(params, order))


def _cache_path(cfg: ClassifierConfig, cache: str | None) -> str:
  return os.path.join(cache or cache_dir(), f"digits_classifier_{cfg.cache_key()}.npz")


def _flat_params(model: Classifier) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
  return {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def load_classifier(cfg: ClassifierConfig = ClassifierConfig(),
                    cache: str | None = None) -> Classifier:
  """The trained classifier: from the cache when present, else trained and cached."""
  path = _cache_path(cfg, cache)
  model = Classifier(cfg, rngs=nnx.Rngs(cfg.seed))
  if os.path.isfile(path):
    with np.load(path) as data:
      stored = {k: data[k] for k in data.files}
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    try:
      values = [stored[jax.tree_util.keystr(p)] for p, _ in leaves]
    except KeyError:
      values = None  # written by other code: retrain and overwrite
    if values is not None:
      return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))
  logging.info("training the digits classifier (%s)", cfg)
  model = train_classifier(cfg)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Write-then-rename: concurrent evaluations never read a half-written file.
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
  with os.fdopen(fd, "wb") as f:
    np.savez(f, **_flat_params(model))
  os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from other users
  os.replace(tmp, path)
  return model


def classify(model: Classifier, images: np.ndarray, batch_size: int = 512,
             mesh: Mesh | None = None) -> dict[str, np.ndarray]:
  """uint8 [N, 8, 8, 1] -> {features: [N, F], logits: [N, 10]}, batched over the mesh."""
  images = check_images(images)
  apply, params = features.nnx_apply(model)
  return features.extract(apply, params, images, batch_size, mesh, name="digits classifier")


def check_images(images: np.ndarray) -> np.ndarray:
  """Accepts [N, 8, 8] or [N, 8, 8, 1] in 0..255; anything else is an error, not a guess."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f"digits metrics need images [N, 8, 8, 1] (uint8, 0..255), got"
                     f" {images.shape}.")
  return images


def heldout_accuracy(model: Classifier, batch_size: int = 512, mesh: Mesh | None = None
                     ) -> float:
  """The classifier's accuracy on the 297 held-out digits."""
  images, labels = digits_split("heldout")
  logits = classify(model, images, batch_size, mesh)["logits"]
  return float(np.mean(np.argmax(logits, -1) == labels))


def mean_pairwise_distance(feats: np.ndarray) -> float:
  """Mean Euclidean distance over all pairs i != j of the rows of feats [N, F]."""
  feats = np.asarray(feats, np.float64)
  sq = np.sum(feats**2, axis=1)
  d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * feats @ feats.T, 0.0))
  n = len(feats)
  return float(d.sum() / (n * (n - 1)))


def metrics(images: np.ndarray, labels: np.ndarray | None = None,
            reference: np.ndarray | None = None, *,
            cfg: ClassifierConfig = ClassifierConfig(), cache: str | None = None,
            batch_size: int = 512, mesh: Mesh | None = None) -> dict[str, float]:
  """Digits metrics of samples (uint8 [N, 8, 8, 1]) against `reference` images.

  reference defaults to the 297 held-out real digits. `labels` (the requested classes)
  enable class_accuracy.
  """
  model = load_classifier(cfg, cache)
  if reference is None:
    reference = digits_split("heldout")[0]
  ref = classify(model, reference, batch_size, mesh)
  out = classify(model, images, batch_size, mesh)
  precision, recall = adm.precision_recall(ref["features"], out["features"])
  result = {
      "fid": adm.fid_from_features(out["features"], ref["features"]),
      "diversity": mean_pairwise_distance(out["features"])
                   / mean_pairwise_distance(ref["features"]),
      "precision": precision,
      "recall": recall,
      "classifier_heldout_accuracy": heldout_accuracy(model, batch_size, mesh),
      "num_samples": len(out["logits"]),
      "num_reference": len(ref["logits"]),
  }
  if labels is not None:
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(out["logits"]):
      raise ValueError(f"{len(labels)} labels for {len(out['logits'])} images.")
    result["class_accuracy"] = float(np.mean(np.argmax(out["logits"], -1) == labels))
  return result
