"""GenEval analogue for the two-digit scenes (`sgjax.data.scenes`): does an image show what
its caption asks for?

Per image uint8 [16, 16, 3]:
1. Cut into the 4 cells (reading order). A cell's grey image is the max over channels
   (= the digit's grey value for every palette colour). Its ink is sum(grey / 255) over the
   pixels with grey >= INK_FLOOR (faint noise below the floor is not ink).
2. Objects: the two most-inked cells. `count` is right when exactly two cells have ink
   above COUNT_THRESHOLD. The faintest real digit has 11.5 units of ink (1st percentile
   15.6), an empty real cell 0; the threshold of 4 (a third of the faintest digit, e.g.
   four fully lit pixels) leaves a wide margin on both sides.
3. Each object's digit: the digits classifier (`sgjax.metrics.digits`) on its grey cell
   with the pixels under INK_FLOOR set to 0 (held-out accuracy 0.993; 0.990 unfloored), all cells
   of all images in one batched call. Its colour: the palette colour nearest to
   the mean chromaticity of its ink, sum(rgb) / sum(grey) over the ink pixels (1 on the
   lit channels of a palette colour at any intensity). A cell under the threshold holds no
   object: its digit and colour are never right.
4. Which object is the caption's a and which is b (matching rule): of the two assignments of the
   detected objects to (a, b), take the one that matches more of the caption's four
   attributes (digit_a, colour_a, digit_b, colour_b); on a tie, the one the caption's
   relation implies (a left of / above b...), so an image of two alike objects is read the
   way its caption states. Then `relation` is right when a's and b's cells stand in the
   caption's relation (cells on a diagonal stand in none). Objects are identified by what
   they are, then judged by where they are: an image with the two objects swapped fails the
   relation, not the digits and colours.
`full` needs all of it: both digits, both colours, the relation and the count.

Chance levels are those of a generator that ignores the caption but draws valid scenes
(`random_scene` with a random placement, perfectly recognised), scored by the same rule:
digit 0.160 and colour 0.375 (best-of-two assignment lifts 1/10 and 1/4), relation 0.356
(1/4 lifted by ties going the caption's way), full 1/3200 = (1/10)^2 (1/4)^2 / 2 and count 1;
`chance` derives them exactly.

Within-prompt diversity: for every caption with several samples, the mean pairwise Euclidean
distance between samples, each described by the classifier's penultimate features of its 4
cells concatenated in reading order (digit style and placement; colour is fixed by the
caption); averaged over those captions. `real_within_prompt_diversity` gives the same for real
scenes of the same captions (held-out digits), so a report can state it relative to real
data: 1.0 = as varied as real scenes, below 1 = collapsed modes.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from jax.sharding import Mesh

from sgjax.data import scenes
from sgjax.metrics import digits

INK_FLOOR = 32  # grey level below which a pixel is not ink (2 of scikit-learn's 16 levels)
COUNT_THRESHOLD = 4.0  # ink (in fully lit pixels) above which a cell holds an object
_PALETTE = np.array([scenes.COLOURS[c] for c in scenes.COLOUR_NAMES], np.float32) / 255.0


def cells(images: np.ndarray) -> np.ndarray:
  """uint8 [N, 16, 16, 3] -> uint8 [N, 4, 8, 8, 3], cells in reading order."""
  images = check_images(images)
  n = len(images)
  return images.reshape(n, 2, 8, 2, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, 4, 8, 8, 3)


def check_images(images: np.ndarray) -> np.ndarray:
  """Accepts uint8 [N, 16, 16, 3]; anything else is an error, not a guess."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1:] != scenes.IMAGE_SHAPE or images.dtype != np.uint8:
    raise ValueError(f"scene metrics need uint8 images [N, 16, 16, 3], got {images.dtype}"
                     f" {images.shape}; convert model outputs with sources.to_uint8.")
  return images


def _parse_all(captions: Sequence[str], n: int) -> dict[str, np.ndarray]:
  if len(captions) != n:
    raise ValueError(f"{len(captions)} captions for {n} images; pass one caption per image.")
  parsed = [scenes.parse_caption(c) for c in captions]
  return {
      "digits": np.array([[s.digit_a, s.digit_b] for s in parsed], np.int32).reshape(n, 2),
      "colours": np.array([[scenes.COLOUR_NAMES.index(s.colour_a),
                            scenes.COLOUR_NAMES.index(s.colour_b)] for s in parsed],
                          np.int32).reshape(n, 2),
      "relation": np.array([scenes.RELATIONS.index(s.relation) for s in parsed], np.int32),
  }


def relation_index(cell_a: np.ndarray, cell_b: np.ndarray) -> np.ndarray:
  """Index into RELATIONS of a's cell relative to b's (cells 0..3), -1 on a diagonal."""
  row_a, col_a = np.divmod(cell_a, 2)
  row_b, col_b = np.divmod(cell_b, 2)
  same_row, same_col = (row_a == row_b) & (col_a != col_b), (col_a == col_b) & (row_a != row_b)
  return np.where(same_row, np.where(col_a < col_b, 0, 1),
                  np.where(same_col, np.where(row_a < row_b, 2, 3), -1)).astype(np.int32)


