"""Files through etils.epath: local writes that never leave half a file, and a whole run
(train, resume, sample, sweep, report) on gs:// against a local Cloud Storage emulator."""

import json
import os

import chex
import numpy as np
import pytest

from configs import digits
from sgjax import checkpoint, guidance as guidance_lib, paths, report, sample, sweep, train


def test_local_writes_replace_whole_files_or_leave_them_untouched(tmp_path):
  path = tmp_path / "a" / "config.json"
  paths.write_json(path, {"step": 1})
  with pytest.raises(RuntimeError, match="interrupted"):
    with paths.open_write(path) as f:
      f.write('{"step": 2')  # half a record, then the writer dies
      raise RuntimeError("interrupted")
  assert paths.read_json(path) == {"step": 1}
  assert sorted(os.listdir(tmp_path / "a")) == ["config.json"]  # no temporary file left


def test_npz_round_trip_and_last_component_glob(tmp_path):
  images, labels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4, 1), np.array(["x", "yz"])
  paths.save_npz(tmp_path / "s.npz", images, labels)
  loaded = paths.load_npz(tmp_path / "s.npz")
  chex.assert_trees_all_equal(loaded, {"arr_0": images, "arr_1": labels})
  for name in ("train-00001-of-00002", "train-00000-of-00002", "other"):
    paths.write_text(tmp_path / "d" / name, "")
  assert paths.glob(tmp_path / "d" / "train-*") == [
      str(tmp_path / "d" / f"train-0000{i}-of-00002") for i in range(2)]
  assert paths.glob(tmp_path / "missing" / "train-*") == []
  with pytest.raises(ValueError, match="only the last component"):
    paths.glob(tmp_path / "*" / "train-*")


def test_a_run_on_gs_trains_resumes_samples_and_sweeps(gcs_bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # where a plain file API would make a gs:/ look-alike
  run = f"{gcs_bucket}/runs/digits"
  workdir = f"{run}/model"
  config = digits.get_config("runlocal")
  config.train.update(steps=4, ckpt_every=2, keep_ckpts=2)
  train.train(config, workdir)
  config.train.steps = 6
  train.train(config, workdir)  # resumes from gs://.../checkpoints/4

  lines = paths.read_text(f"{workdir}/metrics.jsonl").splitlines()
  assert [json.loads(line)["step"] for line in lines] == list(range(1, 7))
  assert paths.read_json(f"{workdir}/config.json")["train"]["steps"] == 6
  assert any(paths.resolve(f"{workdir}/tensorboard").iterdir())
  model, _, step = checkpoint.load_model(workdir)
  assert step == 6 and model.cfg.num_classes == config.model.num_classes

  summary = sample.run(workdir, guidance_lib.GuidanceConfig(rule="none"), f"{run}/one",
                       steps=2, num_samples=8, batch_size=8)
  assert summary["workdir"] == workdir
  samples = paths.load_npz(f"{run}/one/samples.npz")
  chex.assert_shape(samples["arr_0"], (8, 8, 8, 1))
  assert paths.resolve(f"{run}/one/grid.png").read_bytes().startswith(b"\x89PNG")

  rows = sweep.run_sweep(workdir, sweep.parse_grid("rule=none"), f"{run}/compare",
                         seeds=(0,), steps=2, num_samples=16, batch_size=16)
  metrics = ["fid", "class_accuracy", "diversity", "precision", "recall"]
  sweep.write_outputs(rows, f"{run}/compare", metrics)
  sweep.write_outputs(rows, f"{run}/heatmap", metrics)
  text = paths.read_text(report.write_report(run, train_seconds=1.0, sweep_seconds=2.0))
  assert sweep.label(rows[0]) in text
  assert os.listdir(tmp_path) == []  # everything went to the bucket
