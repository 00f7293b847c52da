"""PyTorch SiT / TREAD / DiT checkpoints imported and checked against the references' own
outputs (fixtures written by tests/parity/make_fixtures.py, which runs their code; no torch
here), then sampled and finetuned as sgjax workdirs."""

import dataclasses
import json
import os
import shlex

import chex
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from sgjax import checkpoint, config as config_lib, import_torch, sampling, torch_state, train
from sgjax.guidance import GuidanceConfig
from sgjax.models import dit, dit_torch
from sgjax.sparsity import Route, TokenSubset
from tests import helpers

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parity", "fixtures")
# The fixtures' models: depth 3, width 32, 2 heads (make_fixtures.SMALL), as a size name.
TINY = "T"


@pytest.fixture(autouse=True)
def tiny_size(monkeypatch):
  monkeypatch.setitem(dit.SIZES, TINY, (3, 32, 2))


def fixture(arch):
  with np.load(os.path.join(FIXTURES, f"{arch}.npz")) as f:
    return {k: f[k] for k in f.files}


def sgjax_inputs(arch, data):
  """The reference's (x NCHW, t as it reads time) -> sgjax's (x NHWC, t; 0 noise, 1 data)."""
  convention = dit_torch.CONVENTIONS[arch]
  t = data["t"] / convention.time_scale
  return (jnp.asarray(data["x"].transpose(0, 2, 3, 1)),
          jnp.asarray(1.0 - t if convention.flip_time else t), jnp.asarray(data["y"]))


def reference_velocity(arch, out):
  """The reference's output, NHWC, learn-sigma half dropped, sign as sgjax's velocity."""
  out = out.transpose(0, 2, 3, 1)[..., :4]
  return -out if dit_torch.CONVENTIONS[arch].negate_output else out


def imported(tmp_path, arch, routes=None, **kwargs):
  out = str(tmp_path / arch)
  result = import_torch.import_checkpoint(os.path.join(FIXTURES, f"{arch}.pt"), arch,
                                          f"SiT-{TINY}/2", out, routes=routes, **kwargs)
  return out, result


