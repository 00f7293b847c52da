"""Evaluation metrics.

- `inception`: the FID Inception-v3 (TF 2015-12-05 graph) in Flax NNX, weights read from
  pytorch-fid's file without torch (`sgjax.torch_state`).
- `adm`: FID, sFID, Inception Score, precision/recall with the ADM suite's semantics.
- `digits`: classifier-based metrics for the embedded digits dataset.
- `features`: batched, data-parallel feature extraction; streamed .npz image files.
- `npz`: evaluation of ADM-format sample files, behind `python -m sgjax.evaluate`.

Submodules are imported explicitly (`from sgjax.metrics import adm`), so that
`python -m sgjax.metrics.inception` runs without importing itself twice.
"""

import os


def cache_dir() -> str:
  """$SGJAX_CACHE or ~/.cache/sgjax: where weights files and cached classifiers live."""
  return os.environ.get("SGJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "sgjax")
