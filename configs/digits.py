"""The embedded default: scikit-learn's bundled handwritten digits (no download).

    python -m sgjax.train --config=configs/digits.py --workdir=runs/digits
    --config=configs/digits.py:sparsity=dense|routing|masking   (default: routing at 0.5)
    --config=configs/digits.py:runlocal                        (a few seconds, for tests)

8x8 grey digits, patch 1 (64 tokens), a width-64 SiT with 6 blocks routed 1->4 at gamma 0.5
(TREAD's proportions): on an idle 2-core CPU the default 750 steps take 7 minutes as
launch/local.sh runs them (one single-threaded XLA device per core), 8.5 minutes on one
device, and give recognisable digits of the requested class (about 90% by the digits
classifier, unguided: the README's demo table).
"""

import ml_collections

from sgjax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, sparsity="routing", runlocal=False)
  config = ml_collections.ConfigDict()
  config.seed = 0

  sparsity = arg["sparsity"]
  config.model = ml_collections.ConfigDict(dict(
      name="SiT-digits", input_size=8, in_channels=1, patch_size=1, width=64, depth=6,
      num_heads=4, mlp_ratio=4.0, num_classes=10, sparsity=sparsity,
      routes=((1, 4, 0.5),) if sparsity == "routing" else (),
      mask_gamma=0.5, decoder_depth=2, decoder_width=64, decoder_heads=4,
      dtype="float32", time_scale=1000.0, remat="none", attention="xla"))

  config.flow = ml_collections.ConfigDict(dict(
      time_dist="logit_normal", label_dropout=0.1, mask_weight=0.1))

  config.data = ml_collections.ConfigDict(dict(
      source="digits", name="", path="", data_dir="", image_size=8, flip=False,
      num_workers=0, latent_scale=1.0))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=128, steps=750, lr=2e-3, b1=0.9, b2=0.999, weight_decay=0.0,
      warmup_steps=50, lr_schedule="constant", grad_clip=1.0, ema_decay=0.995,
      log_every=50, ckpt_every=250, keep_ckpts=2, keep_every=0, sample_every=250))

  config.mesh = ml_collections.ConfigDict(dict(preset="data", tensor=1, dcn_data=1))

  if arg["runlocal"]:
    config.model.update(width=32, depth=3, routes=((1, 1, 0.5),) if sparsity == "routing"
                        else (), decoder_depth=1, decoder_width=32)
    config.train.update(batch_size=32, steps=12, warmup_steps=2, log_every=1, ckpt_every=4)
  return config
