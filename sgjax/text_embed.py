"""Packs captioned images into text-to-image training records, as ArrayRecord shards.

    # the built-in word encoder of a config (the scenes demo, pixel space)
    python -m sgjax.text_embed --captions=/data/scenes/captions.jsonl --encoder=words \
        --config=configs/t2i.py:model=demo --out=/data/scenes_t2i
    # hidden states from an external encoder (Gemma 3, T5...), images to SD-VAE latents
    python -m sgjax.text_embed --captions=/data/cc/captions.jsonl --encoder=npz:/data/cc/t5.npz \
        --config=configs/t2i.py --vae=/models/sd-vae-ft-ema --out=/data/cc_t2i
    # then train on them
    python -m sgjax.train --config=configs/t2i.py:model=demo --workdir=runs/t2i \
        --config.data.source=records --config.data.path='/data/scenes_t2i/train-*.array_record' \
        --config.text.encoder=precomputed
  (data.source=latents for VAE records, with data.vae and data.latent_scale of the VAE)

`--captions` is JSON Lines, one object a line: {"image": PATH, "caption": STR} and an
optional integer "label" (on every line or none); PATH is relative to the captions file's
folder unless absolute; blank lines are skipped, other keys ignored.

Text (`--encoder`):
- `words`: the built-in frozen word encoder (`sgjax.text.words`) of `--config`'s text and
  model fields (vocabulary, seed, model.text_length, model.text_width).
- `npz:FILE`: hidden states computed by an external script (a pretrained encoder needs torch
  or another stack that does not install beside our pins). FILE holds, without pickled
  objects:
    text      float [N, L, D]  the encoder's last hidden states, padded to L tokens;
    mask      bool  [N, L]     True on real tokens (the tokenizer's attention mask);
    captions  str   [N]        the captions, as np.array(captions, dtype=str): equal, in order,
                               to the captions file's non-blank lines.
  `launch/embed_captions_hf.py` writes it from a local Hugging Face checkpoint (T5's encoder,
  Gemma 3, Llama, ...), refusing captions longer than L tokens. The whole file is read into
  memory: split a larger dataset into parts, each with its own --out.
With `--config`, L and D must be its model.text_length and model.text_width.

Images: with `--vae` (a diffusers AutoencoderKL folder) they go through ADM's center crop to
`--resolution` and are encoded to the VAE posterior `mean` and `std`, as `sgjax.latents`
does (train with data.latent_scale = the VAE's scaling factor, data.vae = the folder);
without, they are stored in pixel space as a fixed `latent` float16 [R, R, 3] in [-1, 1]
(exact for 8-bit pixels; train with data.source=records, which samples to images).
`--resolution` defaults to the config's model.input_size (times the VAE's downsampling).

Each record (`sgjax.data.sources.encode_latent_record`) holds the latent (or mean and std),
the label if any, `text` [L, D] (`--text_dtype`, float16 by default; the model computes
in float32), `mask` bool [L], `caption` (a numpy str) and `index` (the caption's position).
Every input is checked before anything is encoded or compiled, except that an image file
which exists but does not decode stops the run when its shard is written (naming it; fix it
and run again: complete shards are kept; with several hosts, stop the job). As in
`sgjax.latents`, a
shard is written to a temporary file and renamed when complete; running again with the same
inputs skips complete shards, while an --out holding other records is refused; every host
sees the same --out and writes shards i, i + n, ... of n. OUT/manifest.json records the
encoder, text length and width, resolution, VAE and latent scale, the record count and a
hash of the captions.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import NamedTuple

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from sgjax import cli, config as config_lib, distributed, latents, logs, sharding
from sgjax.data import images as images_lib
from sgjax.data import sources
from sgjax.models import vae as vae_lib
from sgjax.text import conditioning

FLAGS = flags.FLAGS
MANIFEST = "manifest.json"
CAPTION_FORM = '{"image": PATH, "caption": STR} (and an optional integer "label")'
TEXT_DTYPES = ("float16", "float32")


class Caption(NamedTuple):
  """One line of the captions file."""

  line: int  # 1-based, for messages
  image: str  # as written in the file
  path: str  # the image's absolute path
  caption: str
  label: int | None


def read_captions(path: str) -> list[Caption]:
  """The captions file -> its entries; refuses an empty file, a malformed line (naming it),
  mixed labelled and unlabelled lines, and images that do not exist."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--captions={path!r}: no such file.")
  folder = os.path.dirname(os.path.abspath(path))
  entries = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"--captions={path!r} line {number}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not JSON ({e.msg}): expected {CAPTION_FORM}.") from None
      if not (isinstance(obj, dict) and isinstance(obj.get("image"), str) and obj["image"]
              and isinstance(obj.get("caption"), str) and obj["caption"].strip()):
        raise ValueError(f"{where}: {line.strip()[:100]!r} is not {CAPTION_FORM} with a"
                         " non-empty image path and caption.")
      label = obj.get("label")
      if label is not None and (isinstance(label, bool) or not isinstance(label, int)
                                or label < 0):
        raise ValueError(f"{where}: label {label!r} is not a non-negative integer.")
      entries.append(Caption(number, obj["image"], os.path.join(folder, obj["image"]),
                             obj["caption"], label))
  if not entries:
    raise ValueError(f"--captions={path!r} holds no captions: write one JSON object a line,"
                     f" {CAPTION_FORM}.")
  labelled = [e for e in entries if e.label is not None]
  if labelled and len(labelled) < len(entries):
    bare = next(e for e in entries if e.label is None)
    raise ValueError(f"--captions={path!r} line {bare.line} has no label but line"
                     f" {labelled[0].line} has one: give every line a label, or none.")
  missing = [e for e in entries if not os.path.isfile(e.path)]
  if missing:
    raise FileNotFoundError(
        f"--captions={path!r} line {missing[0].line}: image {missing[0].path!r} does not"
        f" exist ({len(missing)} missing in all); fix the paths (relative to the captions"
        " file's folder) or drop those lines.")
  return entries


