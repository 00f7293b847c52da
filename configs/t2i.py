"""Text-to-image with the paper's TR-DiT (PAPER.md section 5; `sgjax/models/trdit.py`).

    --config=configs/t2i.py                  the 2.5B model: 512x512 images as 64x64x4 latents
    --config=configs/t2i.py:model=demo       the compositional digits demo (no download)
    --config=configs/t2i.py:model=demo,runlocal   a tiny demo model, seconds (tests)

2.5B: 34 blocks, width 2048, 16 heads, patch 2 (1024 tokens), routed 2->30 at gamma 0.5,
AdamW lr 5e-5 with betas (0.9, 0.95), batch 3072, bf16, FSDP. Its text comes precomputed:
records holding each latent with its caption's hidden states ("text", [256, 2560]: Gemma 3
4B's width) and mask; set model.text_width / model.text_length to your encoder's.

demo: captioned scenes of two coloured digits on a 2x2 canvas of 8x8 cells ("a red 3 left of
a blue 7"; `sgjax/data/scenes.py`), 16x16x3 at patch 2 (64 tokens), the built-in word
encoder (`sgjax/text/words.py`), a width-64 TR-DiT routed 1->4 of 6 at gamma 0.5, 3000 steps
at batch 64 (8.6 minutes on a 2-core Intel Xeon as launch/t2i_demo.sh runs them; whether the
relation words are learned by then depends on the training seed: see the README). Unlike the
2.5B model it adds DiT's absolute sin-cos position table to RoPE (model.pos_embed): with
RoPE alone this model hardly learns which digit to draw in this budget (the README's
text-to-image results).
"""

import ml_collections

from sgjax import config as config_lib
from sgjax.data import scenes


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, model="2.5B", runlocal=False)
  if arg["model"] not in ("2.5B", "demo"):
    raise ValueError(f"config argument model={arg['model']!r}: choose 2.5B or demo.")
  demo = arg["model"] == "demo"
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict(dict(
      arch="trdit", name=f"TR-DiT-{arg['model']}", input_size=64, in_channels=4,
      patch_size=2, width=2048, depth=34, num_heads=16, mlp_multiple=256, text_width=2560,
      text_length=256, refiner_depth=2, sparsity="routing", routes=((2, 30, 0.5),),
      dtype="bfloat16", time_scale=1000.0, rope_theta=10000.0, remat="full",
      attention="xla", pos_embed="none"))
  config.flow = ml_collections.ConfigDict(dict(
      time_dist="logit_normal", label_dropout=0.1, mask_weight=0.1))
  config.data = ml_collections.ConfigDict(dict(
      source="latents", path="", name="", data_dir="", image_size=64, flip=False,
      num_workers=8, vae="", latent_scale=0.18215, size=0))
  config.text = ml_collections.ConfigDict(dict(encoder="precomputed", vocabulary="", seed=0))
  config.train = ml_collections.ConfigDict(dict(
      batch_size=3072, steps=400_000, lr=5e-5, b1=0.9, b2=0.95, weight_decay=0.0,
      warmup_steps=1000, lr_schedule="constant", grad_clip=1.0, ema_decay=0.9999,
      log_every=100, ckpt_every=5000, keep_ckpts=3, keep_every=0, sample_every=0))
  config.mesh = ml_collections.ConfigDict(dict(preset="fsdp", tensor=1, dcn_data=1))

  if demo:
    config.model.update(input_size=16, in_channels=3, width=64, depth=6, num_heads=4,
                        mlp_multiple=8, text_width=32, text_length=8, routes=((1, 4, 0.5),),
                        dtype="float32", remat="none", pos_embed="sincos")
    config.data.update(source="scenes", image_size=16, num_workers=0, latent_scale=1.0,
                       size=100_000)
    config.text.update(encoder="words", vocabulary=" ".join(scenes.VOCABULARY))
    config.train.update(batch_size=64, steps=3000, lr=2e-3, b2=0.999, warmup_steps=50,
                        ema_decay=0.995, log_every=50, ckpt_every=500, keep_ckpts=2)
    config.mesh.preset = "data"
  if arg["runlocal"]:
    config.model.update(width=32, depth=3, routes=((1, 1, 0.5),), text_width=16)
    config.data.update(size=1000)
    config.train.update(batch_size=32, steps=12, warmup_steps=2, log_every=1, ckpt_every=4)
  return config
