import dataclasses
import os
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgjax import config as config_lib
from sgjax import sharding, sparsity
from sgjax.models import dit
from sgjax.sparsity import Route
from tests.helpers import batch, perturbed_model, tiny_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parity", "fixtures")


def full_subset(key, cfg, size):
  """A random permutation that keeps every token: exercises gather/merge at K = N."""
  return sparsity.random_subset(key, size, cfg.num_tokens, 0.0)


def test_routing_gamma_zero_is_exactly_the_dense_forward():
  routed = perturbed_model(tiny_config("routing"))
  dense = perturbed_model(tiny_config("dense"))  # same seed: same parameters
  x, t, y = batch(routed.cfg)
  subsets = routed.draw_subsets(jax.random.key(0), 8, gamma=0.0)
  assert subsets == (None,)
  chex.assert_trees_all_equal(routed(x, t, y, subsets), dense(x, t, y))
  # The gather/merge path with every token kept agrees too (to float summation order).
  chex.assert_trees_all_close(routed(x, t, y, (full_subset(jax.random.key(1), routed.cfg, 8),)),
                              dense(x, t, y), atol=1e-5, rtol=0)


def unmasked_forward(model, x, t, y):
  """The masking model's layers applied in order to every token in place, with no gather or
  merge: MaskDiT's forward at gamma 0 written out (patch size 1: a token is a pixel)."""
  cfg = model.cfg
  assert cfg.patch_size == 1
  b, height, width, channels = x.shape
  h = model.patch_embed(x.reshape(b, height * width, channels))
  h = h + dit.sincos_pos_embed(cfg.width, cfg.grid_size)
  c = model.t_mlp2(jax.nn.silu(model.t_mlp1(dit.timestep_embedding(t, cfg.time_scale))))
  c = c + model.y_embed(y)
  for block in model.blocks:
    h = block(h, c)
  h = model.decoder.embed(h, c) + dit.sincos_pos_embed(cfg.decoder_width, cfg.grid_size)
  for block in model.decoder.blocks:
    h = block(h, c)
  return model.final(h, c).reshape(x.shape)


def test_masking_gamma_zero_is_exactly_the_unmasked_forward():
  model = perturbed_model(tiny_config("masking"))
  x, t, y = batch(model.cfg)
  expected = unmasked_forward(model, x, t, y)
  subsets = model.draw_subsets(jax.random.key(0), 8, gamma=0.0)
  assert subsets == (None,)
  chex.assert_trees_all_equal(model(x, t, y, subsets), expected)
  # The gather/merge path with every token kept (permuted) agrees to float summation order.
  chex.assert_trees_all_close(model(x, t, y, (full_subset(jax.random.key(1), model.cfg, 8),)),
                              expected, atol=1e-5, rtol=0)


def test_sparse_forward_depends_on_the_tokens_kept():
  for mode in ("routing", "masking"):
    model = perturbed_model(tiny_config(mode))
    x, t, y = batch(model.cfg)
    a = model(x, t, y, model.draw_subsets(jax.random.key(0), 8, gamma=0.5))
    b = model(x, t, y, model.draw_subsets(jax.random.key(0), 8, gamma=0.5))
    c = model(x, t, y, model.draw_subsets(jax.random.key(1), 8, gamma=0.5))
    chex.assert_trees_all_equal(a, b)
    assert np.abs(np.asarray(a - c)).max() > 1e-4
    assert np.abs(np.asarray(a - model(x, t, y))).max() > 1e-4


def test_each_label_conditions_the_velocity_and_the_null_label_has_its_own_learned_row():
  model = perturbed_model(tiny_config("dense"))
  x, t, _ = batch(model.cfg)
  x, t = jnp.broadcast_to(x[:1], x.shape), jnp.broadcast_to(t[:1], t.shape)  # one input
  y = jnp.array([0, 1, 2, 4, 6, 8, 9, 10])  # 10: the null class
  out = np.asarray(model(x, t, y)).reshape(8, -1)
  gaps = np.abs(out[:, None] - out[None]).max(-1)
  assert gaps[~np.eye(8, dtype=bool)].min() > 1e-3, gaps
  # The null label's embedding is a trainable row of its own: moving it moves only its output.
  table = model.y_embed.embedding
  assert isinstance(table, nnx.Param)
  table[...] = table[...].at[10].add(0.5)
  moved = np.asarray(model(x, t, y)).reshape(8, -1)
  chex.assert_trees_all_equal(moved[:7], out[:7])
  assert np.abs(moved[7] - out[7]).max() > 1e-3


