"""ImageNet 256x256 on 32x32x4 SD-VAE latents, the paper's setting (PAPER.md section 5).

    --config=configs/imagenet256.py:model=SiT-XL/2,sparsity=routing
    --config=configs/imagenet256.py:model=DiT-B/2,sparsity=masking
    --config=configs/imagenet256.py:model=SiT-2.5B/2,latent_size=64   (512x512, 2.58B)
    --config=configs/imagenet256.py:runlocal      (a tiny model on synthetic latents, seconds)

Arguments: model (DiT-/SiT- S|B|L|XL|2.5B /2|4|8), sparsity (dense|routing|masking),
latent_size (32 for 256x256 images, 64 for 512x512), runlocal.
"""

import ml_collections

from sgjax import config as config_lib
from sgjax.models import dit


def tread_routes(depth: int) -> tuple[tuple[int, int, float], ...]:
  """TREAD's route, 0-based and inclusive, from block 2 to the fourth-last: r2->24 for XL
  (28 blocks), r2->20 for L, r2->8 for B (12), r2->30 for the text-to-image TR-DiT (34)."""
  return ((2, depth - 4, 0.5),)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, model="SiT-XL/2", sparsity="routing", latent_size=32,
                             runlocal=False)
  config = ml_collections.ConfigDict()
  config.seed = 0

  size = dit.parse_model_name(arg["model"])
  config.model = ml_collections.ConfigDict(dict(
      name=arg["model"], input_size=arg["latent_size"], in_channels=4, num_classes=1000,
      mlp_ratio=4.0, sparsity=arg["sparsity"],
      routes=tread_routes(size["depth"]) if arg["sparsity"] == "routing" else (),
      mask_gamma=0.5,
      # MaskDiT decoder, paper default.
      decoder_depth=8, decoder_width=512, decoder_heads=16,
      dtype="bfloat16", remat="none", attention="xla",
      # SiT (and TREAD) feed t in [0, 1] to the frequency embedding, DiT its timesteps 0..999:
      # the time conventions of the checkpoints that `sgjax.import_torch` brings in.
      time_scale=1.0 if arg["model"].startswith("SiT") else 1000.0, **size))

  config.flow = ml_collections.ConfigDict(dict(
      time_dist="logit_normal", label_dropout=0.1, mask_weight=0.1))

  config.data = ml_collections.ConfigDict(dict(
      # No flips of latents: `sgjax.latents --flip` encodes flipped images as records.
      source="latents", path="", name="", data_dir="", image_size=arg["latent_size"], flip=False,
      num_workers=8,
      # The VAE folder that made the latents (`sgjax.latents --vae`; sampling decodes with it)
      # and its scale (SD-VAE's 0.18215; checked against the VAE's config.json when vae is set).
      vae="", latent_scale=0.18215))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=256, steps=400_000, lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0,
      warmup_steps=0, lr_schedule="constant", grad_clip=0.0, ema_decay=0.9999,
      log_every=100, ckpt_every=10_000, keep_ckpts=3, sample_every=0,
      # Kept for good: the 50k-step model is AG's auxiliary (sample --aux_step=50000).
      keep_every=50_000))

  config.mesh = ml_collections.ConfigDict(dict(preset="fsdp", tensor=1, dcn_data=1))

  if arg["runlocal"]:
    config.model.update(depth=4, width=64, num_heads=4, input_size=8, patch_size=2,
                        dtype="float32", decoder_depth=2, decoder_width=32, decoder_heads=4,
                        routes=((1, 2, 0.5),) if arg["sparsity"] == "routing" else ())
    config.train.update(batch_size=16, steps=20, log_every=5, ckpt_every=10, keep_every=0)
    config.data.update(source="synthetic", num_workers=0)
  return config
