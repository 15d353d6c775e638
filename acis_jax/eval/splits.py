"""The real cases of the evaluation: the split into a training pool and a held-out test set,
the few-shot subsets of the pool, and cases stacked into arrays.

Real data and the split. `config.data` names the real data (`acis_jax.data.sources`):
  * 2-D (`data.image_shape` has 2 entries): axial slices. The training pool is
    `data.num_slices` slices spread over the axial band `evaluate.train_band` (fractions of
    the axial extent) of every volume, the test set `evaluate.num_test_slices` slices over
    `evaluate.test_band`; `data.slice_band` is not used. The bands must not overlap, so no
    slice is in both sets (checked by slice index too).
  * 3-D: whole volumes. The last `evaluate.num_test_cases` cases (in name order) are the test
    set, the others the training pool.
  * By patient, in 2-D and 3-D: `evaluate.test_cases` names the held-out cases (volumes),
    or, in 2-D with `evaluate.by_patient` and no names, the last `evaluate.num_test_cases`
    volumes in name order are held out; the pool is drawn from the other cases only (2-D:
    their `train_band`; the test slices from the test cases' `test_band`, which may then
    overlap it).
  The n cases of the few-shot arms are n cases of the pool spread evenly over it (in axial
  order for slices), the same for every seed and arm: the synthesizer of size n is trained on
  exactly them.

  A WEAK TEST when the slices come from one patient (the built-in sample CT): test slices are
  disjoint from the training slices but share the patient, scanner, contrast phase and noise,
  and neighbouring test slices are strongly correlated with each other. The Wilcoxon test
  treats the test slices as independent cases; they are not, so the effective sample size is
  smaller than the number of slices and the p-values are optimistic (too small). A '*' then
  says that ACIS beat the next best arm on these slices of this patient, not that the gain
  carries over to new patients; that needs held-out patients (`evaluate.test_cases`, e.g.
  experiments/fewshot_chest2d.py on the two built-in chest CTs).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from acis_jax.data.sources import Example, cases_digest, load_examples, parse_slice_name
from acis_jax.train import trainer


@dataclasses.dataclass(frozen=True)
class Split:
  """The real cases: the training pool (axial order for slices) and the held-out test set;
  `by_patient`: the test set is whole patients that the pool lacks."""
  pool: list[Example]
  test: list[Example]
  by_patient: bool = False


def _with_band(data: Any, band: Sequence[float], num_slices: int) -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict(data.to_dict())
  data.slice_band = tuple(float(b) for b in band)
  data.num_slices = int(num_slices)
  return data


def _slice_key(example: Example) -> tuple[str, int]:
  """(volume name, axial index) of a slice named `<volume>_z<index>` by `load_examples`."""
  key = parse_slice_name(example.name)
  if key is None:
    raise ValueError(f"{example.name}: a 2-D evaluation splits axial slices of 3-D volumes by "
                     "position, and this case is not such a slice (2-D source images have no "
                     "axial position to split by)")
  return key


def _patient(example: Example, is_2d: bool) -> str:
  return _slice_key(example)[0] if is_2d else example.name


def _split_by_patient(pool: list[Example], test: list[Example], test_cases: tuple[str, ...],
                      is_2d: bool) -> Split:
  """The pool without any case of `test_cases`, and the test set of only those."""
  patients = sorted({_patient(e, is_2d) for e in pool + test})
  unknown = [c for c in test_cases if c not in patients]
  if unknown:
    raise ValueError(f"evaluate.test_cases: no case named {unknown}; the cases are {patients}")
  if set(test_cases) == set(patients):
    raise ValueError(f"evaluate.test_cases={test_cases} holds out every case: none is left "
                     "to train on")
  pool = [e for e in pool if _patient(e, is_2d) not in test_cases]
  test = [e for e in test if _patient(e, is_2d) in test_cases]
  return Split(sorted(pool, key=_slice_key) if is_2d else pool, test, by_patient=True)


def load_split(config) -> Split:
  """The training pool and the test cases named by `config.data` and `config.evaluate`."""
  ev, data = config.evaluate, config.data
  test_cases = tuple(ev.test_cases)
  if len(data.image_shape) == 3:
    examples = sorted(load_examples(data), key=lambda e: e.name)
    if test_cases:
      return _split_by_patient(examples, examples, test_cases, is_2d=False)
    k = int(ev.num_test_cases)
    if not 1 <= k < len(examples):
      raise ValueError(f"evaluate.num_test_cases={k}: need 1 <= it < the {len(examples)} "
                       "volume(s) of config.data, so both the pool and the test set have cases")
    return Split(examples[:-k], examples[-k:])
  train_band, test_band = tuple(ev.train_band), tuple(ev.test_band)
  overlap = not (train_band[1] < test_band[0] or test_band[1] < train_band[0])
  if overlap and not (test_cases or ev.by_patient):
    raise ValueError(f"evaluate.train_band={train_band} and evaluate.test_band={test_band} "
                     "overlap: the test slices must come from a separate axial band")
  pool = load_examples(_with_band(data, train_band, data.num_slices))
  test = load_examples(_with_band(data, test_band, ev.num_test_slices))
  if ev.by_patient and not test_cases:
    patients = sorted({_patient(e, True) for e in pool + test})
    k = int(ev.num_test_cases)
    if not 1 <= k < len(patients):
      raise ValueError(f"evaluate.by_patient holds out the last evaluate.num_test_cases={k} "
                       f"patients in name order; need 1 <= it < the {len(patients)} patients "
                       f"{patients}")
    test_cases = tuple(patients[-k:])
  if test_cases:
    return _split_by_patient(pool, test, test_cases, is_2d=True)
  shared = sorted({_slice_key(e) for e in pool} & {_slice_key(e) for e in test})
  if shared:
    raise ValueError(f"slices {shared} fall in both bands (too few slices between "
                     f"train_band={train_band} and test_band={test_band}); widen the gap")
  return Split(sorted(pool, key=_slice_key), test)


def split_note(config, split: Split) -> str:
  """One paragraph for the report: where the training and test cases come from."""
  is_2d = len(config.data.image_shape) == 2
  pool_patients = sorted({_patient(e, is_2d) for e in split.pool})
  test_patients = sorted({_patient(e, is_2d) for e in split.test})
  if split.by_patient:
    what = "axial slices" if is_2d else "volume(s)"
    return (f"Split by patient: training pool {len(split.pool)} {what} of {pool_patients}; "
            f"held-out test set {len(split.test)} {what} of the other patient(s) "
            f"{test_patients}, never seen by the synthesizer or the downstream training.")
  if not is_2d:
    return (f"Training pool: {len(split.pool)} volume(s); held-out test set: "
            f"{len(split.test)} other volume(s).")
  volumes = sorted(set(pool_patients) | set(test_patients))
  note = (f"Training pool: {len(split.pool)} axial slices of the band "
          f"{tuple(config.evaluate.train_band)}; held-out test set: {len(split.test)} slices of "
          f"the disjoint band {tuple(config.evaluate.test_band)} (fractions of the axial "
          f"extent) of the same {len(volumes)} volume(s).")
  if len(volumes) == 1:
    note += (" All slices come from one patient and neighbouring slices are correlated, so "
             "the test cases are not independent and the p-values are optimistic.")
  return note


def few_shot_subset(pool: Sequence[Example], n: int) -> list[Example]:
  """`n` cases of `pool` spread evenly over it (its first and last included when n >= 2)."""
  if not 1 <= n <= len(pool):
    raise ValueError(f"evaluate.num_train has n={n}, but the training pool holds {len(pool)} "
                     "case(s) (data.num_slices slices per volume in 2-D)")
  return [pool[i] for i in np.round(np.linspace(0, len(pool) - 1, n)).astype(int)]


@dataclasses.dataclass(frozen=True)
class Cases:
  """Stacked cases: images `(m, *spatial, 1)` in [0, 1], labels `(m, *spatial)` or None."""
  images: np.ndarray
  labels: np.ndarray | None
  names: tuple[str, ...]
  spacings: tuple[tuple[float, ...], ...] = ()  # mm per spatial axis, per case (test sets)
  num_real: int = 0  # the first num_real cases are real, the rest synthetic; 0: all real

  def digest(self) -> str:
    return cases_digest(self.names, self.images, self.labels)


def stack_cases(config, examples: list[Example]) -> Cases:
  data = trainer.load_training_data(config, examples)
  return Cases(data.images, data.labels, data.names,
               tuple(e.image.spacing for e in examples))
