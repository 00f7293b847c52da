"""Helpers for the ml_collections `get_config(arg)` files in configs/."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from sgjax.models import dit
from sgjax.sparsity import Route


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
  """'model=SiT-XL/2,runlocal' -> {'model': 'SiT-XL/2', 'runlocal': True, ...defaults}.

  Values take the type of their default; a bare key sets a boolean. Unknown keys raise.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is unknown; known: {sorted(defaults)}.")
    default = defaults[key]
    if not has_value:
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r}: expected true or false.")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = type(default)(value) if default is not None else value
  return out


def model_config(model: Mapping[str, Any]) -> dit.DiTConfig:
  """config.model (a ConfigDict or dict) -> validated DiTConfig.

  `name` is informational; `routes` is a sequence of (start, end, gamma).
  """
  fields = dict(model)
  fields.pop("name", None)
  known = {f.name for f in dataclasses.fields(dit.DiTConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"config.model has unknown field(s) {unknown}; known: {sorted(known)}.")
  routes = []
  for i, route in enumerate(fields.get("routes", ())):
    if len(route) != 3:
      raise ValueError(f"model.routes[{i}]={route!r}: expected (start, end, gamma).")
    routes.append(Route(int(route[0]), int(route[1]), float(route[2])))
  fields["routes"] = tuple(routes)
  return dit.DiTConfig(**fields).validate()
