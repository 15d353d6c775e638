"""Loading experiment configs, and turning config sections into the frozen dataclasses that
jit keys on."""

import dataclasses
import importlib.util
import os
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


def load_config_file(path: str, arg: str | None = None) -> Any:
  """`get_config(arg)` of an experiment file, as `--config=PATH:ARG` would load it."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such experiment config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def parse_presets(arg: str | None, known: tuple[str, ...]) -> set[str]:
  """The comma-separated presets of `--config=FILE:ARG`; an unknown one is an error."""
  presets = set(arg.split(",")) if arg else set()
  unknown = sorted(presets.difference(known))
  if unknown:
    raise ValueError(f"unknown presets {unknown}; known: {known}")
  return presets
