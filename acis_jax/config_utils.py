"""Turning config sections into the frozen dataclasses that jit keys on."""

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def dataclass_from_config(cls: type[T], config: Any, what: str) -> T:
  """`cls(**config)` for a mapping such as `config.pseudomask`; unknown keys are an error.

  `what` names the settings in the error ("pseudo-mask", "augmentation").
  """
  if isinstance(config, cls):
    return config
  fields = {f.name for f in dataclasses.fields(cls)}
  given = dict(config.items() if hasattr(config, "items") else config)
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ValueError(f"unknown {what} settings {unknown}; known: {sorted(fields)}")
  return cls(**given)
