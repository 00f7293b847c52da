"""Evaluation of ADM-format sample files: the one call behind `python -m sgjax.evaluate`.

Samples: an .npz with `arr_0` uint8 images [N, H, W, C] and optionally `arr_1` int labels
[N] (what ADM's sampling scripts and `sgjax.sample` write). Reference: an ADM reference
batch, holding raw images `arr_0` and/or precomputed Inception statistics `mu`, `sigma`
(pool_3) and `mu_s`, `sigma_s` (spatial) - ADM's published reference batches hold both; with
statistics alone, precision and recall are skipped.
"""

from __future__ import annotations

import os
import time
import zipfile

import numpy as np
from absl import logging

from sgjax import paths
from sgjax.metrics import adm, digits, features, inception, scenes

METRICS = ("adm", "digits", "scenes")
# What each input file must be, for the errors that name it.
_EXPECTED = {
    "samples": "an .npz (as np.savez writes) of uint8 images arr_0 [N, H, W, C] and optional"
               " labels arr_1, as sgjax.sample writes",
    "reference": "an .npz (as np.savez writes) reference batch: images arr_0 and/or the"
                 " statistics mu, sigma, mu_s, sigma_s",
}


def _members(path: str, what: str = "samples") -> set[str]:
  """The array names of the .npz `path`, the `what` file (a key of _EXPECTED)."""
  if not paths.resolve(path).is_file():
    raise FileNotFoundError(f"--{what}={path!r}: no such file.")
  try:
    with paths.resolve(path).open("rb") as f, zipfile.ZipFile(f) as zf:
      return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
  except zipfile.BadZipFile:
    raise ValueError(f"--{what}={path!r} is not an .npz file: expected {_EXPECTED[what]}."
                     ) from None


def _read_small(path: str, name: str) -> np.ndarray:
  with paths.resolve(path).open("rb") as f, np.load(f) as data:
    return data[name]


def adm_metrics(samples_path: str, reference_path: str, inception_weights: str | None = None,
                batch_size: int = 256) -> dict:
  """FID, sFID, IS, precision, recall of a sample file against an ADM reference batch."""
  model = inception.load(inception_weights)
  apply, params = features.nnx_apply(model)
  samples = features.extract(apply, params, features.NpzArray(samples_path), batch_size,
                             name="inception (samples)")
  members = _members(reference_path, "reference")
  reference = None
  if "arr_0" in members:
    reference = features.extract(apply, params, features.NpzArray(reference_path), batch_size,
                                 name="inception (reference)")
  stats = None
  if {"mu", "sigma", "mu_s", "sigma_s"} <= members:  # as ADM: stored statistics win
    stats = {"pool": adm.Statistics(_read_small(reference_path, "mu"),
                                    _read_small(reference_path, "sigma")),
             "spatial": adm.Statistics(_read_small(reference_path, "mu_s"),
                                       _read_small(reference_path, "sigma_s"))}
  elif reference is None:
    raise ValueError(f"{reference_path}: a reference batch needs images `arr_0` or the"
                     f" statistics mu, sigma, mu_s, sigma_s; it has {sorted(members)}.")
  out = adm.metrics(samples, reference, stats)
  out["num_samples"] = len(samples["pool"])
  if reference is not None:
    out["num_reference"] = len(reference["pool"])
  return out


def digits_metrics(samples_path: str, reference_path: str | None = None,
                   batch_size: int = 256) -> dict:
  """Digits metrics of a sample file; the reference defaults to the held-out digits."""
  members = _members(samples_path)
  images = features.NpzArray(samples_path).read()
  labels = _read_small(samples_path, "arr_1") if "arr_1" in members else None
  reference = None if reference_path is None else features.NpzArray(reference_path).read()
  return digits.metrics(images, labels, reference, batch_size=batch_size)


def scenes_metrics(samples_path: str) -> dict:
  """The compositional scene metrics (`sgjax.metrics.scenes`) of a text-to-image sample file
  whose `arr_1` holds each image's caption, with within-prompt diversity relative to real
  scenes of the same captions (1 = as varied as real scenes)."""
  if "arr_1" not in _members(samples_path):
    raise ValueError(f"{samples_path}: metric 'scenes' needs each image's caption in arr_1"
                     " (what `sgjax.sample --prompt/--prompts_file` writes).")
  images = features.NpzArray(samples_path).read()
  captions = [str(c) for c in _read_small(samples_path, "arr_1")]
  model = digits.load_classifier()
  result = scenes.evaluate(images, captions, model)
  chance = result.pop("chance")
  result.update({f"chance_{name}": value for name, value in chance.items()})
  if len(set(captions)) < len(captions):
    result["diversity"] = (scenes.within_prompt_diversity(images, captions, model)
                           / scenes.real_within_prompt_diversity(captions, model=model))
  return result


def check_inputs(metric: str, reference: str | None, inception_weights: str | None) -> None:
  """Raises, naming the flag, unless `metric` can run with these files (checked before any
  sampling, so that a sweep does not fail after its first setting)."""
  if metric not in METRICS:
    raise ValueError(f"metric={metric!r}: choose one of {METRICS}.")
  if metric == "adm":
    if reference is None:
      raise ValueError("metric='adm' needs a reference batch (--reference=REF.npz), e.g. one"
                       " of ADM's published VIRTUAL_imagenet256_labeled.npz.")
    inception.weights_path(inception_weights)  # raises, saying where to get them
  if reference is not None:
    _members(reference, "reference")  # raises unless it is an .npz file


def evaluate_npz(samples: str, reference: str | None = None, metric: str = "adm",
                 inception_weights: str | None = None, batch_size: int = 256,
                 out: str | None = None) -> dict:
  """Computes `metric` for a samples .npz and writes them as JSON to `out`.

  out defaults to metrics.json next to the samples. Returns the metrics.
  """
  check_inputs(metric, reference, inception_weights)
  members = _members(samples, "samples")
  if "arr_0" not in members:
    raise ValueError(f"--samples={samples!r} holds no images arr_0 (it has {sorted(members)}):"
                     f" expected {_EXPECTED['samples']}.")
  start = time.time()
  if metric == "adm":
    result = adm_metrics(samples, reference, inception_weights, batch_size)
  elif metric == "scenes":
    result = scenes_metrics(samples)
  else:
    result = digits_metrics(samples, reference, batch_size)
  result = {"metric": metric, "samples": paths.join(samples),
            "reference": (paths.join(reference) if reference else
                          "real scenes of the captions" if metric == "scenes" else
                          "heldout digits"),
            **result, "seconds": round(time.time() - start, 2)}
  out = out or os.fspath(paths.resolve(samples).parent / "metrics.json")
  paths.write_json(out, result)
  logging.info("wrote %s: %s", out, result)
  return result