def _words_text(config, entries: list[Caption], batch_size: int):
  """The built-in word encoder of `config`: (text_fn, spec); tokenizes every caption now."""
  model_cfg = config_lib.model_config(config.model)
  encoder = conditioning.make_encoder({**config.text.to_dict(), "encoder": "words"}, model_cfg)
  ids = np.zeros((len(entries), encoder.max_length), np.int32)
  mask = np.zeros((len(entries), encoder.max_length), bool)
  for row, entry in enumerate(entries):
    try:
      (ids[row],), (mask[row],) = encoder.tokenize(entry.caption)
    except ValueError as e:
      raise ValueError(f"--captions line {entry.line}: {e}") from None
  encode = jax.jit(encoder.encode)

  def text_fn(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    padded = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows))])  # one shape
    return np.asarray(encode(ids[padded], mask[padded]))[:len(rows)], mask[rows]

  spec = {"encoder": "words", "vocabulary": list(encoder.vocabulary), "seed": encoder.seed,
          "text_length": encoder.max_length, "text_width": encoder.width}
  return text_fn, spec


def _npz_text(file: str, entries: list[Caption], model_cfg, text_dtype: str):
  """Hidden states of an external encoder: (text_fn, spec), every array checked."""
  where = f"--encoder=npz:{file}"
  hidden = conditioning.load_hidden_states(file, where)
  text, mask, captions = hidden.text, hidden.mask, hidden.captions
  if len(text) != len(entries):
    raise ValueError(f"{where} holds {len(text)} rows for the {len(entries)} captions of"
                     " --captions: encode exactly the captions file's captions, in order.")
  differ = [i for i, e in enumerate(entries) if captions[i] != e.caption]
  if differ:
    i = differ[0]
    raise ValueError(f"{where}: row {i} is the caption {captions[i]!r}, but --captions"
                     f" line {entries[i].line} says {entries[i].caption!r} ({len(differ)}"
                     " rows differ): encode the captions file's captions, in order.")
  length, width = text.shape[1:]
  if model_cfg is not None and (length, width) != (model_cfg.text_length,
                                                   model_cfg.text_width):
    raise ValueError(f"{where}: hidden states of length {length} and width {width}, but the"
                     f" config has model.text_length={model_cfg.text_length} and"
                     f" model.text_width={model_cfg.text_width}: set them to the encoder's.")
  limit = np.finfo(text_dtype).max
  if np.abs(text).max() > limit:
    raise ValueError(f"{where}: text reaches {np.abs(text).max():.4g}, beyond {text_dtype}'s"
                     " range: use --text_dtype=float32.")
  spec = {"encoder": f"npz:{os.path.abspath(file)}", "npz_sha256": hidden.sha256,
          "text_length": int(length), "text_width": int(width)}
  return (lambda rows: (text[rows], mask[rows])), spec


