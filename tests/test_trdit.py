"""TR-DiT: routing of image tokens with their rotary positions, text never routed, the null
caption, the 2.5B configuration, and guided sampling from captions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import t2i
from sgjax import config as config_lib, guidance as guidance_lib, plan, sampling
from sgjax.models import dit, trdit
from sgjax.sparsity import Route, TokenSubset
from sgjax.text import conditioning, words
from tests.helpers import perturbed_model

TEXT_LENGTH, TEXT_WIDTH = 5, 12


def tiny_trdit(sparsity_mode="routing", **overrides) -> trdit.TRDiTConfig:
  fields = dict(input_size=8, in_channels=3, patch_size=2, width=32, depth=4, num_heads=2,
                mlp_multiple=8, text_width=TEXT_WIDTH, text_length=TEXT_LENGTH,
                sparsity=sparsity_mode,
                routes=(Route(1, 2, 0.5),) if sparsity_mode == "routing" else ())
  fields.update(overrides)
  return trdit.TRDiTConfig(**fields)


def inputs(cfg, batch=2, seed=0):
  kx, kt, kc = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, cfg.input_size, cfg.input_size, cfg.in_channels))
  t = jax.random.uniform(kt, (batch,))
  mask = np.arange(cfg.text_length)[None] < np.array([[3], [4]])[:batch]
  cond = {"text": jax.random.normal(kc, (batch, cfg.text_length, cfg.text_width)),
          "mask": jnp.asarray(mask)}
  return x, t, cond


def subset_from_order(order: np.ndarray, num_kept: int) -> TokenSubset:
  """The TokenSubset keeping order[:, :num_kept] (in that order)."""
  order = jnp.asarray(order, jnp.int32)
  return TokenSubset(keep=order[:, :num_kept], drop=order[:, num_kept:],
                     restore=jnp.argsort(order, axis=-1).astype(jnp.int32))


def test_routing_at_gamma_zero_equals_the_dense_forward():
  routed = perturbed_model(tiny_trdit("routing"))
  dense = nnx.merge(nnx.graphdef(perturbed_model(tiny_trdit("dense"))), nnx.state(routed))
  x, t, cond = inputs(routed.cfg)
  subsets = routed.draw_subsets(jax.random.key(0), 2, gamma=0.0)
  assert subsets == (None,)
  chex.assert_trees_all_close(routed(x, t, cond, subsets), dense(x, t, cond), rtol=1e-6,
                              atol=1e-6)


@pytest.mark.parametrize("pos_embed", trdit.POS_EMBEDS)
def test_kept_tokens_rotate_with_their_own_positions(pos_embed):
  """A route that keeps every token in a shuffled order is the dense forward only if each
  token's 2D position travels with it (attention is otherwise order-blind); and with half
  the tokens kept, the order in which they are kept does not matter. With the absolute
  sin-cos table too, which must be added to the tokens before they are gathered."""
  model = perturbed_model(tiny_trdit(pos_embed=pos_embed))
  x, t, cond = inputs(model.cfg)
  n = model.cfg.num_tokens
  rng = np.random.default_rng(0)
  order = np.stack([rng.permutation(n) for _ in range(2)])
  shuffled = model(x, t, cond, (subset_from_order(order, n),))
  chex.assert_trees_all_close(shuffled, model(x, t, cond), rtol=1e-6, atol=1e-5)
  half = n // 2
  reordered = order.copy()
  reordered[:, :half] = reordered[:, :half][:, ::-1]
  chex.assert_trees_all_close(model(x, t, cond, (subset_from_order(order, half),)),
                              model(x, t, cond, (subset_from_order(reordered, half),)),
                              rtol=1e-6, atol=1e-5)


class _PlusTable(nnx.Module):
  """A patch embedding followed by DiT's sin-cos table: where pos_embed='sincos' adds it."""

  def __init__(self, embed, cfg):
    self.embed, self.table = embed, dit.sincos_pos_embed(cfg.width, cfg.grid_size)

  def __call__(self, patches):
    return self.embed(patches) + self.table


def test_the_absolute_position_table_is_added_to_the_patch_tokens_and_off_by_default():
  rope_only = perturbed_model(tiny_trdit())
  with_table = nnx.merge(nnx.graphdef(perturbed_model(tiny_trdit(pos_embed="sincos"))),
                         nnx.state(rope_only))  # no parameters of its own
  x, t, cond = inputs(rope_only.cfg)
  subsets = rope_only.draw_subsets(jax.random.key(1), 2, gamma=0.5)
  got = with_table(x, t, cond, subsets)
  assert np.abs(np.asarray(got - rope_only(x, t, cond, subsets))).max() > 1e-3
  rope_only.patch_embed = _PlusTable(rope_only.patch_embed, rope_only.cfg)
  chex.assert_trees_all_close(got, rope_only(x, t, cond, subsets), rtol=1e-6, atol=1e-6)
  assert t2i.get_config().model.pos_embed == "none"  # the paper's 2.5B model: RoPE only
  with pytest.raises(ValueError, match=r"model.pos_embed='learned'.*'none', 'sincos'"):
    tiny_trdit(pos_embed="learned").validate()


