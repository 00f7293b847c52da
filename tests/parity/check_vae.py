"""Compares sgjax's VAE with diffusers' on the full-size fixtures of make_vae_fixtures.py.

    /tmp/parity-venv/bin/python tests/parity/make_vae_fixtures.py --full /tmp/vae_full
    .venv/bin/python -m tests.parity.check_vae /tmp/vae_full

Loads OUT/vae (sd-vae-ft-ema's architecture, random weights) with `sgjax.models.vae.load`
and prints, for each OUT/vae_io_<size>.npz, the max absolute error of the posterior mean and
std and of the decoded images against diffusers' (float32). No torch needed here.
"""

import glob
import json
import os
import sys

import numpy as np

from sgjax.models import vae


def compare(folder: str) -> dict:
  model = vae.load(os.path.join(folder, "vae"))
  nhwc = lambda x: np.asarray(x).transpose(0, 2, 3, 1)
  results = {}
  for path in sorted(glob.glob(os.path.join(folder, "vae_io_*.npz"))):
    with np.load(path) as data:
      mean, std = model.encode(nhwc(data["images"]))
      decoded = model.decode(nhwc(data["latents"]))
      results[os.path.basename(path)] = {
          "mean": float(np.abs(np.asarray(mean) - nhwc(data["mean"])).max()),
          "std": float(np.abs(np.asarray(std) - nhwc(data["std"])).max()),
          "decoded": float(np.abs(np.asarray(decoded) - nhwc(data["decoded"])).max()),
          "max_abs_decoded": float(np.abs(data["decoded"]).max())}
  return results


if __name__ == "__main__":
  print(json.dumps(compare(sys.argv[1]), indent=2))
