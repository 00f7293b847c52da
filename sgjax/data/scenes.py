"""Two-digit scenes with captions: a small compositional text-to-image task (GenEval-like).

A scene is a 16x16 RGB canvas cut into 2x2 cells of 8x8. Exactly two cells hold a digit of
scikit-learn's bundled set (`sources.digits_split`), each drawn in one palette colour
(pixel = grey / 255 * colour, uint8); the other two cells are 0. The two digits share a row
or a column, and the caption says which is where:

  "a red 3 left of a blue 7"  ->  the red 3 and the blue 7 share a row (top or bottom, drawn
                                   at random), the red 3 in the left cell;
  "a green 0 above a green 0" ->  the two share a column (either), the first in the top cell.

Digits and colours of the two objects may coincide. Captions have exactly the form
"a {colour} {digit} {relation} a {colour} {digit}" (see `caption`, `parse_caption`), so a
word-level tokenizer over `VOCABULARY` covers them all. There are 10 * 4 * 4 * 10 * 4 = 6400
distinct captions; each has 2 placements times any choice of digit examples.

Everything random comes from an explicit `np.random.Generator`; `SceneSource` item i is a
pure function of (seed, i), so a pipeline may read items in any order, on any host.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from sgjax.data import sources

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0)}
COLOUR_NAMES = tuple(COLOURS)
RELATIONS = ("left of", "right of", "above", "below")
DIGITS = tuple(str(d) for d in range(10))
CELL = 8  # side of one cell in pixels
IMAGE_SHAPE = (2 * CELL, 2 * CELL, 3)
NUM_CAPTIONS = len(DIGITS)**2 * len(COLOURS)**2 * len(RELATIONS)

# Every word a caption uses, each once, in a fixed order ("left of" is two words).
VOCABULARY = tuple(dict.fromkeys(
    ("a",) + COLOUR_NAMES + DIGITS + tuple(w for r in RELATIONS for w in r.split())))

_WORDS = lambda names: "|".join(re.escape(n) for n in names)
_CAPTION_RE = re.compile(
    rf"a ({_WORDS(COLOUR_NAMES)}) ([0-9]) ({_WORDS(RELATIONS)}) a ({_WORDS(COLOUR_NAMES)})"
    r" ([0-9])")
_CAPTION_FORM = ("'a {colour} {digit} {relation} a {colour} {digit}' with colour in"
                 f" {COLOUR_NAMES}, digit 0..9 and relation in {RELATIONS}, single spaces")


@dataclasses.dataclass(frozen=True)
class Scene:
  """What a caption asks for: object a (digit, colour) in `relation` to object b."""

  digit_a: int
  colour_a: str
  relation: str
  digit_b: int
  colour_b: str

  def __post_init__(self):
    for name in ("digit_a", "digit_b"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
          0 <= value <= 9):
        raise ValueError(f"Scene.{name}={value!r}: a digit is an int in 0..9.")
    for name in ("colour_a", "colour_b"):
      if getattr(self, name) not in COLOURS:
        raise ValueError(f"Scene.{name}={getattr(self, name)!r}: choose one of"
                         f" {COLOUR_NAMES}.")
    if self.relation not in RELATIONS:
      raise ValueError(f"Scene.relation={self.relation!r}: choose one of {RELATIONS}.")


def caption(scene: Scene) -> str:
  """"a {colour_a} {digit_a} {relation} a {colour_b} {digit_b}", digits as numerals."""
  return (f"a {scene.colour_a} {int(scene.digit_a)} {scene.relation} a {scene.colour_b}"
          f" {int(scene.digit_b)}")


def parse_caption(text: str) -> Scene:
  """The Scene a caption describes; anything not exactly of caption()'s form is an error."""
  match = _CAPTION_RE.fullmatch(text) if isinstance(text, str) else None
  if match is None:
    raise ValueError(f"caption {text!r} is not of the form {_CAPTION_FORM}, e.g."
                     " 'a red 3 left of a blue 7'.")
  colour_a, digit_a, relation, colour_b, digit_b = match.groups()
  return Scene(int(digit_a), colour_a, relation, int(digit_b), colour_b)


def random_scene(rng: np.random.Generator) -> Scene:
  """A scene uniform over digits, colours and relations (each drawn independently)."""
  digit_a, colour_a, relation, digit_b, colour_b = (
      int(rng.integers(n)) for n in (10, len(COLOURS), len(RELATIONS), 10, len(COLOURS)))
  return Scene(digit_a, COLOUR_NAMES[colour_a], RELATIONS[relation], digit_b,
               COLOUR_NAMES[colour_b])


def scene_from_index(index: int) -> Scene:
  """The index-th of the NUM_CAPTIONS distinct scenes (a fixed enumeration)."""
  if not 0 <= index < NUM_CAPTIONS:
    raise ValueError(f"scene index {index} is outside [0, {NUM_CAPTIONS}).")
  index, colour_b = divmod(int(index), len(COLOURS))
  index, digit_b = divmod(index, 10)
  index, relation = divmod(index, len(RELATIONS))
  digit_a, colour_a = divmod(index, len(COLOURS))
  return Scene(digit_a, COLOUR_NAMES[colour_a], RELATIONS[relation], digit_b,
               COLOUR_NAMES[colour_b])


