# Environment this script was run with (Python 3.11, CPU only):
#   torch==2.14.1 torchvision==0.29.1 timm==1.0.31 numpy==2.4.6
#   (pulled in by those: triton==3.8.0, pillow==13.0.0, PyYAML==6.0.4,
#    huggingface_hub==2.4.0, safetensors==0.8.0 and torch's nvidia-* wheels)
# Why not torch==2.13.0: here it resolves to the 2.13.0+cpu wheel, and the only
# torchvision for it (0.28.0) is a CUDA build whose compiled ops cannot load
# against CPU torch, so `import torchvision` fails, and every timm release
# imports torchvision on the way to timm.models.vision_transformer. The CUDA
# build of torch 2.14.1 with its matching torchvision 0.29.1 works on a CPU-only
# machine; this script never touches a GPU.
"""Write parity fixtures from the public PyTorch reference implementations.

The references are run as their own authors wrote them: this script exports
their files from local git mirrors into a temporary directory at run time,
puts that directory on ``sys.path`` and imports from there. No reference code
lives in this repository.

  SiT    willisma/SiT              models.py (SiT, SiT_models)
  TREAD  CompVis/tread             dit.py (DiT with routing), routing_module.py
  DiT    facebookresearch/DiT      models.py (DiT)
  MaskDiT  Anima-Lab/MaskDiT       models/maskdit.py (DecoderLayer, the decoder input)

For each architecture a small model is built with the reference constructor,
then every parameter except the fixed sin-cos ``pos_embed`` is randomised
(the references zero-init adaLN and the final layer, which would make every
output zero): weights with two or more dimensions uniform in
+-1/sqrt(fan_in), 1-d biases normal(0, 0.05), the label table normal(0, 0.5).
Outputs are computed in float32, eval mode, under ``torch.no_grad()``.

The test suite never needs torch: it reads the ``.npz`` files with numpy and
the ``.pt`` files with its own torch-free loader. Only regenerating the
fixtures needs this script and its virtualenv.

Setup and run (from the repository root; the venv lives outside the repo):

  python3.11 -m venv /tmp/parity-venv
  /tmp/parity-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
      timm==1.0.31 numpy==2.4.6
  /tmp/parity-venv/bin/python tests/parity/make_fixtures.py \
      [--out tests/parity/fixtures] [--sit_repo ...] [--tread_repo ...] \
      [--dit_repo ...]
  # full-size SiT-XL/2 state dict with random values, for a manual check only:
  /tmp/parity-venv/bin/python tests/parity/make_fixtures.py \
      --sit_xl_out /tmp/sit_xl2_random.pt

Fixtures written to --out, for arch in sit, tread, dit:

``{arch}.pt`` (plain ``torch.save``, default zip format):
  sit    a SiT train.py checkpoint: {"model": raw state dict, "ema": EMA state
         dict, "opt": AdamW state after one step on the raw model, "args":
         argparse.Namespace(model="SiT-XL/2", image_size=256, num_classes=10)}.
         Raw and EMA are two different randomisations; the outputs come from
         the EMA. Keys are bare (train.py saves ``model.module.state_dict()``).
         Note ``args.model`` names SiT-XL/2 while the weights are the small
         model: shapes must be read from the state dict, not from ``args``.
  tread  a TREAD train.py-style checkpoint: {"model_state_dict",
         "ema_state_dict", "optimizer_state_dict", "step": 1234}; raw and EMA
         differ, outputs come from the EMA. Keys are bare: the network as
         rf.py trains it (rectified flow, t = 1 noise). TREAD's train.py
         instead wraps it in edm.EDMPrecond (keys prefixed ``model.``, EDM
         preconditioning), which sgjax refuses to import.
  dit    a plain state dict, like the official DiT-XL-2-256x256.pt release.

``{arch}.npz``:
  x         [4, 4, 8, 8] float32, NCHW, standard normal.
  t         [4] float32, the time exactly as the reference network receives it:
            sit   [0.125, 0.25, 0.5, 0.75]  (SiT linear path, t=0 noise, t=1 data)
            tread [0.75, 0.5, 0.25, 0.125]  (rf.py: t = 1 noise, t = 0 data)
            dit   [750, 500, 250, 125]      (DDPM integer steps, as float)
  y         [4] int64 labels [3, 7, 10, 0]; 10 == num_classes is the null class.
  out       float32 ``model(x, t, y)`` in eval mode, as ``forward`` returns it:
            sit [4, 4, 8, 8] (forward drops the learn-sigma half), dit
            [4, 8, 8, 8] (eps then variance channels), tread [4, 4, 8, 8]
            (dense: class_drop_prob=0.0, no routing).
  config    0-d str array: JSON of the hyper-parameters and reference commit.
  tread only:
  out_routed  forward(x, t, y, class_drop_prob=0.0, force_routing=True,
              overwrite_selection_ratio=0.5): block 1 sees only the kept
              tokens; the others skip them and are scattered back.
  ids_keep    [4, 8] int64, the token indices the Router kept in that call,
              in the Router's (shuffled, unsorted) order.
  gamma       0-d float32 0.5, the fraction of tokens dropped (TREAD's
              "selection_ratio" is the fraction masked, not kept).

``maskdit_decoder_input.npz``: MaskDiT's DecoderLayer (LayerNorm, adaLN shift/scale
from c, linear 32 -> 16) with random weights, stored as ``weight:<state dict key>``
arrays; ``x`` [4, 8, 32], ``c`` [4, 32] and its output ``out`` [4, 8, 16].
"""