def test_rope_rotates_rows_and_columns_separately():
  angles = trdit.rope_angles(jnp.array([[[0, 0], [2, 0], [0, 3]]]), head_dim=8, theta=100.0)
  chex.assert_shape(angles, (1, 3, 4))
  # Head dim 8: two row and two column frequencies, theta ** -(0, 1/2) = (1, 0.1).
  chex.assert_trees_all_close(angles[0], np.array([[0.0, 0.0, 0.0, 0.0], [2.0, 0.2, 0.0, 0.0],
                                                   [0.0, 0.0, 3.0, 0.3]]), rtol=1e-6, atol=0)
  x = jax.random.normal(jax.random.key(0), (1, 3, 2, 8))
  rotated = trdit.apply_rope(x, angles)
  chex.assert_trees_all_close(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1),
                              rtol=1e-5, atol=0)


@pytest.mark.parametrize("block", [0, 1, 2, 3])
def test_every_valid_text_token_reaches_every_block_unrouted(block):
  """Only `block`'s cross-attention is left on; under routing the output still depends on
  every unpadded text token and on no padded one."""
  model = perturbed_model(tiny_trdit())
  for i, other in enumerate(model.blocks):
    if i != block:
      other.cross.proj.kernel[...] = jnp.zeros_like(other.cross.proj.kernel[...])
  x, t, cond = inputs(model.cfg)
  subsets = model.draw_subsets(jax.random.key(1), 2)
  assert subsets[0].num_kept < model.cfg.num_tokens

  def output(text):
    return jnp.sum(model(x, t, {"text": text, "mask": cond["mask"]}, subsets) ** 2)

  grads = jnp.linalg.norm(jax.grad(output)(cond["text"]), axis=-1)  # [B, L]
  mask = np.asarray(cond["mask"])
  assert np.all(grads[mask] > 1e-7), grads
  chex.assert_trees_all_equal(grads[~mask], jnp.zeros_like(grads[~mask]))


def test_null_caption_ignores_the_text_and_drops_with_the_mask():
  model = perturbed_model(tiny_trdit())
  x, t, cond = inputs(model.cfg)
  null = model.null_condition(cond)
  other = {"text": cond["text"] + 5.0, "mask": null["mask"]}
  chex.assert_trees_all_close(model(x, t, null), model(x, t, other), rtol=1e-6, atol=0)
  assert not np.allclose(model(x, t, null), model(x, t, cond), atol=1e-4)


def test_text_of_the_wrong_width_is_refused_with_the_fields_named():
  model = trdit.TRDiT(tiny_trdit(), rngs=nnx.Rngs(0))
  x, t, cond = inputs(model.cfg)
  with pytest.raises(ValueError, match="model.text_width=12"):
    model(x, t, {"text": cond["text"][..., :8], "mask": cond["mask"]})
  with pytest.raises(ValueError, match=r"\(model.text_length, model.text_width\)"):
    conditioning.check_batch({"text": np.zeros((1, 5, 8)), "mask": np.ones((1, 5))},
                             model.cfg, "batch")


def test_masking_is_refused_for_trdit():
  with pytest.raises(ValueError, match="MaskDiT masking is implemented for DiT only"):
    tiny_trdit("masking").validate()


def test_word_encoder_refuses_unknown_words_and_long_captions():
  encoder = words.WordEncoder(("a", "red", "3"), width=8, max_length=3)
  ids, mask = encoder.tokenize(["a red 3", "red"])
  chex.assert_trees_all_equal(ids, np.array([[0, 1, 2], [1, 0, 0]]))
  chex.assert_trees_all_equal(mask, np.array([[True] * 3, [True, False, False]]))
  hidden = encoder.encode(ids, mask)
  chex.assert_shape(hidden, (2, 3, 8))
  chex.assert_trees_all_equal(hidden[1, 1:], jnp.zeros_like(hidden[1, 1:]))
  # Frozen: the same words give the same vectors, whatever the batch.
  chex.assert_trees_all_close(hidden[1, 0], encoder.encode(ids[1:], mask[1:])[0, 0],
                              rtol=1e-6, atol=0)
  with pytest.raises(ValueError, match=r"word\(s\) \['blue'\]"):
    encoder.tokenize("a blue 3")
  with pytest.raises(ValueError, match="has 4 words; .* at most 3"):
    encoder.tokenize("a red 3 3")


