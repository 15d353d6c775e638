"""Label tables (id -> name) and classes chosen by name, so that datasets can be combined.

Every source states what its label ids mean: an nnU-Net folder in its `dataset.json`
(`"labels": {"heart": 1, ...}`, nnU-Net v2, or `{"1": "heart", ...}`, the Decathlon's), the
built-in samples and the phantom in their modules. `config.data.classes` then picks classes by
name, in order: class k of the run is `classes[k - 1]`, 0 is everything else. A name a table
lacks can be derived from ones it has (`DERIVED`: a lung is the union of its lobes).
Names follow TotalSegmentator's spelling (lower case, underscores).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

LabelTable = Mapping[int, str]

# Names that are unions of others, for tables that have the parts but not the whole.
DERIVED = {
    "left_lung": ("lung_upper_lobe_left", "lung_lower_lobe_left"),
    "right_lung": ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"),
}


def full_table(named: Mapping[int, str], num_classes: int) -> dict[int, str]:
  """Ids 0 .. num_classes - 1 with their names: 0 is "background", an id `named` lacks is
  "class_K"."""
  return {k: "background" if k == 0 else named.get(k, f"class_{k}") for k in range(num_classes)}


def read_dataset_json(data_dir: str | os.PathLike) -> dict[int, str] | None:
  """The label table of `data_dir/dataset.json`, or None when the folder has no such file.

  Raises:
    ValueError naming the file when it is not JSON, has no "labels" entry, or maps two
    names to one id.
  """
  path = Path(data_dir) / "dataset.json"
  if not path.is_file():
    return None
  try:
    labels = json.loads(path.read_text())["labels"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: expected a JSON object with a \"labels\" entry "
                     f"({type(e).__name__}: {e})") from e
  table: dict[int, str] = {}
  for key, value in labels.items():
    try:  # nnU-Net v2: name -> id; the Decathlon: "id" -> name
      ident, name = (int(value), key) if not str(key).isdigit() else (int(key), value)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{path}: label {key!r}: {value!r} is not an integer id") from e
    if ident in table:
      raise ValueError(f"{path}: id {ident} is named both {table[ident]!r} and {name!r}")
    table[ident] = str(name)
  return table


def available_names(table: LabelTable) -> list[str]:
  """The names `select_classes` accepts for `table`: its own and those derivable from it."""
  own = [n for i, n in sorted(table.items()) if i != 0]
  return own + [n for n in DERIVED if n not in own and _ids_of(n, table)]


def _ids_of(name: str, table: LabelTable) -> list[int]:
  ids = [i for i, n in table.items() if n == name and i != 0]
  if ids:
    return ids
  parts = DERIVED.get(name, ())
  if parts and all(p in table.values() for p in parts):
    return [i for i, n in table.items() if n in parts]
  return []


def select_classes(labels: np.ndarray, table: LabelTable, classes: Sequence[str],
                   source: str) -> np.ndarray:
  """`labels` relabelled so that voxels of `classes[k]` are k + 1 and all others 0 (uint8).

  Raises:
    ValueError naming `source` (the label file) and listing the names its table has, when a
    class is neither in the table nor derivable, or when one is asked for twice.
  """
  duplicated = sorted({c for c in classes if list(classes).count(c) > 1})
  if duplicated:
    raise ValueError(f"data.classes names {duplicated} more than once")
  out = np.zeros(labels.shape, np.uint8)
  for k, name in enumerate(classes, start=1):
    ids = _ids_of(name, table)
    if not ids:
      raise ValueError(f"{source}: no class {name!r}; its labels are {available_names(table)}")
    out[np.isin(labels, ids)] = k
  return out
