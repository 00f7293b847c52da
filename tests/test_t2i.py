"""Text-to-image end to end: train the demo's TR-DiT a few steps on captioned scenes, sample
it from prompts with CFG+SG, score the samples, and refuse bad prompts before compiling."""

import json

import numpy as np
import pytest

from configs import t2i
from sgjax import guidance as guidance_lib, sample, sweep, train
from sgjax.metrics import npz

PROMPTS = ["a red 3 left of a blue 7", "a green 1 above a yellow 0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("t2i")
  config = t2i.get_config("model=demo,runlocal")
  config.train.update(steps=4, ckpt_every=4)
  metrics = train.train(config, str(root / "model"))
  assert np.isfinite(metrics["loss"])
  return root


def cfg_sg():
  return guidance_lib.GuidanceConfig(rule="cfg+sg", omega=2.5, gamma_strong=0.2,
                                     gamma_weak=0.7)


def test_prompts_give_captioned_samples_that_the_scene_metric_scores(run, tmp_path):
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("\n".join(PROMPTS[1:]) + "\n\n")
  prompts = sample.read_prompts(PROMPTS[:1], str(prompts_file))
  assert prompts == PROMPTS
  summary = sample.run(str(run / "model"), cfg_sg(), str(tmp_path / "out"), steps=2,
                       num_samples=6, batch_size=8, prompts=prompts)
  assert summary["nfe"] == 4 and summary["labels"] == "2 prompts"
  saved = np.load(tmp_path / "out" / "samples.npz")
  assert saved["arr_0"].shape == (6, 16, 16, 3)
  assert list(saved["arr_1"]) == PROMPTS * 3
  assert (tmp_path / "out" / "grid.png").stat().st_size > 0
  result = npz.evaluate_npz(str(tmp_path / "out" / "samples.npz"), metric="scenes")
  for name in ("full", "digit", "colour", "relation", "count", "diversity"):
    assert 0.0 <= result[name] <= (1.0 if name != "diversity" else 10.0)
  with open(tmp_path / "out" / "metrics.json") as f:
    assert json.load(f)["chance_full"] == pytest.approx(1 / 3200)


def test_sweep_samples_prompts_and_reuses_finished_settings(run, tmp_path):
  settings = sweep.parse_grid("rule=sg;omega=2;gamma_strong=0;gamma_weak=0.5")
  kwargs = dict(metric="scenes", steps=2, num_samples=8, batch_size=8, prompts=PROMPTS)
  rows = sweep.run_sweep(str(run / "model"), settings, str(tmp_path / "sweep"), **kwargs)
  assert rows[0]["full"] >= 0.0 and "diversity" in rows[0]
  folder = tmp_path / "sweep" / settings[0].slug / "seed0"
  with open(folder / "spec.json") as f:
    assert json.load(f)["prompts"] == PROMPTS
  mtime = (folder / "samples.npz").stat().st_mtime
  sweep.run_sweep(str(run / "model"), settings, str(tmp_path / "sweep"), **kwargs)
  assert (folder / "samples.npz").stat().st_mtime == mtime


@pytest.mark.parametrize("prompts, message", [
    (None, "give --prompt=CAPTION"),
    (["a purple 3 left of a blue 7"], r"word\(s\) \['purple'\]"),
    (["a red 3 left of a blue 7 and a red 1"], "at most 8"),
])
def test_bad_prompts_are_refused(run, tmp_path, prompts, message):
  with pytest.raises(ValueError, match=message):
    sample.run(str(run / "model"), cfg_sg(), str(tmp_path / "o"), prompts=prompts)


def test_empty_prompts_file_is_refused(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  with pytest.raises(ValueError, match="holds no prompt"):
    sample.read_prompts(None, str(empty))
