"""Encode and decode images/s of the SD-VAE architecture (random weights) at one resolution.

    python -m benchmarks.vae_speed [--resolution=256] [--batch=8] [--dtype=float32]

Times the jitted, batch-sharded `encode` and `decode` of `sgjax.models.vae` (as
`sgjax.latents` and sampling use them) after one untimed call each; prints JSON with the
median of `--repeats` calls.
"""

import argparse
import json
import statistics
import time

import jax
import numpy as np
from flax import nnx

from sgjax import sharding
from sgjax.models import vae


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--resolution", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  model = vae.AutoencoderKL(vae.VAEConfig(dtype=args.dtype), rngs=nnx.Rngs(0))
  encode, decode = vae.batch_codec(model, sharding.make_mesh("data"))
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (args.batch, args.resolution, args.resolution, 3))
  latents = rng.standard_normal((args.batch, args.resolution // 8, args.resolution // 8, 4))
  result = {"resolution": args.resolution, "batch": args.batch, "dtype": args.dtype,
            "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind}
  for name, fn, x in (("encode", encode, images), ("decode", decode, latents)):
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(x))
      times.append(time.perf_counter() - start)
    result[f"{name}_images_per_s"] = args.batch / statistics.median(times)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
