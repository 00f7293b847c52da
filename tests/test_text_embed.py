"""sgjax.text_embed: captioned images -> text-to-image records (word encoder or an external
encoder's hidden states), read back and trained on; bad input refused up front; resumption."""

import json
import os
import types

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import t2i
from sgjax import checkpoint, config as config_lib, guidance as guidance_lib, sample, sampling
from sgjax import text_embed, train
from sgjax.data import images as images_lib
from sgjax.data import scenes, sources
from sgjax.models import vae as vae_lib
from sgjax.text import conditioning
from tests import helpers

CONFIG_ARG = "model=demo,runlocal"  # 16x16x3 pixels, text_length 8, text_width 16
NUM = 12
VAE_DIR = os.path.join(helpers.ROOT, "tests", "parity", "fixtures", "vae", "vae")


def write_dataset(root, labels: bool = False):
  """NUM scene PNGs and their captions.jsonl (a blank line, one absolute path, image 1 of
  another size to crop) -> (captions file, captions, the expected uint8 [NUM, 16, 16, 3])."""
  captions = scenes.prompt_set(NUM, seed=0)
  pixels = scenes.render_captions(captions)
  os.makedirs(root / "img")
  lines = []
  for i, (caption, image) in enumerate(zip(captions, pixels)):
    name = f"img/{i}.png"
    pil = Image.fromarray(image)
    if i == 1:
      pil = pil.resize((40, 28), Image.Resampling.NEAREST)
      pixels[i] = images_lib.adm_center_crop(pil, 16)
    pil.save(root / name)
    lines.append(json.dumps({"image": str(root / name) if i == 2 else name, "caption": caption,
                             **({"label": i % 3} if labels else {})}))
  path = root / "captions.jsonl"
  path.write_text("\n".join(lines[:4] + [""] + lines[4:]) + "\n")
  return str(path), captions, pixels


def read_back(out):
  """Every record of OUT, through the training source, plus the stored captions."""
  source = sources.LatentSource(os.path.join(out, "train-*.array_record"), 1.0)
  stacked = {k: np.stack([source[i][k] for i in range(len(source))]) for k in source[0]}
  stacked["caption"] = [str(c) for c in helpers.latent_records(out, "caption")]
  stacked["index"] = np.stack(helpers.latent_records(out, "index"))
  return stacked


def hidden_states(captions, seed=0):
  """An external encoder's arrays for `captions`: text float16 [N, 8, 16], mask [N, 8]."""
  rng = np.random.default_rng(seed)
  mask = np.arange(8) < 1 + np.arange(len(captions))[:, None] % 8
  return {"text": rng.standard_normal((len(captions), 8, 16)).astype(np.float16),
          "mask": mask, "captions": np.array(captions, dtype=str)}


def test_word_encoder_records_read_back_exactly_train_and_sample_from_an_npz(tmp_path):
  captions_file, captions, pixels = write_dataset(tmp_path)
  config = t2i.get_config(CONFIG_ARG)
  out = str(tmp_path / "out")
  manifest = text_embed.embed(captions_file, "words", out, config=config, shard_size=5,
                              batch_size=4)
  assert manifest["num_records"] == NUM and len(manifest["shards"]) == 3
  assert (manifest["text_length"], manifest["text_width"], manifest["resolution"]) == (8, 16, 16)
  assert manifest["latent_scale"] == 1.0 and manifest["vae"] is None
  records = read_back(out)
  # The encoding sampling gives each caption, computed here on its own.
  encoder = conditioning.make_encoder(config.text, config_lib.model_config(config.model))
  expected = conditioning.encode_captions(encoder, captions)
  chex.assert_trees_all_equal(records["text"], np.asarray(expected["text"], np.float16))
  chex.assert_trees_all_equal(records["mask"], np.asarray(expected["mask"]))
  chex.assert_trees_all_equal(sources.to_uint8(records["image"]), pixels)
  chex.assert_trees_all_close(records["image"], sources.from_uint8(pixels), atol=2e-3)
  assert records["caption"] == captions and list(records["index"]) == list(range(NUM))
  assert "label" not in records

  config.data.update(source="records", path=os.path.join(out, "train-*.array_record"))
  config.text.encoder = "precomputed"
  config.train.update(steps=2, ckpt_every=2, batch_size=8)
  metrics = train.train(config, str(tmp_path / "run"))
  assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()

  # Sampling the precomputed-text run: the prompts' hidden states come from an npz.
  prompts = captions[3:5]
  np.savez(tmp_path / "prompts.npz", captions=np.array(prompts, dtype=str),
           text=np.asarray(expected["text"])[3:5], mask=np.asarray(expected["mask"])[3:5])
  hidden = conditioning.load_hidden_states(str(tmp_path / "prompts.npz"), "prompts.npz")
  chex.assert_trees_all_equal(  # each prompt's own row (a 2-step model barely reads text)
      conditioning.encode_captions(hidden, [prompts[1], prompts[0], prompts[0]]),
      {"text": np.asarray(expected["text"], np.float32)[[4, 3, 3]],
       "mask": np.asarray(expected["mask"])[[4, 3, 3]]})
  guidance = guidance_lib.GuidanceConfig("sg", omega=2.0, gamma_weak=0.5)
  summary = sample.run(str(tmp_path / "run"), guidance, str(tmp_path / "samples"), steps=2,
                       num_samples=8, batch_size=8, text_npz=str(tmp_path / "prompts.npz"))
  assert summary["labels"] == "2 prompts"
  with np.load(tmp_path / "samples" / "samples.npz") as data:
    assert list(data["arr_1"]) == prompts * 4
    images = data["arr_0"]
  mesh = sample.sampling_mesh(8)
  model, _, _ = checkpoint.load_model(str(tmp_path / "run"), None, True, mesh)
  rows = np.array([3, 4] * 4)
  cond = {"text": jnp.asarray(expected["text"])[rows], "mask": jnp.asarray(expected["mask"])[rows]}
  by_hand = sampling.Sampler(model, guidance, steps=2, mesh=mesh)(
      cond, jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 1), 0))
  chex.assert_trees_all_equal(images, sources.to_uint8(np.asarray(by_hand)))
  for kwargs, message in (({}, "give the prompts' hidden states .* --text_npz"),
                          ({"prompts": ["a red 3 above a red 4"]}, "no hidden states for the"
                           " prompt 'a red 3 above a red 4'")):
    with pytest.raises(ValueError, match=message):
      sample.run(str(tmp_path / "run"), guidance, str(tmp_path / "bad"), steps=2,
                 num_samples=8, batch_size=8,
                 **({"text_npz": str(tmp_path / "prompts.npz")} if kwargs else {}), **kwargs)


