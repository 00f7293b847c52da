"""Text conditioning of text-to-image runs: the frozen encoder a config names, captions to
token ids on the host, and the conditioning {"text", "mask"} of a batch (`sgjax.models.trdit`).

config.text.encoder:
- "words": the built-in tiny frozen encoder (`sgjax.text.words`) over the space-separated
  words of config.text.vocabulary; captions become token ids in the input pipeline and are
  encoded inside the jitted train step.
- "precomputed": the data records already hold the hidden states ("text") and their mask.
"""

from __future__ import annotations

import jax
import numpy as np

from sgjax.text import words

ENCODERS = ("words", "precomputed")


def make_encoder(text_cfg, model_cfg) -> words.WordEncoder | None:
  """The frozen encoder of config.text (a ConfigDict or the dict of a run's config.json),
  sized for the model; None for precomputed text."""
  kind = text_cfg["encoder"]
  if kind == "precomputed":
    return None
  if kind != "words":
    raise ValueError(f"text.encoder={kind!r}: choose one of {ENCODERS}.")
  vocabulary = tuple(text_cfg["vocabulary"].split())
  if not vocabulary:
    raise ValueError("text.vocabulary is empty: the built-in encoder needs the words captions"
                     " may use, separated by spaces.")
  if model_cfg.text_width % 2:
    raise ValueError(f"model.text_width={model_cfg.text_width} must be even for the built-in"
                     " encoder (sin-cos positions).")
  return words.WordEncoder(vocabulary, width=model_cfg.text_width,
                           max_length=model_cfg.text_length, seed=text_cfg["seed"])


def condition_fn(encoder: words.WordEncoder | None):
  """batch -> the model's conditioning {"text", "mask"}; traceable (the train step)."""

  def condition(batch):
    if encoder is None:
      return {"text": batch["text"], "mask": batch["mask"]}
    return {"text": encoder.encode(batch["tokens"], batch["mask"]), "mask": batch["mask"]}

  return condition


def encode_captions(encoder: words.WordEncoder, captions) -> dict[str, jax.Array]:
  """Captions -> the conditioning of sampling, {"text" [B, L, D], "mask" [B, L]}."""
  ids, mask = encoder.tokenize(captions)
  return {"text": jax.jit(encoder.encode)(ids, mask), "mask": mask}


class TokenizedSource:
  """A caption source ({"image", "caption"} items) with captions turned into token ids."""

  def __init__(self, source, encoder: words.WordEncoder):
    self._source, self._encoder = source, encoder

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    item = dict(self._source[i])
    ids, mask = self._encoder.tokenize(item.pop("caption"))
    return {**item, "tokens": ids[0], "mask": mask[0]}


def check_batch(batch: dict, model_cfg, where: str) -> None:
  """Raises ValueError, naming the problem, when the text of a batch does not fit the model."""
  if "text" in batch:
    shape = tuple(np.shape(batch["text"])[1:])
    expected = (model_cfg.text_length, model_cfg.text_width)
    if shape != expected:
      raise ValueError(f"{where}: text hidden states of shape {shape}, but the model takes"
                       f" {expected} (model.text_length, model.text_width): set them to the"
                       " encoder's padded length and hidden width.")
  elif "tokens" not in batch:
    raise ValueError(f"{where}: holds neither captions nor text hidden states ('text');"
                     " a text-to-image model needs one of them.")
  if np.shape(batch["mask"])[1:] != (model_cfg.text_length,):
    raise ValueError(f"{where}: text mask of shape {np.shape(batch['mask'])[1:]}, expected"
                     f" ({model_cfg.text_length},).")