def test_routed_blocks_see_only_kept_tokens_and_skipped_tokens_pass_unchanged():
  # Route to the last block so nothing runs after it: skipped tokens must leave the
  # blocks exactly as they entered the route.
  cfg = tiny_config("routing", routes=(Route(1, 3, 0.5),))
  model = perturbed_model(cfg)
  x, t, y = batch(cfg)
  subset = sparsity.random_subset(jax.random.key(5), 8, cfg.num_tokens, 0.5)
  h = jax.random.normal(jax.random.key(6), (8, cfg.num_tokens, cfg.width))
  c = jax.random.normal(jax.random.key(7), (8, cfg.width))
  (out,) = model._routed_blocks([h], c, ((subset,),))
  before_route = model.blocks[0](h, c)
  chex.assert_trees_all_equal(sparsity.gather(out, subset.drop),
                              sparsity.gather(before_route, subset.drop))
  kept = sparsity.gather(before_route, subset.keep)
  for block in model.blocks[1:]:
    kept = block(kept, c)
  chex.assert_trees_all_close(sparsity.gather(out, subset.keep), kept, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cfg", [
    tiny_config("routing", routes=(Route(0, 0, 0.5), Route(2, 3, 0.5))),
    tiny_config("masking"),
], ids=["routing", "masking"])
def test_packed_branches_equal_one_call_per_branch(cfg):
  # Different token counts per branch (and a branch that keeps every token): the packed pass
  # must give each branch exactly its own forward, attention never crossing branches.
  model = perturbed_model(cfg)
  x, t, y = batch(cfg)
  subsets = [model.draw_subsets(jax.random.key(k), 8, gamma)
             for k, gamma in ((0, 0.25), (1, 0.75), (2, 0.75))]
  branches = [subsets[0], subsets[1], (), subsets[2]]
  packed = jax.jit(lambda x, t, y: model.branches(x, t, y, branches))(x, t, y)
  assert len(packed) == len(branches)
  for out, branch in zip(packed, branches):
    chex.assert_trees_all_close(out, model(x, t, y, branch), atol=1e-5, rtol=0)
  assert np.abs(np.asarray(packed[1] - packed[3])).max() > 1e-4  # other tokens, other output


