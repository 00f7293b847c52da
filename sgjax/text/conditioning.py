"""Text conditioning of text-to-image runs: the frozen encoder a config names, captions to
token ids on the host, and the conditioning {"text", "mask"} of a batch (`sgjax.models.trdit`).

config.text.encoder:
- "words": the built-in tiny frozen encoder (`sgjax.text.words`) over the space-separated
  words of config.text.vocabulary; captions become token ids in the input pipeline and are
  encoded inside the jitted train step.
- "precomputed": the data records already hold the hidden states ("text") and their mask
  (`python -m sgjax.text_embed`); sampling takes the prompts' hidden states from an .npz of the
  same encoder (`PrecomputedText`, e.g. written by launch/embed_captions_hf.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io

import jax
import jax.numpy as jnp
import numpy as np

from sgjax import paths

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


@dataclasses.dataclass(frozen=True, eq=False)
class PrecomputedText:
  """Captions and the hidden states an external encoder gave them: `text` [P, L, D] float,
  `mask` [P, L] bool (True on real tokens), `captions` [P] str."""

  captions: tuple[str, ...]
  text: np.ndarray
  mask: np.ndarray
  sha256: str  # of the file: what a resumed job compares

  def rows(self, captions, where: str) -> np.ndarray:
    """The row of each caption; refuses captions the file does not hold."""
    index = {caption: row for row, caption in enumerate(self.captions)}
    missing = [c for c in captions if c not in index]
    if missing:
      raise ValueError(f"{where} holds no hidden states for the prompt {missing[0]!r}"
                       f" ({len(missing)} missing): encode every prompt with the run's encoder"
                       " (launch/embed_captions_hf.py).")
    return np.array([index[c] for c in captions], np.int64)


def load_hidden_states(path: str, where: str) -> PrecomputedText:
  """An .npz of `text`, `mask` and `captions` (no pickled objects), checked: shapes agree,
  every mask row holds a token (an all-False row is the null caption), text is finite."""
  try:
    raw = paths.resolve(path).read_bytes()
    data = dict(np.load(io.BytesIO(raw)))
  except FileNotFoundError:
    raise FileNotFoundError(f"{where}: no such file.") from None
  except ValueError as e:  # an object array (needs pickle) or a file that is no .npz
    raise ValueError(f"{where} is not an .npz of plain arrays ({e}); save captions as"
                     " np.array(captions, dtype=str).") from None
  missing = sorted({"text", "mask", "captions"} - set(data))
  if missing:
    raise ValueError(f"{where} lacks {missing} (it has {sorted(data)}): write text [N, L, D],"
                     " mask [N, L] and captions [N] (see launch/embed_captions_hf.py).")
  text, mask, captions = data["text"], data["mask"], data["captions"]
  if not len(text):
    raise ValueError(f"{where} holds no caption (0 rows of text).")
  if text.ndim != 3 or not np.issubdtype(text.dtype, np.floating):
    raise ValueError(f"{where}: text is {text.dtype} {text.shape}; expected float [N, L, D].")
  if mask.shape != text.shape[:2] or mask.dtype != bool:
    raise ValueError(f"{where}: mask is {mask.dtype} {mask.shape}; expected bool"
                     f" {text.shape[:2]} (N, L of text).")
  if captions.shape != (len(text),) or captions.dtype.kind != "U":
    raise ValueError(f"{where}: captions is {captions.dtype} {captions.shape}; expected str"
                     f" ({len(text)},), one per row of text.")
  empty = np.flatnonzero(~mask.any(1))
  if len(empty):
    raise ValueError(f"{where}: mask row {empty[0]} is all False, which the model reads as the"
                     " null caption; every caption needs at least one token.")
  bad = np.flatnonzero(~np.isfinite(text).all(axis=(1, 2)))
  if len(bad):
    raise ValueError(f"{where}: text row {bad[0]} holds NaN or inf ({len(bad)} rows): float16"
                     " overflows for some encoders; write float32 (embed_captions_hf.py"
                     " --dtype=float32).")
  return PrecomputedText(tuple(str(c) for c in captions), text, mask,
                         hashlib.sha256(raw).hexdigest())


def encode_captions(encoder: words.WordEncoder | PrecomputedText,
                    captions) -> dict[str, jax.Array]:
  """Captions -> the conditioning of sampling, {"text" [B, L, D], "mask" [B, L]}."""
  if isinstance(encoder, PrecomputedText):
    rows = encoder.rows(captions, "the precomputed text")
    return {"text": jnp.asarray(encoder.text[rows], jnp.float32),
            "mask": jnp.asarray(encoder.mask[rows])}
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