def cell_position(cell: int) -> tuple[int, int]:
  """Cell index 0..3 (reading order) -> (row, column), row 0 on top, column 0 on the left."""
  return divmod(int(cell), 2)


def placement(relation: str, rng: np.random.Generator) -> tuple[int, int]:
  """Cells (0..3, reading order) of objects a and b for `relation`: the shared row (or
  column) is drawn at random, the order within it is fixed by the relation."""
  if relation not in RELATIONS:
    raise ValueError(f"relation={relation!r}: choose one of {RELATIONS}.")
  line = int(rng.integers(2))  # which row (left/right) or column (above/below)
  first, second = ((2 * line, 2 * line + 1) if relation in ("left of", "right of")
                   else (line, line + 2))
  return (first, second) if relation in ("left of", "above") else (second, first)


def _check_pool(digit_images: np.ndarray, digit_labels: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  images, labels = np.asarray(digit_images), np.asarray(digit_labels).reshape(-1)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  if images.shape[1:] != (CELL, CELL) or images.dtype != np.uint8:
    raise ValueError(f"digit_images must be uint8 [N, 8, 8] or [N, 8, 8, 1] (as"
                     f" sources.digits_split gives), got {images.dtype} {images.shape}.")
  if len(labels) != len(images):
    raise ValueError(f"{len(labels)} digit_labels for {len(images)} digit_images.")
  return images, labels


def render(scene: Scene, digit_images: np.ndarray, digit_labels: np.ndarray,
           rng: np.random.Generator) -> np.ndarray:
  """The scene as uint8 [16, 16, 3]: a random example of each digit from the pool
  (digit_images uint8 [N, 8, 8(, 1)], digit_labels [N]) in a random valid placement."""
  images, labels = _check_pool(digit_images, digit_labels)
  canvas = np.zeros(IMAGE_SHAPE, np.uint8)
  examples = []
  for digit in (scene.digit_a, scene.digit_b):
    candidates = np.flatnonzero(labels == digit)
    if not len(candidates):
      raise ValueError(f"the digit pool has no example of digit {digit}; pass a pool with"
                       " all ten digits (e.g. sources.digits_split('train')).")
    examples.append(images[rng.choice(candidates)])
  cells = placement(scene.relation, rng)
  for grey, colour, cell in zip(examples, (scene.colour_a, scene.colour_b), cells):
    row, col = cell_position(cell)
    # grey * colour / 255 rounded down; exact (= grey) on the channels at 255.
    tinted = grey[..., None].astype(np.uint32) * np.array(COLOURS[colour], np.uint32) // 255
    canvas[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = tinted
  return canvas


def render_captions(captions: Sequence[str], split: str = "heldout", seed: int = 0
                    ) -> np.ndarray:
  """Real scenes for the given captions, uint8 [N, 16, 16, 3]; image j is drawn with
  np.random.default_rng([seed, j]) from the digits of `split` (a reference for metrics)."""
  images, labels = sources.digits_split(split)
  out = np.zeros((len(captions),) + IMAGE_SHAPE, np.uint8)
  for j, text in enumerate(captions):
    out[j] = render(parse_caption(text), images, labels, np.random.default_rng([seed, j]))
  return out


def prompt_set(num_prompts: int, seed: int) -> list[str]:
  """`num_prompts` distinct captions drawn uniformly without replacement (fixed per seed)."""
  if not 1 <= num_prompts <= NUM_CAPTIONS:
    raise ValueError(f"num_prompts={num_prompts}: there are {NUM_CAPTIONS} distinct captions;"
                     f" ask for 1..{NUM_CAPTIONS}.")
  rng = np.random.default_rng([seed, 0x5CE7E])  # apart from SceneSource's streams
  return [caption(scene_from_index(i)) for i in rng.choice(NUM_CAPTIONS, num_prompts,
                                                           replace=False)]


class SceneSource:
  """`size` virtual captioned scenes over the digits of `split` ('train' | 'heldout').

  Item i is {"image": float32 [16, 16, 3] in [-1, 1], "caption": str}, a pure function of
  (seed, i): scene and rendering both draw from np.random.default_rng([seed, i]).
  """

  def __init__(self, split: str, size: int, seed: int):
    if size < 1:
      raise ValueError(f"SceneSource size={size}: need at least one scene.")
    if seed < 0:
      raise ValueError(f"SceneSource seed={seed}: numpy seeds are non-negative ints.")
    self.split, self.size, self.seed = split, int(size), int(seed)
    self._images, self._labels = _check_pool(*sources.digits_split(split))

  def __len__(self) -> int:
    return self.size

  def _rng(self, i: int) -> np.random.Generator:
    if not 0 <= i < self.size:
      raise IndexError(f"scene index {i} is outside [0, {self.size}).")
    return np.random.default_rng([self.seed, int(i)])

  def scene(self, i: int) -> Scene:
    """The Scene of item i (without rendering it)."""
    return random_scene(self._rng(i))

  def captions(self, indices: Sequence[int]) -> list[str]:
    """The captions of the given items, cheaply (no rendering)."""
    return [caption(self.scene(i)) for i in indices]

  def __getitem__(self, i):
    rng = self._rng(i)
    scene = random_scene(rng)
    image = render(scene, self._images, self._labels, rng)
    return {"image": sources.from_uint8(image), "caption": caption(scene)}