def _image_spec(config, vae_cfg, resolution: int | None) -> dict:
  """Resolution, record shape and latent scale; checked against the config's model."""
  factor = vae_cfg.downsample_factor if vae_cfg else 1
  channels = vae_cfg.latent_channels if vae_cfg else 3
  space = "VAE latents" if vae_cfg else "pixels (no --vae)"
  if config is not None:
    model = config.model
    if resolution is None:
      resolution = model.input_size * factor
    if model.in_channels != channels:
      raise ValueError(f"the config's model.in_channels={model.in_channels}, but the records"
                       f" would hold {space} of {channels} channels; use a config (or --vae)"
                       " that matches.")
    if resolution != model.input_size * factor:
      raise ValueError(f"--resolution={resolution} gives {resolution // factor}x"
                       f"{resolution // factor} {space}, but the config's model.input_size is"
                       f" {model.input_size}: use --resolution={model.input_size * factor}.")
    if vae_cfg and abs(config.data.latent_scale - vae_cfg.scaling_factor) > 1e-9:
      raise ValueError(f"the config's data.latent_scale={config.data.latent_scale}, but"
                       f" records of {space} train at {vae_cfg.scaling_factor}: pass"
                       f" --config.data.latent_scale={vae_cfg.scaling_factor} (here and to"
                       " sgjax.train).")
  if resolution is None:
    raise ValueError("--resolution is needed without --config.")
  if resolution < 1 or resolution % factor:
    raise ValueError(f"--resolution={resolution} must be a positive multiple of the VAE's"
                     f" downsampling factor {factor}.")
  return {"resolution": resolution,
          "record_shape": [resolution // factor] * 2 + [channels],
          "latent_scale": vae_cfg.scaling_factor if vae_cfg else 1.0}


def _load_image(entry: Caption, resolution: int) -> np.ndarray:
  """ADM's center crop of the entry's image, float32 [R, R, 3] in [-1, 1]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(entry.path) as image:
      image.load()  # decode now, so a truncated file fails here
      crop = images_lib.adm_center_crop(image, resolution)
  except Exception as e:  # PIL raises many types for corrupt files
    raise ValueError(f"--captions line {entry.line}: image {entry.path!r} cannot be read"
                     f" ({type(e).__name__}: {e}); replace it and run again (complete shards"
                     " are kept).") from None
  return sources.from_uint8(crop)


def _write_shard(path: str, entries: list[Caption], rows: np.ndarray, text_fn, encode,
                 resolution: int, batch_size: int, text_dtype: str, progress) -> None:
  """Writes the records of `rows` to `path` (as path.tmp, renamed when complete)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(path + ".tmp", "group_size:1")
  for start in range(0, len(rows), batch_size):
    batch = rows[start:start + batch_size]
    images = np.stack([_load_image(entries[r], resolution) for r in batch])
    text, mask = text_fn(batch)
    if encode is None:  # pixel space: float16 holds every 8-bit pixel exactly
      fixed, posteriors = images.astype(np.float16), [{}] * len(batch)
    else:
      mean, std = latents.encode_batch(encode, images, batch_size)
      fixed, posteriors = [None] * len(batch), [{"mean": m, "std": s} for m, s in zip(mean, std)]
    for r, latent, extra, t, m in zip(batch, fixed, posteriors, text, mask):
      entry = entries[r]
      writer.write(sources.encode_latent_record(
          latent, entry.label, **extra, text=t.astype(text_dtype), mask=m.astype(bool),
          caption=np.str_(entry.caption), index=np.int64(r)))
    progress(len(batch))
  writer.close()
  os.replace(path + ".tmp", path)


def embed(captions: str, encoder: str, out: str, *, config=None, vae_dir: str | None = None,
          resolution: int | None = None, shard_size: int = 10_000, batch_size: int = 64,
          text_dtype: str = "float16", dtype: str = "float32", devices=None) -> dict:
  """The `python -m sgjax.text_embed` command as a function; returns the manifest.

  `config`: a text-to-image training config (ConfigDict, e.g. configs/t2i.py's), which sizes
  the words encoder and against which text and images are checked; None for npz text only.
  """
  # Every check, before any encoding or compilation.
  latents.check_local_out(out)
  if encoder != "words" and not (encoder.startswith("npz:") and encoder[4:]):
    raise ValueError(f"--encoder={encoder!r}: choose words or npz:FILE.")
  if encoder == "words" and config is None:
    raise ValueError("--encoder=words needs --config (e.g. configs/t2i.py:model=demo): the"
                     " encoder's vocabulary, seed, text_length and text_width come from it.")
  if text_dtype not in TEXT_DTYPES:
    raise ValueError(f"--text_dtype={text_dtype!r}: choose one of {TEXT_DTYPES}.")
  for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
    if value < 1:
      raise ValueError(f"--{name}={value} must be >= 1.")
  entries = read_captions(captions)
  model_cfg = None
  if config is not None:
    model_cfg = config_lib.model_config(config.model)
    if not model_cfg.text_conditioned:
      raise ValueError(f"the config's model.arch={config.model.get('arch', 'dit')!r} is not"
                       " text-to-image: pass a TR-DiT config such as configs/t2i.py.")
  vae_cfg = vae_lib.read_config(vae_dir, dtype) if vae_dir else None
  image_spec = _image_spec(config, vae_cfg, resolution)
  resolution = image_spec["resolution"]
  if encoder == "words":
    text_fn, text_spec = _words_text(config, entries, batch_size)
  else:
    text_fn, text_spec = _npz_text(encoder[4:], entries, model_cfg, text_dtype)
  mesh = None
  if vae_dir:  # each host encodes its own shards over its local devices
    mesh = sharding.make_mesh("data", devices=devices or jax.local_devices())
    if batch_size % sharding.data_parallel_size(mesh):
      raise ValueError(f"--batch_size={batch_size} must be divisible by the"
                       f" {sharding.data_parallel_size(mesh)} devices.")
  num_shards = -(-len(entries) // shard_size)
  spec = {**text_spec, "text_dtype": text_dtype, **image_spec,
          "vae": os.path.abspath(vae_dir) if vae_dir else None,
          "vae_config": vars(vae_cfg) if vae_cfg else None,
          "captions_sha256": hashlib.sha256(json.dumps(  # moving the files changes nothing
              [(e.image, e.caption, e.label) for e in entries]).encode()).hexdigest(),
          "labels": entries[0].label is not None, "num_captions": len(entries),
          "num_shards": num_shards, "shard_size": shard_size}
  os.makedirs(out, exist_ok=True)
  if (not os.path.exists(os.path.join(out, "spec.json"))
      and any(not name.endswith(".tmp") for name in os.listdir(out))):
    raise ValueError(f"--out={out!r} is not empty and holds no spec.json of this command:"
                     " use an empty or new folder.")
  latents.check_same_run(out, spec)

  mine = range(jax.process_index(), num_shards, jax.process_count())
  todo = [k for k in mine if not os.path.exists(latents.shard_path(out, k, num_shards))]
  if len(todo) < len(mine):
    logging.info("resuming: %d of this host's %d shards are complete", len(mine) - len(todo),
                 len(mine))
  encode = vae_lib.batch_codec(vae_lib.load(vae_dir, dtype), mesh)[0] if vae_dir else None
  shard_rows = lambda k: np.arange(k * shard_size, min((k + 1) * shard_size, len(entries)))
  progress = latents.Progress(sum(len(shard_rows(k)) for k in todo))
  for k in todo:
    _write_shard(latents.shard_path(out, k, num_shards), entries, shard_rows(k), text_fn,
                 encode, resolution, batch_size, text_dtype, progress)
  multihost_utils.sync_global_devices("sgjax.text_embed: shards written")
  shards = sorted(glob.glob(os.path.join(out, "train-*.array_record")))
  manifest = {**spec, "captions": os.path.abspath(captions),
              "num_records": sum(len(sources.LatentSource(s, 1.0)) for s in shards),
              "shards": [os.path.basename(s) for s in shards]}
  if jax.process_index() == 0:
    with open(os.path.join(out, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
  logging.info("%d records in %d shards -> %s", manifest["num_records"], len(shards), out)
  return manifest


def define_flags() -> None:
  flags.DEFINE_string("captions", None, "JSON Lines file: one {\"image\": PATH, \"caption\":"
                      " STR} a line (optional integer \"label\"); PATH relative to its folder.")
  flags.DEFINE_string("encoder", None, "words (the config's built-in word encoder) or npz:FILE"
                      " (hidden states of an external encoder: text, mask, captions).")
  config_flags.DEFINE_config_file("config", None, "Text-to-image config the records are for:"
                                  " configs/NAME.py[:arg] (needed by --encoder=words).",
                                  lock_config=True)
  flags.DEFINE_string("out", None, "Output folder for the shards and manifest.json.")
  flags.DEFINE_string("vae", None, "diffusers AutoencoderKL folder: store VAE posteriors"
                      " (default: pixels in [-1, 1]).")
  flags.DEFINE_integer("resolution", None, "Image side after ADM's center crop (default: the"
                       " config's model.input_size, times the VAE's downsampling).")
  flags.DEFINE_integer("shard_size", 10_000, "Records per shard (the unit of resumption).")
  flags.DEFINE_integer("batch_size", 64, "Images and captions per encoder batch.")
  flags.DEFINE_enum("text_dtype", "float16", list(TEXT_DTYPES), "Stored hidden states.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "VAE compute dtype.")
  distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize_from_flags()
  logs.quiet_libraries()
  embed(FLAGS.captions, FLAGS.encoder, FLAGS.out, config=FLAGS.config, vae_dir=FLAGS.vae,
        resolution=FLAGS.resolution, shard_size=FLAGS.shard_size, batch_size=FLAGS.batch_size,
        text_dtype=FLAGS.text_dtype, dtype=FLAGS.dtype)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["captions", "encoder", "out"])
  cli.run(main)