def test_cfg_and_sg_guidance_combine_the_caption_and_null_branches():
  model = perturbed_model(tiny_trdit())
  x, t, cond = inputs(model.cfg)
  key = jax.random.key(3)
  for rule, weak_cond in (("cfg+sg", model.null_condition(cond)), ("sg", cond)):
    plan_ = sampling.make_plan(model.cfg, guidance_lib.GuidanceConfig(
        rule=rule, omega=2.5, gamma_strong=0.0, gamma_weak=0.5), steps=1)
    segment = plan_.segments[0]
    got = sampling.branch_velocity(model, None, rule, segment, x, t, cond, key, 2.5)
    weak_subsets = model.draw_subsets(jax.random.fold_in(key, 1), 2, 0.5)
    expected = 2.5 * model(x, t, cond) - 1.5 * model(x, t, weak_cond, weak_subsets)
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-5)


def test_packed_branches_equal_one_forward_per_branch():
  """SG's packed pass: each branch's tokens attend only within their branch, with their own
  positions, whatever the other branches keep (here 0.25, 0.75 and none dropped)."""
  model = perturbed_model(tiny_trdit(depth=5, routes=(Route(1, 3, 0.5),)))
  x, t, cond = inputs(model.cfg)
  branch_subsets = [model.draw_subsets(jax.random.key(i), 2, gamma)
                    for i, gamma in enumerate((0.25, 0.75, 0.0))]
  separate = [model(x, t, cond, subsets) for subsets in branch_subsets]
  chex.assert_trees_all_close(model.branches(x, t, cond, branch_subsets), tuple(separate),
                              rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(separate[0] - separate[1])).max() > 1e-2


def test_compiled_sampling_flops_match_the_library_for_each_rule():
  # As tests/test_sampling.py's DiT test: the library's shared-work accounting (the packed
  # SG pass; the vmapped CFG call, where block 0's self-attention precedes the text) must be
  # what the sampling loop computes. Ratios to the unguided loop; abstract models.
  cfg = tiny_trdit(input_size=16, width=128, depth=6, num_heads=4, mlp_multiple=64,
                   routes=(Route(1, 4, 0.5),))
  model = nnx.eval_shape(lambda: trdit.TRDiT(cfg, rngs=nnx.Rngs(0)))
  _, _, cond = inputs(cfg)

  def costs(guidance):
    sampler = sampling.Sampler(model, guidance, steps=3)
    return sampler.lower(cond, 0).compile().cost_analysis()["flops"], sampler.plan.flops.true

  base_compiled, base_library = costs(guidance_lib.GuidanceConfig("none"))
  for guidance in (guidance_lib.GuidanceConfig("sg", gamma_strong=0.5, gamma_weak=0.9),
                   guidance_lib.GuidanceConfig("sg", gamma_strong=0.0, gamma_weak=0.5),
                   guidance_lib.GuidanceConfig("cfg"),
                   guidance_lib.GuidanceConfig("cfg", gamma_strong=0.5, gamma_weak=0.5),
                   guidance_lib.GuidanceConfig("cfg+sg", gamma_strong=0.2, gamma_weak=0.7)):
    compiled, library = costs(guidance)
    ratio = (compiled / base_compiled) / (library / base_library)
    assert abs(ratio - 1) < 0.02, (guidance, compiled, library)


def test_sampler_takes_captions_and_refuses_labels_and_icg():
  model = perturbed_model(tiny_trdit())
  _, _, cond = inputs(model.cfg)
  sampler = sampling.Sampler(model, guidance_lib.GuidanceConfig(
      rule="sg", omega=2.0, gamma_strong=0.0, gamma_weak=0.5), steps=2)
  images = sampler(cond, 0)
  chex.assert_shape(images, (2, 8, 8, 3))
  chex.assert_tree_all_finite(images)
  with pytest.raises(ValueError, match="samples from captions"):
    sampler(jnp.zeros(2, jnp.int32), 0)
  with pytest.raises(ValueError, match="'icg' draws random class labels"):
    sampling.Sampler(model, guidance_lib.GuidanceConfig(rule="icg"), steps=2)


def test_2p5b_config_size_and_fsdp_sharding_on_8_devices():
  cfg = t2i.get_config()
  model_cfg = config_lib.model_config(cfg.model)
  assert (model_cfg.depth, model_cfg.width, model_cfg.num_heads) == (34, 2048, 16)
  assert model_cfg.routes == (Route(2, 30, 0.5),) and model_cfg.num_tokens == 1024
  result = plan.make_plan(cfg, devices=8, activations=False)
  assert result["mesh"]["shape"] == {"data": 1, "fsdp": 8, "tensor": 1}
  # Within 5% of 2.5B, the frozen encoder excluded (it is not part of the model).
  assert abs(result["num_params"] / 2.5e9 - 1) < 0.05, result["num_params"]
  per_device, total = result["per_device_bytes"], result["global_bytes"]
  # float32 parameters, sharded 8 ways over their `embed` axis (nothing allocated).
  assert total["params"] == 4 * result["num_params"]
  assert per_device["params"] <= total["params"] / 8 * 1.01
  assert per_device["opt_state"] <= total["opt_state"] / 8 * 1.01
