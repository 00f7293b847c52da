# Environment this script was run with (Python 3.11, CPU only): the venv of
# make_fixtures.py (torch==2.14.1, numpy==2.4.6, safetensors==0.8.0,
# huggingface_hub==2.4.0) plus
#   /tmp/parity-venv/bin/pip install diffusers==0.42.1
# which also pulled in importlib_metadata==10.2.0, regex==2026.11.19,
# requests==2.34.2 (and their own dependencies); transformers is not needed.
"""Write parity fixtures for Stable Diffusion's VAE from diffusers' own AutoencoderKL.

The reference is ``diffusers.AutoencoderKL`` as installed, i.e. the
architecture of ``stabilityai/sd-vae-ft-ema`` (DownEncoderBlock2D /
UpDecoderBlock2D, a mid block with one attention layer, GroupNorm + SiLU,
quant_conv and post_quant_conv), built with a small config: two levels of
16 and 32 channels, one resnet per down block (two per up block, as diffusers
builds the decoder with layers_per_block + 1), 8 GroupNorm groups (2 and 4
channels a group), 16x16 images and 8x8 latents: 168k parameters, a 0.7 MB
safetensors file. Every other config key keeps the value SD-VAE uses
(the AutoencoderKL defaults): scaling_factor 0.18215, no shift_factor,
latents_mean or latents_std, force_upcast, quant convs and mid-block attention
all on.

Every parameter is randomised (torch.manual_seed(0), and the explicit
generator seeded with 0) so that no layer is trivial: weights with 2+ dims
uniform in +-1/sqrt(fan_in), GroupNorm scales 1 + normal(0, 0.1), all 1-d
biases (GroupNorm shifts included) normal(0, 0.05). Outputs are computed in
float32, eval mode, under ``torch.no_grad()``.

The test suite never needs torch: it reads the diffusers-format folder with
``json`` and ``safetensors.numpy`` and the ``.npz`` with numpy. Only
regenerating the fixtures needs this script and its virtualenv.

Setup and run (from the repository root; the venv lives outside the repo):

  python3.11 -m venv /tmp/parity-venv
  /tmp/parity-venv/bin/pip install torch==2.14.1 numpy==2.4.6 diffusers==0.42.1
  /tmp/parity-venv/bin/python tests/parity/make_vae_fixtures.py \
      [--out tests/parity/fixtures/vae]

The output is deterministic: a second run writes byte-identical files.

Fixtures written to --out:

``vae/``: ``AutoencoderKL.save_pretrained``, exactly what a diffusers VAE
  folder on the Hub holds: ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` (float32, diffusers' current key
  names: the mid-block attention is ``to_q``/``to_k``/``to_v``/``to_out.0``;
  conv weights are OIHW, linear weights [out, in]).

``vae_io.npz``, all float32 and NCHW (diffusers' layout):
  images   [2, 3, 16, 16] uniform in [-1, 1].
  mean     [2, 4, 8, 8] ``vae.encode(images).latent_dist.mean``.
  std      [2, 4, 8, 8] ``vae.encode(images).latent_dist.std``
           (exp(0.5 * logvar), logvar clamped to [-30, 20]).
  latents  [2, 4, 8, 8] unscaled latents as ``vae.decode`` takes them: a unit
           normal draw divided by scaling_factor, the scale SD pipelines feed
           the decoder.
  decoded  [2, 3, 16, 16] ``vae.decode(latents).sample``.
  config   0-d str array: JSON of the model config plus the diffusers and
           torch versions.
"""

import argparse
import json
import os

import diffusers
import numpy as np
import safetensors.numpy
import torch

SMALL = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    act_fn="silu",
    sample_size=16,
    scaling_factor=0.18215,
    # The remaining keys, spelled out with SD-VAE's values (the defaults).
    shift_factor=None,
    latents_mean=None,
    latents_std=None,
    force_upcast=True,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)
BATCH = 2
# --full: stabilityai/sd-vae-ft-ema's architecture (its config.json's shape fields), random
# weights, 83.65M parameters: not committed; tests/parity/check_vae.py compares against it.
SD_VAE = dict(SMALL, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              norm_num_groups=32, sample_size=256,
              down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4)


@torch.no_grad()
def randomise_(model, gen):
    """Give every parameter a random, non-trivial value."""
    group_norm_scales = {f"{name}.weight" for name, m in model.named_modules()
                         if isinstance(m, torch.nn.GroupNorm)}
    for name, p in model.named_parameters():
        if name in group_norm_scales:
            p.normal_(1.0, 0.1, generator=gen)
        elif p.ndim > 1:  # conv [out, in, kh, kw] or linear [out, in]
            bound = p[0].numel() ** -0.5
            p.uniform_(-bound, bound, generator=gen)
        else:
            p.normal_(0.0, 0.05, generator=gen)


def write_full(out):
    """sd-vae-ft-ema's architecture with random weights, and its outputs on random images of
    64x64 and 256x256 (one each): OUT/vae/ and OUT/vae_io_{64,256}.npz."""
    gen = torch.Generator().manual_seed(1)
    vae = diffusers.AutoencoderKL(**SD_VAE).float().eval()
    randomise_(vae, gen)
    vae.save_pretrained(os.path.join(out, "vae"))
    print(f"sd-vae-ft-ema architecture: {sum(p.numel() for p in vae.parameters())} parameters")
    for size in (64, 256):
        images = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
        latents = torch.randn(1, 4, size // 8, size // 8, generator=gen) / 0.18215
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist
            decoded = vae.decode(latents).sample
        np.savez(os.path.join(out, f"vae_io_{size}.npz"), images=images.numpy(),
                 mean=posterior.mean.numpy(), std=posterior.std.numpy(),
                 latents=latents.numpy(), decoded=decoded.numpy())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tests/parity/fixtures/vae")
    parser.add_argument("--full", default=None,
                        help="only write the full-size sd-vae-ft-ema comparison here")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.full:
        write_full(args.full)
        return
    gen = torch.Generator().manual_seed(0)

    vae = diffusers.AutoencoderKL(**SMALL).float().eval()
    randomise_(vae, gen)
    images = torch.rand(BATCH, 3, 16, 16, generator=gen) * 2 - 1
    latents = torch.randn(BATCH, 4, 8, 8, generator=gen) / SMALL["scaling_factor"]
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        decoded = vae.decode(latents).sample

    model_dir = os.path.join(args.out, "vae")
    vae.save_pretrained(model_dir)
    weights = safetensors.numpy.load_file(
        os.path.join(model_dir, "diffusion_pytorch_model.safetensors"))
    state = vae.state_dict()
    assert weights.keys() == state.keys()
    for key, value in weights.items():
        assert value.dtype == np.float32, key
        np.testing.assert_array_equal(value, state[key].numpy(), err_msg=key)
    print(f"state dict: {len(state)} tensors, "
          f"{sum(v.numel() for v in state.values())} parameters")
    for key, value in state.items():
        print(f"  {key} {list(value.shape)}")

    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    config.update(diffusers_version=diffusers.__version__, torch_version=torch.__version__)
    outputs = dict(images=images, mean=posterior.mean, std=posterior.std,
                   latents=latents, decoded=decoded)
    arrays = {k: v.numpy().astype(np.float32) for k, v in outputs.items()}
    for key, value in arrays.items():
        assert np.isfinite(value).all(), key
        print(f"{key} {list(value.shape)} max|{key}| = {np.abs(value).max():.4f}")
    np.savez(os.path.join(args.out, "vae_io.npz"), **arrays,
             config=np.array(json.dumps(config, sort_keys=True)))


if __name__ == "__main__":
    main()