def test_npz_hidden_states_are_packed_exactly_through_the_command(tmp_path):
  captions_file, captions, pixels = write_dataset(tmp_path, labels=True)
  arrays = hidden_states(captions)
  np.savez(tmp_path / "enc.npz", **arrays)
  out = tmp_path / "out"
  result = helpers.run_command(
      "sgjax.text_embed", f"--captions={captions_file}", f"--encoder=npz:{tmp_path}/enc.npz",
      f"--config=configs/t2i.py:{CONFIG_ARG}", f"--out={out}", "--shard_size=7",
      "--text_dtype=float32")
  assert result.returncode == 0, result.stderr[-3000:]
  records = read_back(str(out))
  chex.assert_trees_all_equal(records["text"], arrays["text"].astype(np.float32))
  chex.assert_trees_all_equal(records["mask"], arrays["mask"])
  chex.assert_trees_all_equal(records["label"], np.arange(NUM, dtype=np.int32) % 3)
  chex.assert_trees_all_equal(sources.to_uint8(records["image"]), pixels)
  assert records["caption"] == captions
  with open(out / "manifest.json") as f:
    manifest = json.load(f)
  assert manifest["encoder"] == f"npz:{tmp_path}/enc.npz" and manifest["num_records"] == NUM
  assert manifest["labels"] and manifest["text_dtype"] == "float32"


def test_vae_records_hold_the_posterior_of_the_cropped_image(tmp_path):
  captions_file, captions, pixels = write_dataset(tmp_path)
  np.savez(tmp_path / "enc.npz", **hidden_states(captions))
  manifest = text_embed.embed(captions_file, f"npz:{tmp_path}/enc.npz", str(tmp_path / "out"),
                              vae_dir=VAE_DIR, resolution=16, batch_size=8)
  assert manifest["record_shape"] == [8, 8, 4] and manifest["latent_scale"] == 0.18215
  records = read_back(str(tmp_path / "out"))
  mean, std = vae_lib.load(VAE_DIR).encode(jnp.asarray(sources.from_uint8(pixels)))
  chex.assert_trees_all_close((records["image"], records["std"]), (mean, std), atol=1e-5)
  pattern = str(tmp_path / "out" / "train-*.array_record")
  with pytest.raises(ValueError, match="holds VAE posteriors .* data.source=latents"):
    sources.make_source(ml_collections.ConfigDict({"source": "records", "path": pattern}))


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)


def _replace_line(path, number, text):
  with open(path) as f:
    lines = f.read().splitlines()
  lines[number - 1] = text
  _write(path, "\n".join(lines) + "\n")


def _npz(d, **changes):
  np.savez(d.npz, **{**hidden_states(d.captions), **changes})
  return {"encoder": f"npz:{d.npz}"}