def float32_model(workdir):
  """The workdir's EMA model computing in float32 (imagenet256.py trains in bfloat16)."""
  model, _, step = checkpoint.load_model(workdir)
  graphdef, _ = nnx.split(nnx.eval_shape(
      lambda: dit.DiT(dataclasses.replace(model.cfg, dtype="float32"), rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model)), step


def subset_from_keep(keep: np.ndarray, num_tokens: int) -> TokenSubset:
  """The TokenSubset that keeps `keep` [B, K] (a reference's choice), dropping the rest."""
  drop = np.stack([np.setdiff1d(np.arange(num_tokens), row) for row in keep])
  perm = np.concatenate([keep, drop], axis=1)
  return TokenSubset(jnp.asarray(keep, jnp.int32), jnp.asarray(drop, jnp.int32),
                     jnp.asarray(np.argsort(perm, axis=1), jnp.int32))


@pytest.mark.parametrize("arch", dit_torch.ARCHS)
def test_imported_dense_forward_matches_the_reference_code(tmp_path, arch):
  data = fixture(arch)
  routes = ((1, 1, 0.5),) if arch == "tread" else None
  workdir, _ = imported(tmp_path, arch, routes)
  model, step = float32_model(workdir)
  assert step == 0 and model.cfg.time_scale == dit_torch.CONVENTIONS[arch].time_scale
  v = model(*sgjax_inputs(arch, data))
  expected = reference_velocity(arch, data["out"])
  assert np.abs(expected).max() > 1.0  # randomised weights: no trivial zeros compared
  chex.assert_trees_all_close(v, expected, atol=1e-5, rtol=0)


def test_imported_tread_routed_forward_matches_with_the_same_kept_tokens(tmp_path):
  data = fixture("tread")
  hyper = json.loads(str(data["config"]))
  (route,) = hyper["routes"]
  workdir, _ = imported(tmp_path, "tread", routes=(
      (route["start_layer_idx"], route["end_layer_idx"], route["selection_ratio"]),))
  model, _ = float32_model(workdir)
  subset = subset_from_keep(data["ids_keep"], model.cfg.num_tokens)
  assert subset.num_kept == model.cfg.num_tokens - int(model.cfg.num_tokens * data["gamma"])
  x, t, y = sgjax_inputs("tread", data)
  routed = model(x, t, y, (subset,))
  chex.assert_trees_all_close(routed, reference_velocity("tread", data["out_routed"]),
                              atol=1e-5, rtol=0)
  # Routing changed the output, so the comparison above checks the route.
  assert np.abs(np.asarray(routed) - np.asarray(model(x, t, y))).max() > 0.05


def test_training_checkpoints_give_ema_or_raw_weights(tmp_path):
  ema_model, _, _ = checkpoint.load_model(imported(tmp_path / "ema", "sit")[0])
  raw_model, _, _ = checkpoint.load_model(imported(tmp_path / "raw", "sit", ema=False)[0])
  weights = torch_state.load(os.path.join(FIXTURES, "sit.pt"))["model"]
  raw = dit_torch.convert(weights, raw_model.cfg, "sit")
  chex.assert_trees_all_close(raw_model.blocks[0].adaln.kernel[...],
                              raw["blocks"][0]["adaln"]["kernel"], rtol=1e-6, atol=0)
  assert not np.allclose(ema_model.blocks[0].adaln.kernel[...],
                         raw_model.blocks[0].adaln.kernel[...])


def test_imported_workdir_samples_and_finetunes(tmp_path):
  # A dense SiT given a TREAD route: SG at inference, routed finetuning.
  workdir, result = imported(tmp_path, "sit", routes=((1, 1, 0.5),))
  model, config, _ = checkpoint.load_model(workdir)
  assert model.cfg.routes == (Route(1, 1, 0.5),)
  images, _ = sampling.sample(model, GuidanceConfig("sg", omega=1.5, gamma_strong=0.0,
                                                    gamma_weak=0.5), jnp.arange(4), 0, steps=2)
  assert np.isfinite(np.asarray(images)).all()
  # The printed command, split as a shell would, gives the written config through the same
  # config flag as sgjax.train.
  argv = shlex.split(result["finetune"])
  assert argv[:3] == ["python", "-m", "sgjax.train"] and argv[-1] == f"--workdir={workdir}"
  flag_values, train_argv = flags.FlagValues(), ["sgjax.train"] + argv[3:-1]
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True,
                                  sys_argv=train_argv)
  flag_values(train_argv)
  assert json.loads(json.dumps(flag_values.config.to_dict(), default=list)) == config
  # Finetuning resumes at the imported step 0 with the same config and new data.
  shards = tmp_path / "latents.array_record"
  helpers.write_latent_shard(str(shards), np.random.default_rng(0).normal(
      size=(32, 8, 8, 4)).astype(np.float32), np.arange(32) % 10)
  config = ml_collections.ConfigDict(config)
  config.data.update(path=str(shards), num_workers=0)
  config.train.update(steps=2, batch_size=8, log_every=1, ckpt_every=2)
  metrics = train.train(config, workdir)
  assert np.isfinite(metrics["loss"])
  assert checkpoint.Checkpointer(workdir).all_steps() == [0, 2]