def test_dit_xl2_parameter_count_is_exact_counted_abstractly():
  # XL/2 on 32x32x4 latents, 1000 classes + the null class, velocity output (4 channels):
  # 674,816,272 exactly (README: 674.8M); a missing bias or embedding row changes it.
  cfg = dit.DiTConfig(**dit.parse_model_name("DiT-XL/2"))
  abstract = nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(0)))
  count = sum(p.size for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert count == 674_816_272, count


@pytest.mark.parametrize("name,expected", [
    ("SiT-XL/2", dict(depth=28, width=1152, num_heads=16, patch_size=2)),
    ("DiT-L/4", dict(depth=24, width=1024, num_heads=16, patch_size=4)),
    ("DiT-B/8", dict(depth=12, width=768, num_heads=12, patch_size=8)),
    ("SiT-S/2", dict(depth=12, width=384, num_heads=6, patch_size=2)),
])
def test_model_names_accept_dit_and_sit_prefixes(name, expected):
  assert dit.parse_model_name(name) == expected


@pytest.mark.parametrize("name", ["SiT-XXL/2", "ViT-B/2", "SiT-B", "sit-b/2", "SiT-B/2x"])
def test_unknown_model_names_are_refused_naming_the_accepted_forms(name):
  with pytest.raises(ValueError, match=rf"model name '{re.escape(name)}': expected"
                     r" DiT-<size>/<patch> or SiT-<size>/<patch> with size in \["):
    dit.parse_model_name(name)


def test_zero_initialised_model_outputs_zero_velocity():
  # adaLN-Zero: every residual branch and the final layer start at zero.
  model = dit.DiT(tiny_config("masking"), rngs=nnx.Rngs(0))
  x, t, y = batch(model.cfg)
  chex.assert_trees_all_equal(model(x, t, y), np.zeros_like(x))


def test_bf16_model_accumulates_its_blocks_in_a_float32_residual_stream():
  # Deterministic: bf16 rounding of a stream carried through 8 blocks in bf16 (the model
  # before it kept autocast's float32 stream) gave a mean relative error of 0.77% here;
  # only the matmuls' rounding remains with a float32 stream (0.32%).
  cfg = tiny_config("dense", depth=8)
  x, t, y = batch(cfg)
  x = 30.0 * x
  reference = np.asarray(perturbed_model(cfg)(x, t, y))
  out = perturbed_model(dataclasses.replace(cfg, dtype="bfloat16"))(x, t, y)
  chex.assert_type(out, jnp.float32)
  error = np.abs(np.asarray(out) - reference).mean() / np.abs(reference).mean()
  assert error < 0.005, error


def test_bf16_model_runs_the_block_after_a_route_in_float32():
  cfg = tiny_config("routing", routes=(Route(1, 2, 0.5),))
  f32 = perturbed_model(cfg)
  bf16 = perturbed_model(dataclasses.replace(cfg, dtype="bfloat16"))
  h = jax.random.normal(jax.random.key(6), (8, cfg.num_tokens, cfg.width))
  c = jax.random.normal(jax.random.key(7), (8, cfg.width))
  # TREAD's fp32_next: block 3 follows the route and matches float32 to float32 rounding;
  # block 0 computes in bf16.
  chex.assert_trees_all_close(bf16.blocks[3](h, c), f32.blocks[3](h, c), atol=1e-5, rtol=0)
  assert np.abs(np.asarray(bf16.blocks[0](h, c) - f32.blocks[0](h, c))).max() > 1e-4


def test_maskdit_decoder_input_is_modulated_by_the_condition_and_starts_at_zero():
  cfg = tiny_config("masking")
  subset = sparsity.random_subset(jax.random.key(1), 8, cfg.num_tokens, 0.5)
  h = jax.random.normal(jax.random.key(2), (8, subset.num_kept, cfg.width))
  c = jax.random.normal(jax.random.key(3), (8, cfg.width))
  # Fresh: the decoder input is zero, so the decoder ignores what the encoder produced.
  fresh = dit.DiT(cfg, rngs=nnx.Rngs(0)).decoder
  chex.assert_trees_all_equal(fresh([h], c, [subset]), fresh([2.0 * h + 1.0], c, [subset]))
  # With weights: MaskDiT's own DecoderLayer (tests/parity/make_fixtures.py) gives the same.
  with np.load(os.path.join(FIXTURES, "maskdit_decoder_input.npz")) as f:
    data = {k: f[k] for k in f.files}
  embed = dit.AdaLNLinear(32, 32, 16, None, jnp.float32, rngs=nnx.Rngs(0))
  for layer, torch_name in ((embed.adaln, "adaLN_modulation.1"), (embed.linear, "linear")):
    layer.kernel[...] = data[f"weight:{torch_name}.weight"].T
    layer.bias[...] = data[f"weight:{torch_name}.bias"]
  chex.assert_trees_all_close(embed(data["x"], data["c"]), data["out"], atol=1e-5, rtol=0)
  assert np.abs(np.asarray(embed(data["x"], data["c"]) - embed(data["x"], -data["c"]))).max() > 0.1


def test_sharded_forward_over_8_devices_matches_one_device():
  cfg = tiny_config("routing")
  mesh = sharding.make_mesh("fsdp_tensor", tensor=2)
  sharded = sharding.init_sharded(lambda: perturbed_model(cfg), mesh, "fsdp_tensor")
  kernel = sharded.blocks[0].mlp.fc1.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  local = perturbed_model(cfg)
  x, t, y = batch(cfg)
  subsets = local.draw_subsets(jax.random.key(0), 8)
  expected = local(x, t, y, subsets)

  graphdef, state = nnx.split(sharded)

  @jax.jit
  def forward(state, x, t, y, subsets):
    return nnx.merge(graphdef, state)(x, t, y, subsets)

  put = lambda a: jax.device_put(a, sharding.batch_sharding(mesh))
  out = forward(state, put(x), put(t), put(y), subsets)
  assert len(out.sharding.device_set) == 8
  chex.assert_trees_all_close(out, expected, atol=1e-5, rtol=0)
  with jax.set_mesh(mesh):  # activation sharding constraints on: same numbers
    forward = jax.jit(forward.__wrapped__)
    chex.assert_trees_all_close(forward(state, put(x), put(t), put(y), subsets), expected,
                                atol=1e-5, rtol=0)
    # SG's packed pass (two branches, different token counts) under the same mesh.
    weak = local.draw_subsets(jax.random.key(1), 8, 0.75)
    packed = jax.jit(lambda state, x, t, y: nnx.merge(graphdef, state).branches(
        x, t, y, (subsets, weak)))(state, put(x), put(t), put(y))
    chex.assert_trees_all_close(packed[0], expected, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(packed[1], local(x, t, y, weak), atol=1e-5, rtol=0)


def test_remat_policies_give_the_gradients_of_the_plain_model():
  # Masking: its encoder and decoder blocks both go through dit.run_block.
  x, t, y = batch(tiny_config("masking"), 4)

  def grads(remat):
    cfg = tiny_config("masking", remat=remat)
    graphdef, params = nnx.split(perturbed_model(cfg))
    subsets = dit.draw_subsets(cfg, jax.random.key(5), 4)

    def loss(params):
      return jnp.mean(nnx.merge(graphdef, params)(x, t, y, subsets) ** 2)

    return jax.jit(jax.grad(loss))(params)

  expected = grads("none")
  for remat in ("full", "dots", "dots_no_batch"):
    chex.assert_trees_all_close(grads(remat), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("overrides,match", [
    (dict(remat="some"), "remat='some'"),
    (dict(patch_size=3), "patch_size=3 does not divide"),
    (dict(routes=(Route(1, 4, 0.5),)), r"routes\[0\]"),
    (dict(routes=(Route(0, 2, 0.5), Route(2, 3, 0.5))), "overlaps"),
    (dict(routes=(Route(0, 2, -0.5),)), "gamma"),
    (dict(sparsity="sparse"), "sparsity='sparse'"),
    (dict(num_heads=5), "num_heads=5"),
    (dict(attention="flash"), "attention='flash'"),
    (dict(attention="cudnn"), "dtype bfloat16 or float16"),
    (dict(attention="cudnn", dtype="bfloat16", num_heads=8), "head dim .* = 4"),
])
def test_invalid_model_settings_raise_value_error_naming_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(tiny_config("routing"), **overrides).validate()


def numpy_attention(attn, x: np.ndarray) -> np.ndarray:
  """Multi-head softmax(q k^T / sqrt(head dim)) v with the projections of `attn`, in numpy."""
  b, n, d = x.shape
  h = attn.num_heads
  dense = lambda layer, a: a @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])
  q, k, v = (dense(layer, x).reshape(b, n, h, d // h).transpose(0, 2, 1, 3)
             for layer in (attn.q, attn.k, attn.v))
  scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // h)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return dense(attn.proj, (weights @ v).transpose(0, 2, 1, 3).reshape(b, n, d))


def test_default_attention_is_xla_softmax_attention_and_cudnn_is_refused_off_gpu():
  cfg = tiny_config("masking")  # attention left at its default
  model = perturbed_model(cfg)
  h = jax.random.normal(jax.random.key(3), (2, cfg.num_tokens, cfg.width))
  graphdef, state = nnx.split(model.blocks[0].attn)
  compiled = jax.jit(lambda state, h: nnx.merge(graphdef, state)(h)).lower(state, h).compile()
  chex.assert_trees_all_close(compiled(state, h), numpy_attention(model.blocks[0].attn,
                                                                  np.asarray(h, np.float64)),
                              atol=1e-5, rtol=1e-5)
  # No call into cuDNN's fused attention (on a GPU it would be a custom call to it).
  assert not re.search(r'custom_call_target="[^"]*cudnn', compiled.as_text(), re.IGNORECASE)
  cudnn = perturbed_model(dataclasses.replace(cfg, attention="cudnn", dtype="bfloat16"))
  # Same parameters whatever the kernel: checkpoints move between machines.
  chex.assert_trees_all_equal_shapes_and_dtypes(nnx.state(cudnn, nnx.Param),
                                                nnx.state(model, nnx.Param))
  if jax.default_backend() != "gpu":
    backend = jax.default_backend()
    with pytest.raises(ValueError, match=r"model.attention='cudnn' runs only on NVIDIA GPUs;"
                       rf" this process runs on {backend}. Use model.attention='xla'"):
      cudnn.blocks[0].attn(h)


def test_masking_gamma_outside_range_raises():
  with pytest.raises(ValueError, match="mask_gamma"):
    tiny_config("masking", mask_gamma=1.0).validate()
  model = dit.DiT(tiny_config("masking"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="gamma"):
    model.draw_subsets(jax.random.key(0), 2, gamma=1.2)


def test_config_files_build_valid_models():
  from configs import imagenet256  # pylint: disable=g-import-not-at-top
  for arg in ("model=SiT-XL/2,sparsity=routing", "model=DiT-B/2,sparsity=masking",
              "model=DiT-B/2,sparsity=routing", "runlocal"):
    cfg = config_lib.model_config(imagenet256.get_config(arg).model)
    assert cfg.num_tokens in (256, 16)
  xl = config_lib.model_config(imagenet256.get_config("model=SiT-XL/2").model)
  assert xl.routes == (Route(2, 24, 0.5),) and xl.depth == 28
  b = config_lib.model_config(imagenet256.get_config("model=DiT-B/2").model)
  assert b.routes == (Route(2, 8, 0.5),)
  with pytest.raises(ValueError, match="unknown"):
    imagenet256.get_config("modle=SiT-XL/2")