# (change the inputs -> embed kwargs, message); d: captions_file, captions, npz, config, root.
BAD_INPUTS = {
    "empty captions file": (lambda d: _write(d.captions_file, "\n  \n"), "holds no captions"),
    "malformed line": (lambda d: _replace_line(d.captions_file, 3, '{"image": "img/2.png",'),
                       "line 3 is not JSON"),
    "line without caption": (lambda d: _replace_line(d.captions_file, 6, '{"image": "x.png"}'),
                             r"line 6: .*x.png.* is not \{\"image\""),
    "missing image": (lambda d: os.remove(d.root / "img" / "7.png"),
                      r"line 9: image '.*img/7.png' does not exist \(1 missing"),
    "caption too long": (lambda d: _replace_line(
        d.captions_file, 2, json.dumps({"image": "img/1.png", "caption": "a " * 9})),
                         r"line 2: caption 'a a .* has 9 words.*at most 8"),
    "unknown word": (lambda d: _replace_line(
        d.captions_file, 1, json.dumps({"image": "img/0.png", "caption": "a purple 3"})),
                     r"line 1: caption 'a purple 3': word\(s\) \['purple'\]"),
    "words without config": (lambda d: {"config": None}, "--encoder=words needs --config"),
    "npz text and mask disagree": (lambda d: _npz(d, text=hidden_states(d.captions)["text"][1:]),
                 "mask is bool .* expected bool"),
    "npz row count": (lambda d: _npz(d, **hidden_states(d.captions[1:])),
                      "holds 11 rows for the 12 captions"),
    "npz captions shifted": (lambda d: _npz(d, captions=np.array(d.captions[1:] + d.captions[:1])),
                             "row 0 is the caption .* line 1 says .*12 rows differ"),
    "npz width": (lambda d: _npz(d, text=np.zeros((NUM, 8, 12), np.float32)),
                  r"width 12, but the config has .*model.text_width=16"),
    "npz empty mask": (lambda d: _npz(d, mask=np.arange(8) < np.arange(NUM)[:, None]),
                       "mask row 0 is all False"),
    "npz captions pickled": (lambda d: _npz(d, captions=np.array(d.captions, dtype=object)),
                             "not an .npz of plain arrays"),
    "channels": (lambda d: d.config.model.update(in_channels=4) or {},
                 "model.in_channels=4, but the records would hold pixels"),
    "resolution": (lambda d: {"resolution": 32}, "--resolution=32 .*use --resolution=16"),
    "gs out": (lambda d: {"out": "gs://bucket/t2i"}, "written as local files"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, case):
  captions_file, captions, _ = write_dataset(tmp_path)
  d = types.SimpleNamespace(captions_file=captions_file, captions=captions, root=tmp_path,
                            npz=str(tmp_path / "enc.npz"), config=t2i.get_config(CONFIG_ARG))
  change, message = BAD_INPUTS[case]
  kwargs = {"encoder": "words", "out": str(tmp_path / "out"), "config": d.config,
            **(change(d) or {})}
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    text_embed.embed(captions_file, **kwargs)
  assert not os.path.exists(tmp_path / "out")


def test_rerun_skips_complete_shards_and_other_settings_are_refused(tmp_path):
  captions_file, captions, _ = write_dataset(tmp_path)
  np.savez(tmp_path / "enc.npz", **hidden_states(captions))
  out = str(tmp_path / "out")
  run = lambda **kw: text_embed.embed(captions_file, f"npz:{tmp_path}/enc.npz", out,
                                      resolution=16, **{"shard_size": 5, **kw})
  first = run()
  shards = [os.path.join(out, name) for name in first["shards"]]
  stamp = lambda p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns)
  before = {p: stamp(p) for p in shards}
  records = read_back(out)
  os.remove(shards[1])  # as if stopped while writing it
  with open(shards[1] + ".tmp", "wb") as f:
    f.write(b"half a shard")
  assert run() == first
  assert [stamp(p) == before[p] for p in shards] == [True, False, True]
  assert not os.path.exists(shards[1] + ".tmp")
  again = read_back(out)
  assert again.pop("caption") == records.pop("caption")
  chex.assert_trees_all_equal(again, records)

  with pytest.raises(ValueError, match=r"other settings \(\['num_shards', 'shard_size'\]\)"):
    run(shard_size=6)
  np.savez(tmp_path / "enc.npz", **hidden_states(captions, seed=1))  # other hidden states
  with pytest.raises(ValueError, match=r"other settings \(\['npz_sha256'\]\)"):
    run()
  _replace_line(captions_file, 1, json.dumps({"image": "img/0.png", "caption": captions[1]}))
  np.savez(tmp_path / "enc.npz", **hidden_states([captions[1]] + captions[1:]))
  with pytest.raises(ValueError,
                     match=r"other settings \(\['captions_sha256', 'npz_sha256'\]\)"):
    run()
  os.makedirs(tmp_path / "other")
  (tmp_path / "other" / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="not empty and holds no spec.json"):
    text_embed.embed(captions_file, f"npz:{tmp_path}/enc.npz", str(tmp_path / "other"),
                     resolution=16)