@pytest.mark.parametrize("edit,match", [
    (lambda w: w.update({"blocks.0.attn.extra.weight": np.zeros(3, np.float32)}),
     r"unexpected keys: \['blocks.0.attn.extra.weight'\]"),
    (lambda w: w.pop("blocks.2.mlp.fc2.bias"), r"missing keys: \['blocks.2.mlp.fc2.bias'\]"),
    (lambda w: w.update({"pos_embed": w["pos_embed"] + 0.1}), "another position embedding"),
])
def test_state_dicts_that_do_not_fit_are_refused_with_the_keys_named(edit, match):
  weights, _ = dit_torch.select_weights(torch_state.load(os.path.join(FIXTURES, "dit.pt")))
  cfg = dit.DiTConfig(input_size=8, width=32, depth=3, num_heads=2, num_classes=10)
  edit(weights)
  with pytest.raises(ValueError, match=match):
    dit_torch.convert(weights, cfg, "dit")


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="sd3"), r"--arch='sd3': choose one of \('sit', 'tread', 'dit'\)"),
    (dict(model="SiT-S/2"), r"--model=SiT-S/2 has width 384, but the checkpoint's"
                            r" x_embedder.proj.weight is \(32, 4, 2, 2\)"),
    (dict(model="SiT-T/4"), r"patch_size 4, but .* \(32, 4, 2, 2\)"),
    (dict(model="DiT-XXL/2"), "model name 'DiT-XXL/2'"),
    (dict(routes=((1, 5, 0.5),)), r"routes\[0\]=\(1, 5, 0.5\)"),
])
def test_bad_arguments_name_the_problem(tmp_path, kwargs, match):
  args = dict(path=os.path.join(FIXTURES, "sit.pt"), arch="sit", model=f"SiT-{TINY}/2",
              out=str(tmp_path / "out"))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    import_torch.import_checkpoint(args.pop("path"), args.pop("arch"), args.pop("model"),
                                   args.pop("out"), **args)
  assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_edm_preconditioned_tread_checkpoints_and_reused_workdirs_are_refused(tmp_path):
  state = torch_state.load(os.path.join(FIXTURES, "tread.pt"))
  wrapped = {"ema_state_dict": {"model." + k: v for k, v in state["ema_state_dict"].items()}}
  with pytest.raises(ValueError, match="EDM-preconditioned"):
    dit_torch.select_weights(wrapped)
  imported(tmp_path, "sit")
  with pytest.raises(ValueError, match="already holds a run"):
    imported(tmp_path, "sit")
  assert import_torch.parse_routes(["2:24:0.5"]) == ((2, 24, 0.5),)
  with pytest.raises(ValueError, match="expected start:end:gamma"):
    import_torch.parse_routes(["2-24"])


def test_an_imported_step_0_may_change_everything_but_the_model():
  saved = {"model": {"width": 32}, "train": {"batch_size": 256, "lr": 1e-4}, "seed": 0}
  current = {"model": {"width": 32}, "train": {"batch_size": 8, "lr": 1e-4}, "seed": 1}
  assert len(config_lib.resume_changes(saved, current, step=0)) == 2
  with pytest.raises(ValueError, match="train.batch_size: 256 -> 8"):
    config_lib.resume_changes(saved, current, step=10)
  with pytest.raises(ValueError, match="model.width: 32 -> 64"):
    config_lib.resume_changes(saved, {**current, "model": {"width": 64}}, step=0)


@pytest.mark.parametrize("field, old_value, other", [("time_scale", 1000.0, 1.0),
                                                      ("pos_embed", "none", "sincos")])
def test_runs_written_before_a_field_existed_resume_with_its_old_value(field, old_value,
                                                                      other):
  old_run = {"model": {"width": 32}}
  assert config_lib.resume_changes(old_run, {"model": {"width": 32, field: old_value}},
                                   step=10) == []
  with pytest.raises(ValueError, match=f"model.{field}: {old_value!r} -> {other!r}"):
    config_lib.resume_changes(old_run, {"model": {"width": 32, field: other}}, step=10)


def test_class_tables_without_a_null_class_get_one_and_sit_args_are_checked(tmp_path):
  weights, _ = dit_torch.select_weights(torch_state.load(os.path.join(FIXTURES, "dit.pt")))
  table = weights["y_embedder.embedding_table.weight"].copy()  # 11 rows: 10 classes + null
  assert dit_torch.add_null_class(dict(weights), None) == (10, False)
  assert dit_torch.add_null_class(weights, 11) == (11, True)
  chex.assert_trees_all_equal(weights["y_embedder.embedding_table.weight"],
                              np.concatenate([table, np.zeros_like(table[:1])]))
  with pytest.raises(ValueError, match="--num_classes=5, but .* has 11 rows"):
    dit_torch.add_null_class(dict(weights, **{"y_embedder.embedding_table.weight": table}), 5)
  model, _ = float32_model(imported(tmp_path, "dit", num_classes=11)[0])
  assert model.cfg.num_classes == 11
  checkpoint_file = torch_state.load(os.path.join(FIXTURES, "sit.pt"))
  dit_torch.check_training_args(checkpoint_file)  # its args: no path_type / prediction
  checkpoint_file["args"].path_type, checkpoint_file["args"].prediction = "GVP", "velocity"
  with pytest.raises(ValueError, match="'path_type': 'GVP'"):
    dit_torch.check_training_args(checkpoint_file)