import argparse
import copy
import importlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

# TREAD decorates block forwards with @torch.compile; run them eagerly.
torch._dynamo.config.disable = True

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3,
             num_heads=2, mlp_ratio=4.0, num_classes=10)
TREAD_ROUTES = [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 1}]
DECODER_WIDTH = 16  # MaskDiT's decoder width (512 in the paper)
LABELS = [3, 7, 10, 0]
TIMES = {"sit": [0.125, 0.25, 0.5, 0.75],
         "tread": [0.75, 0.5, 0.25, 0.125],
         "dit": [750.0, 500.0, 250.0, 125.0]}


def git(repo, *args):
    return subprocess.run(["git", "-C", repo, *args], check=True,
                           capture_output=True).stdout


def import_reference(repo, files, module, workdir):
    """Export `files` at the mirror's HEAD into `workdir` and import `module`.

    The directory is taken off sys.path and the exported modules out of
    sys.modules again, so two references with a `models.py` do not collide.
    """
    os.makedirs(workdir)
    names = [os.path.basename(path) for path in files]  # models/maskdit.py -> maskdit.py
    for path, name in zip(files, names):
        with open(os.path.join(workdir, name), "wb") as f:
            f.write(git(repo, "show", f"HEAD:{path}"))
    sys.path.insert(0, workdir)
    importlib.invalidate_caches()
    try:
        mod = importlib.import_module(module)
    finally:
        sys.path.remove(workdir)
        for name in names:
            sys.modules.pop(name[:-len(".py")], None)
    return mod