def match(found_digits: np.ndarray, found_colours: np.ndarray, found_cells: np.ndarray,
          target: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The matching rule (module docstring, step 4) on detected objects [N, 2] (digit,
  palette index, cell) against parsed captions -> per-image booleans digit/colour [N, 2]
  (objects a, b) and relation [N]."""
  want_d, want_c, want_r = target["digits"], target["colours"], target["relation"]
  ok = {}
  for name, order in (("kept", [0, 1]), ("swapped", [1, 0])):
    d, c, cell = found_digits[:, order], found_colours[:, order], found_cells[:, order]
    ok[name] = {"digit": d == want_d, "colour": c == want_c,
                "relation": relation_index(cell[:, 0], cell[:, 1]) == want_r}
  score = lambda o: o["digit"].sum(1) + o["colour"].sum(1)
  kept_score, swapped_score = score(ok["kept"]), score(ok["swapped"])
  use_swapped = (swapped_score > kept_score) | (
      (swapped_score == kept_score) & ok["swapped"]["relation"] & ~ok["kept"]["relation"])
  return {"digit": np.where(use_swapped[:, None], ok["swapped"]["digit"], ok["kept"]["digit"]),
          "colour": np.where(use_swapped[:, None], ok["swapped"]["colour"],
                             ok["kept"]["colour"]),
          "relation": np.where(use_swapped, ok["swapped"]["relation"], ok["kept"]["relation"])}


def detect(images: np.ndarray, model: digits.Classifier | None = None,
           mesh: Mesh | None = None) -> dict[str, np.ndarray]:
  """Per image: ink [N, 4], count [N] (cells over COUNT_THRESHOLD), and for every cell its
  digit [N, 4] and palette colour index [N, 4] (-1 where no object) and classifier
  features [N, 4, F]."""
  cell_rgb = cells(images).astype(np.float32)  # [N, 4, 8, 8, 3]
  n = len(cell_rgb)
  grey = cell_rgb.max(-1)  # [N, 4, 8, 8]
  is_ink = grey >= INK_FLOOR
  grey = np.where(is_ink, grey, 0.0)  # what is not ink is background, for the classifier too
  ink = grey.sum((2, 3)) / 255.0
  rgb_sum = np.where(is_ink[..., None], cell_rgb, 0.0).sum((2, 3))  # [N, 4, 3]
  chroma = rgb_sum / np.maximum(ink * 255.0, 1e-6)[..., None]
  colour = np.argmin(((chroma[..., None, :] - _PALETTE)**2).sum(-1), -1).astype(np.int32)
  model = model if model is not None else digits.load_classifier()
  out = digits.classify(model, grey.reshape(n * 4, 8, 8, 1).astype(np.uint8), mesh=mesh)
  digit = np.argmax(out["logits"], -1).reshape(n, 4).astype(np.int32)
  present = ink > COUNT_THRESHOLD  # a cell without an object has no digit or colour (-1)
  return {"ink": ink, "count": present.sum(1).astype(np.int32),
          "digit": np.where(present, digit, -1), "colour": np.where(present, colour, -1),
          "features": out["features"].reshape(n, 4, -1)}


def judge(images: np.ndarray, captions: Sequence[str], model: digits.Classifier | None = None,
          mesh: Mesh | None = None) -> dict[str, np.ndarray]:
  """Per-image verdicts: digit and colour bool [N, 2] (objects a, b), relation, count and
  full bool [N], and the cells taken as objects [N, 2] (reading order)."""
  images = check_images(images)
  target = _parse_all(captions, len(images))
  found = detect(images, model, mesh)
  # The two most-inked cells (stable order on ties), then in reading order.
  top = np.sort(np.argsort(-found["ink"], axis=1, kind="stable")[:, :2], axis=1)
  take = lambda a: np.take_along_axis(a, top, axis=1)
  verdict = match(take(found["digit"]), take(found["colour"]), top, target)
  verdict["count"] = found["count"] == 2
  verdict["full"] = (verdict["digit"].all(1) & verdict["colour"].all(1) & verdict["relation"]
                     & verdict["count"])
  verdict["cells"] = top
  return verdict


def _match_counts(alphabet: int) -> dict[tuple[int, int], float]:
  """Joint distribution of (kept, swapped) match counts of one attribute, x1 = a plus x2 = b
  against x2 = a plus x1 = b, for x1, x2, a, b iid uniform over `alphabet` symbols."""
  x1, x2, a, b = np.indices((alphabet,) * 4).reshape(4, -1)
  kept, swapped = (x1 == a).astype(int) + (x2 == b), (x2 == a).astype(int) + (x1 == b)
  pairs, counts = np.unique(np.stack([kept, swapped], 1), axis=0, return_counts=True)
  return {(int(k), int(w)): c / len(kept) for (k, w), c in zip(pairs, counts)}


@functools.lru_cache(maxsize=1)
def chance() -> dict[str, float]:
  """Exact scores of a caption-ignoring generator of valid scenes (module docstring).

  Digits and colours are drawn independently of the caption, so the match counts of the
  two assignments have the distributions of `_match_counts`. The scene's axis is the
  caption's with probability 1/2, and then the caption's relation is a's relation to b
  under the kept or the swapped assignment, 1/4 each. Running the matching rule over
  these cases gives each score exactly: best-of-two raises digit to 0.160 and colour to
  0.375 (from 1/10 and 1/4), relation to 0.356 (from 1/4: ties favour the caption), full to
  1/3200 = (1/10)^2 (1/4)^2 / 2. Count is 1: valid scenes hold two digits.
  """
  scores = dict.fromkeys(("full", "digit", "colour", "relation"), 0.0)
  for (d_kept, d_swapped), p_digit in _match_counts(10).items():
    for (c_kept, c_swapped), p_colour in _match_counts(len(scenes.COLOURS)).items():
      kept, swapped = d_kept + c_kept, d_swapped + c_swapped
      # Cases: the caption's relation is the kept one's, the swapped one's, or off-axis.
      for p_case, favoured in ((0.25, "kept"), (0.25, "swapped"), (0.5, None)):
        use_swapped = swapped > kept or (swapped == kept and favoured == "swapped")
        digit, colour = (d_swapped, c_swapped) if use_swapped else (d_kept, c_kept)
        relation = favoured == ("swapped" if use_swapped else "kept")
        p = p_digit * p_colour * p_case
        scores["digit"] += p * digit / 2
        scores["colour"] += p * colour / 2
        scores["relation"] += p * relation
        scores["full"] += p * (digit == 2 and colour == 2 and relation)
  return {**{k: float(v) for k, v in scores.items()}, "count": 1.0}


def evaluate(images: np.ndarray, captions: Sequence[str],
             model: digits.Classifier | None = None, mesh: Mesh | None = None
             ) -> dict[str, float | dict[str, float]]:
  """Scene metrics of images uint8 [N, 16, 16, 3] against their captions.

  full: fraction of images right in everything; digit, colour: accuracy over the 2N objects;
  relation, count: fraction of images; chance: the same for a caption-ignoring generator.
  """
  verdict = judge(images, captions, model, mesh)
  return {"full": float(verdict["full"].mean()), "digit": float(verdict["digit"].mean()),
          "colour": float(verdict["colour"].mean()),
          "relation": float(verdict["relation"].mean()),
          "count": float(verdict["count"].mean()), "num_images": len(verdict["full"]),
          "chance": chance()}


def within_prompt_diversity(images: np.ndarray, captions: Sequence[str],
                            model: digits.Classifier | None = None, mesh: Mesh | None = None
                            ) -> float:
  """Mean over captions with >= 2 samples of their samples' mean pairwise feature distance."""
  images = check_images(images)
  if len(captions) != len(images):
    raise ValueError(f"{len(captions)} captions for {len(images)} images; pass one caption"
                     " per image.")
  groups: dict[str, list[int]] = {}
  for j, text in enumerate(captions):
    groups.setdefault(text, []).append(j)
  groups = {text: idx for text, idx in groups.items() if len(idx) >= 2}
  if not groups:
    raise ValueError("within-prompt diversity needs some caption with at least 2 samples;"
                     " sample several images per prompt.")
  sizes = [len(idx) for idx in groups.values()]
  feats = detect(images[np.concatenate(list(groups.values()))], model, mesh)["features"]
  per_group = np.split(feats.reshape(len(feats), -1), np.cumsum(sizes)[:-1])  # [n_k, 4F]
  return float(np.mean([_mean_pairwise_distance(f) for f in per_group]))


def _mean_pairwise_distance(feats: np.ndarray) -> float:
  """Mean Euclidean distance over pairs i != j of rows [n, F]: by differences, not the
  |x|^2 + |y|^2 - 2xy expansion, so identical samples give exactly 0 (groups are small)."""
  feats = np.asarray(feats, np.float64)
  d = np.sqrt(((feats[:, None] - feats[None]) ** 2).sum(-1))
  return float(d.sum() / (len(feats) * (len(feats) - 1)))


def real_within_prompt_diversity(captions: Sequence[str], split: str = "heldout",
                                 seed: int = 0, model: digits.Classifier | None = None,
                                 mesh: Mesh | None = None) -> float:
  """within_prompt_diversity of real scenes (digits of `split`) for the same captions."""
  return within_prompt_diversity(scenes.render_captions(captions, split, seed), captions,
                                 model, mesh)
