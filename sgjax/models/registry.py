"""The model architectures sgjax trains, by the name `config.model.arch` gives them."""

from __future__ import annotations

from flax import nnx

from sgjax.models import dit, trdit

# arch -> (config class, model class). "dit": class-conditional DiT/SiT; "trdit": the
# text-to-image TR-DiT.
ARCHS = {"dit": (dit.DiTConfig, dit.DiT), "trdit": (trdit.TRDiTConfig, trdit.TRDiT)}
ModelConfig = dit.DiTConfig | trdit.TRDiTConfig
Model = dit.DiT | trdit.TRDiT


def build(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Model:
  """The model of an architecture config."""
  for config_class, model_class in ARCHS.values():
    if type(cfg) is config_class:
      return model_class(cfg, rngs=rngs)
  raise TypeError(f"no architecture has config type {type(cfg).__name__}.")