@torch.no_grad()
def randomise_(model, seed):
    """Give every parameter but the fixed pos_embed a random, non-zero value."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "pos_embed":
            continue
        if name.endswith("embedding_table.weight"):
            p.normal_(0.0, 0.5, generator=gen)
        elif p.ndim > 1:  # Linear [out, in] or patch conv [out, in, p, p]
            bound = p[0].numel() ** -0.5
            p.uniform_(-bound, bound, generator=gen)
        else:
            p.normal_(0.0, 0.05, generator=gen)


def batch(arch, seed):
    x = torch.randn(4, SMALL["in_channels"], SMALL["input_size"], SMALL["input_size"],
                    generator=torch.Generator().manual_seed(seed))
    return x, torch.tensor(TIMES[arch]), torch.tensor(LABELS)


def adamw_one_step(model, loss_fn, **adamw_kwargs):
    """One AdamW step on `model` (in train mode), as the training scripts build it."""
    opt = torch.optim.AdamW(model.parameters(), **adamw_kwargs)
    model.train()
    loss_fn(model).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def config_json(arch, repo, **extra):
    cfg = dict(arch=arch, **SMALL, **extra,
               reference_commit=git(repo, "rev-parse", "HEAD").decode().strip())
    return np.array(json.dumps(cfg))


def save(out_dir, arch, checkpoint, **arrays):
    torch.save(checkpoint, os.path.join(out_dir, f"{arch}.pt"))
    np.savez(os.path.join(out_dir, f"{arch}.npz"), **arrays)
    out = arrays["out"]
    assert np.isfinite(out).all(), arch
    print(f"{arch}: out {out.shape} max|out| = {np.abs(out).max():.4f}")


def make_sit(ref, repo, out_dir):
    model = ref.SiT(**SMALL, class_dropout_prob=0.1, learn_sigma=True)
    randomise_(model, seed=1)
    ema = copy.deepcopy(model).requires_grad_(False)
    randomise_(ema, seed=2)
    x, t, y = batch("sit", seed=3)
    # SiT train.py: AdamW(lr=1e-4, weight_decay=0); the loss only has to move the weights.
    opt = adamw_one_step(model, lambda m: m(x, t, y).square().mean(),
                         lr=1e-4, weight_decay=0)
    ema.eval()
    with torch.no_grad():
        out = ema(x, t, y)
    checkpoint = {"model": model.state_dict(), "ema": ema.state_dict(),
                  "opt": opt.state_dict(),
                  "args": argparse.Namespace(model="SiT-XL/2", image_size=256,
                                             num_classes=10)}
    save(out_dir, "sit", checkpoint, x=x.numpy(), t=t.numpy(), y=y.numpy(),
         out=out.numpy(),
         config=config_json("sit", repo, learn_sigma=True, class_dropout_prob=0.1,
                            routes=None))


def make_tread(ref, repo, out_dir):
    model = ref.DiT(**SMALL, learn_sigma=False, cond_mode="adaln",
                    enable_routing=True, routes=TREAD_ROUTES)
    randomise_(model, seed=4)
    ema = copy.deepcopy(model).requires_grad_(False)
    randomise_(ema, seed=5)
    x, t, y = batch("tread", seed=6)
    # TREAD configs/config.yaml optimizer; train mode routes tokens and drops labels.
    opt = adamw_one_step(
        model, lambda m: m(x, t, y, class_drop_prob=0.1).square().mean(),
        lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ema.eval()

    kept = []
    get_mask = ema.router.get_mask

    def recording_get_mask(x, selection_rate=0.0):
        ids = get_mask(x, selection_rate=selection_rate)
        kept.append(ids)
        return ids

    ema.router.get_mask = recording_get_mask
    with torch.no_grad():
        out = ema(x, t, y, class_drop_prob=0.0)
        assert not kept, "the dense eval forward must not route"
        out_routed = ema(x, t, y, class_drop_prob=0.0, force_routing=True,
                         overwrite_selection_ratio=0.5)
    (ids_keep,) = kept

    checkpoint = {"model_state_dict": model.state_dict(), "ema_state_dict": ema.state_dict(),
                  "optimizer_state_dict": opt.state_dict(), "step": 1234}
    save(out_dir, "tread", checkpoint, x=x.numpy(), t=t.numpy(), y=y.numpy(),
         out=out.numpy(), out_routed=out_routed.numpy(), ids_keep=ids_keep.numpy(),
         gamma=np.array(0.5, dtype=np.float32),
         config=config_json("tread", repo, learn_sigma=False, cond_mode="adaln",
                            routes=TREAD_ROUTES))
    print(f"tread: out_routed max|out_routed| = {out_routed.abs().max():.4f}, "
          f"ids_keep {tuple(ids_keep.shape)}")


def make_dit(ref, repo, out_dir):
    model = ref.DiT(**SMALL, class_dropout_prob=0.1, learn_sigma=True)
    randomise_(model, seed=7)
    model.eval()
    x, t, y = batch("dit", seed=8)
    with torch.no_grad():
        out = model(x, t, y)
    save(out_dir, "dit", model.state_dict(), x=x.numpy(), t=t.numpy(), y=y.numpy(),
         out=out.numpy(),
         config=config_json("dit", repo, learn_sigma=True, class_dropout_prob=0.1,
                            routes=None))


def make_maskdit_decoder_input(ref, repo, out_dir):
    """MaskDiT's DecoderLayer (encoder width -> decoder width, modulated by c) alone."""
    layer = ref.DecoderLayer(SMALL["hidden_size"], DECODER_WIDTH)
    randomise_(layer, seed=10)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 8, SMALL["hidden_size"], generator=gen)
    c = torch.randn(4, SMALL["hidden_size"], generator=gen)
    with torch.no_grad():
        out = layer(x, c)
    weights = {k: v.numpy() for k, v in layer.state_dict().items()}
    np.savez(os.path.join(out_dir, "maskdit_decoder_input.npz"), x=x.numpy(), c=c.numpy(),
             out=out.numpy(), config=config_json("maskdit", repo, decoder_width=DECODER_WIDTH),
             **{f"weight:{k}": v for k, v in weights.items()})
    print(f"maskdit decoder input: out {tuple(out.shape)} max|out| = {out.abs().max():.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tests/parity/fixtures")
    parser.add_argument("--sit_repo", default="/work/.mirror/willisma+SiT/repo")
    parser.add_argument("--tread_repo", default="/work/.mirror/CompVis+tread/repo")
    parser.add_argument("--dit_repo", default="/work/.mirror/facebookresearch+DiT/repo")
    parser.add_argument("--maskdit_repo", default="/work/.mirror/Anima-Lab+MaskDiT/repo")
    parser.add_argument("--sit_xl_out", default=None,
                        help="only write a random full-size SiT-XL/2 state dict here")
    args = parser.parse_args()
    torch.manual_seed(0)  # the Router and train-mode label dropout use the global RNG

    with tempfile.TemporaryDirectory() as tmp:
        sit = import_reference(args.sit_repo, ["models.py"], "models",
                               os.path.join(tmp, "sit"))
        if args.sit_xl_out:
            model = sit.SiT_models["SiT-XL/2"]()  # input_size=32, 1000 classes, learn_sigma
            randomise_(model, seed=9)
            torch.save(model.state_dict(), args.sit_xl_out)
            print(f"wrote {args.sit_xl_out}")
            return
        tread = import_reference(args.tread_repo, ["dit.py", "routing_module.py"],
                                 "dit", os.path.join(tmp, "tread"))
        dit = import_reference(args.dit_repo, ["models.py"], "models",
                               os.path.join(tmp, "dit"))
        os.makedirs(args.out, exist_ok=True)
        make_sit(sit, args.sit_repo, args.out)
        make_tread(tread, args.tread_repo, args.out)
        make_dit(dit, args.dit_repo, args.out)
        maskdit = import_reference(args.maskdit_repo, ["models/maskdit.py"], "maskdit",
                                   os.path.join(tmp, "maskdit"))
        make_maskdit_decoder_input(maskdit, args.maskdit_repo, args.out)


if __name__ == "__main__":
    main()
