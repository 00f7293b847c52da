"""Evaluates a sample file and writes metrics.json.

    python -m sgjax.evaluate --samples=DIR/samples.npz --reference=REF.npz \
        [--metric=adm|digits] [--inception_weights=PATH] [--batch_size=256] [--out=PATH]

--metric=adm: FID, sFID, Inception Score, precision, recall as ADM's evaluation suite
computes them (Inception weights: see sgjax/metrics/inception.py). --metric=digits: class
accuracy, digits-FID, diversity, precision, recall from a small digits classifier; the
reference defaults to the 297 held-out digits. Output defaults to metrics.json next to the
samples.
"""

import json

from absl import flags

from sgjax import cli
from sgjax.metrics import npz

_SAMPLES = flags.DEFINE_string("samples", None, "ADM-format .npz: arr_0 uint8 [N, H, W, C],"
                               " optional arr_1 labels.", required=True)
_REFERENCE = flags.DEFINE_string("reference", None, "ADM reference batch .npz (arr_0 images"
                                 " and/or mu, sigma, mu_s, sigma_s).")
_METRIC = flags.DEFINE_enum("metric", "adm", list(npz.METRICS), "Which metrics.")
_WEIGHTS = flags.DEFINE_string("inception_weights", None, "pytorch-fid's"
                               " pt_inception-2015-12-05-6726825d.pth (or its .npz);"
                               " default $SGJAX_INCEPTION_WEIGHTS.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per feature-extraction batch.")
_OUT = flags.DEFINE_string("out", None, "metrics.json path (default: next to the samples).")


def main(argv) -> None:
  del argv
  result = npz.evaluate_npz(_SAMPLES.value, _REFERENCE.value, _METRIC.value, _WEIGHTS.value,
                            _BATCH_SIZE.value, _OUT.value)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  cli.run(main)
