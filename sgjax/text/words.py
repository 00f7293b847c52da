"""The built-in tiny frozen text encoder: words of a fixed vocabulary -> fixed vectors.

Each word of the vocabulary has a fixed random vector (N(0, 1/width), drawn from `seed`);
a caption's hidden states are its words' vectors plus 1D sin-cos positions, padded with
zeros to `max_length`. It has no parameters to train and needs no download, so the
compositional digits demo runs anywhere; the words' context comes from TR-DiT's trainable
text refiner. Captions with a word outside the vocabulary, or more than `max_length` words,
are refused (never silently truncated).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class WordEncoder:
  """tokenize (host) -> ids, mask; encode (jittable) -> hidden states [B, max_length, width]."""

  vocabulary: tuple[str, ...]
  width: int = 64
  max_length: int = 12
  seed: int = 0

  @functools.cached_property
  def _index(self) -> dict[str, int]:
    return {word: i for i, word in enumerate(self.vocabulary)}

  def tokenize(self, captions) -> tuple[np.ndarray, np.ndarray]:
    """captions (str or a list) -> (ids int32 [B, max_length], mask bool [B, max_length])."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    ids = np.zeros((len(captions), self.max_length), np.int32)
    mask = np.zeros((len(captions), self.max_length), bool)
    for row, caption in enumerate(captions):
      words = caption.lower().split()
      if len(words) > self.max_length:
        raise ValueError(f"caption {caption!r} has {len(words)} words; the built-in encoder"
                         f" takes at most {self.max_length} (model.text_length): shorten it.")
      unknown = sorted({w for w in words if w not in self._index})
      if unknown:
        raise ValueError(f"caption {caption!r}: word(s) {unknown} are not in the built-in"
                         f" encoder's vocabulary {list(self.vocabulary)}.")
      ids[row, :len(words)] = [self._index[w] for w in words]
      mask[row, :len(words)] = True
    return ids, mask

  def encode(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids, mask [B, L] -> hidden states float32 [B, L, width] (zero at padding)."""
    table = np.random.default_rng(self.seed).standard_normal(
        (len(self.vocabulary), self.width)).astype(np.float32) / np.sqrt(self.width)
    freqs = 1.0 / 10000 ** (np.arange(self.width // 2) / (self.width // 2))
    angles = np.arange(self.max_length)[:, None] * freqs[None]
    positions = np.concatenate([np.sin(angles), np.cos(angles)], -1).astype(np.float32)
    hidden = jnp.asarray(table)[ids] + positions[:ids.shape[1]] / np.sqrt(self.width)
    return jnp.where(mask[..., None], hidden, 0.0)
