"""mode = "evaluate": the downstream protocol of the paper (sec 3.1, Tables 1 and 2).

For every few-shot size n in `evaluate.num_train`, every downstream task and network, and every
seed, one network is trained per arm and scored on held-out real cases only:

  * "baseline": the n real training cases;
  * "joint_gan": the n real cases + M pairs of a StyleGAN-like synthesizer trained on them
                (image and labels drawn together from noise, `acis_jax.synthesizers`);
  * "labels_first": the n real cases + M pairs of a MedGen3D-like synthesizer trained on them
                (a label map from noise, then an image painted from the labels alone);
  * "synthseg": the n real cases + M SynthSeg-style pairs painted on their label maps, the
                body (from their images) as a generation-only label
                (`acis_jax.synthesizers.synthseg`, `config.synthseg`; no training: its
                "synthesizer" only paints, into its own folder like the trained ones);
  * "acis-":    the n real cases + M synthetic pairs from the synthesizer BEFORE refinement;
  * "acis":     the n real cases + M synthetic pairs from the refined synthesizer;
  * "superpixel": the n real cases + M pairs of a V2UM2I-like synthesizer trained on them
                (ACIS's stages on SLIC superpixel masks, `acis_jax.synthesizers`);
  * "acis-real": the n real cases + M pairs of the refined image generator painting fresh
                pseudo-masks of the n real cases moved by random smooth diffeomorphisms, their
                labels moved alike ("ACIS from real anatomy", `synthesize.source = "real"`);
  * "upper":    every case of the real training pool (does not depend on n; trained once and
                recorded with n = the pool size).

Every arm trains for the same `evaluate.steps` with the same seeds, batch size and
augmentation, so arms differ only in their data. In the arms with synthetic pairs a fixed
share of each batch, `evaluate.real_share`, comes from the n real cases and the rest from the
M pairs; -1 draws batches uniformly from the whole set (the paper adds the pairs to the
training set and says nothing about re-weighting them: at n = 4, M = 32 such batches are 89 %
synthetic). A synthetic case's loss weighs `evaluate.synthetic_weight` against a real one's 1;
`evaluate.pretrain_fraction` > 0 trains that share of the steps on the synthetic pairs alone
and the rest on the real cases alone instead. M = `config.synthesize.num_samples`.

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

The synthesizer of size n (the default, `evaluate.train_synthesizer`): the ACIS stages are
trained on those n cases only (`acis_jax.train.trainer.train`, with `config.model`,
`config.train`, `config.refine`, ...) into WORKDIR/synth_n{n}_seed{seed}/, once per seed with
that seed, so that the synthesizer's own variance is in the error bars (or once per n into
WORKDIR/synth_n{n}/ with `evaluate.synthesizer_per_seed=False`); then `synthesize` writes the
pairs of the synthetic arms there (`acis_jax.workdir.SYNTHETIC_FOLDERS`; HU int16 on disk,
windowed back to [0, 1] with `window_hu`; labels uint8). Both steps resume: finished stages are skipped,
and complete synthetic folders skip training and synthesis altogether, so pre-made folders put
there are used as they are (with `train_synthesizer=False`, missing ones are an error). After
changing the synthesizer's settings, delete WORKDIR/synth_n*/ to train it again.

Outputs under WORKDIR/eval/: results.csv (one row per arm, n, net, task, seed, test case and
metric), table.md (the paper's layout, see `acis_jax.eval.report`) and plots/*.png (metric
against n, one line per arm). Each trained arm's rows are also kept in
eval/runs/<task>/<net>/<arm>_n<n>_seed<seed>.json with a key of everything that determines
them (settings, and digests of the training and test arrays): a re-run reuses an arm only when
its key is unchanged, so an interrupted evaluation resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from acis_jax.data.augment import AugmentParams, downstream_augment
from acis_jax.data.synthetic import load_synthetic, synthetic_complete
from acis_jax.data.sources import Example, cases_digest, load_examples, parse_slice_name
from acis_jax.eval import downstream, report
from acis_jax.eval.nets import RECONSTRUCTION_NETS, SEGMENTATION_NETS, net_factory
from acis_jax.jobs import synthesize
from acis_jax.synthesizers import PSEUDO_MASK_METHODS
from acis_jax.train import trainer
from acis_jax.workdir import SYNTHETIC_FOLDERS, Workdir, write_json_atomically

ARMS = tuple(report.ARM_TITLES)



# ---------------------------------------------------------------------------------------------
# Real data: the split and the few-shot subsets


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


# ---------------------------------------------------------------------------------------------
# Synthetic data


# The arms whose pairs a trained synthesizer makes: arm -> (config.synthesizer, the folder of
# its work directory, by SYNTHETIC_FOLDERS' arm names).
TRAINED_ARMS = {"acis-": ("acis", "acis-"), "acis": ("acis", "acis"),
                "acis-real": ("acis", "acis-real"), "superpixel": ("superpixel", "acis"),
                "joint_gan": ("joint_gan", "acis"), "labels_first": ("labels_first", "acis"),
                "synthseg": ("synthseg", "acis")}


def synthesizer_dir(config, workdir: str, n: int, seed: int, name: str) -> Workdir:
  """Where synthesizer `name` of size n for `seed` lives: one per seed
  (`evaluate.synthesizer_per_seed`, its variance then in the error bars) or one per n."""
  per_seed = config.evaluate.synthesizer_per_seed
  return Workdir(workdir).synthesizer(n, seed if per_seed else None, name)


def ensure_synthetic(config, workdir: str, n: int, seed: int, examples: list[Example],
                     name: str, folders: Sequence[str]) -> Workdir:
  """The work directory of synthesizer `name` (`synthesizer_dir`), with its synthetic
  `folders` (SYNTHETIC_FOLDERS' arm names) made by it trained on `examples`.

  Complete folders are used as they are; otherwise the synthesizer is trained (finished
  stages skipped, seeded by `seed` when there is one per seed) and the missing folders are
  written: ACIS and ACIS- by `synthesize` (`synthesize.source`), ACIS from real anatomy by
  `synthesize.write_from_real`.
  """
  root = synthesizer_dir(config, workdir, n, seed, name)
  count, labelled = config.synthesize.num_samples, config.data.num_classes > 0
  missing = [arm for arm in folders
             if not synthetic_complete(root.synthetic(arm), count, labelled)]
  if not missing:
    return root
  if not config.evaluate.train_synthesizer:
    raise ValueError(f"{root.root}: the synthetic folders "
                     f"{[SYNTHETIC_FOLDERS[arm] for arm in missing]} lack some of "
                     f"synth_0000..synth_{count - 1:04d}, and evaluate.train_synthesizer=False")
  synth_config = config.copy_and_resolve_references()
  synth_config.synthesizer = name
  if config.evaluate.synthesizer_per_seed:
    synth_config.seed = int(seed)
  synth_config.synthesize.unrefined = "acis-" in folders
  synth_config.synthesize.quality = False   # the downstream table is this synthesizer's report
  logging.info("[evaluate] training the %s synthesizer for n=%d (seed %d) on %s", name, n,
               synth_config.seed, [e.name for e in examples])
  trainer.train(synth_config, root.root, examples=examples)
  if {"acis", "acis-"} & set(missing):
    synthesize.run(synth_config, root.root, examples=examples)
  if "acis-real" in missing:
    synthesize.write_from_real(synth_config, root.root, examples)
  return root


# ---------------------------------------------------------------------------------------------
# Tasks and networks


def downstream_tasks(config) -> list[downstream.Task]:
  """The tasks `config.evaluate` asks for, segmentation first."""
  ev = config.evaluate
  tasks = []
  if ev.segmentation:
    if config.data.num_classes < 2:
      raise ValueError(f"evaluate.segmentation needs labels: data.num_classes="
                       f"{config.data.num_classes} (set evaluate.segmentation=False)")
    tasks.append(downstream.Task(downstream.SEGMENTATION, num_classes=config.data.num_classes))
  for name, levels in (("denoise", ev.denoise_sigmas), ("deblur", ev.deblur_sigmas),
                       ("superres", ev.superres_factors)):
    tasks += [downstream.Task(name, level=float(level)) for level in levels]
  if not tasks:
    raise ValueError("config.evaluate names no task: enable segmentation or give denoise_sigmas, "
                     "deblur_sigmas or superres_factors")
  return tasks


def task_label(task: downstream.Task) -> str:
  """The task's name in results.csv: "segmentation", "denoise_0.1", "superres_2", ..."""
  return task.name if task.is_segmentation else f"{task.name}_{task.level:g}"


def task_nets(task: downstream.Task, ev) -> tuple[str, ...]:
  """The networks trained for `task`."""
  if task.is_segmentation:
    nets, family = tuple(ev.segmentation_nets), SEGMENTATION_NETS
  else:
    nets = tuple(ev.reconstruction_nets) + (tuple(ev.superres_nets)
                                             if task.name == "superres" else ())
    family = RECONSTRUCTION_NETS
  wrong = [net for net in nets if net not in family]
  if wrong:
    raise ValueError(f"{task_label(task)}: unknown networks {wrong}; choose from {family}")
  return nets


def learning_rate(task: downstream.Task, ev) -> float:
  """Adam's step size for a task's networks."""
  return (ev.segmentation_learning_rate if task.is_segmentation
          else ev.reconstruction_learning_rate)


# ---------------------------------------------------------------------------------------------
# One arm


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


def _join(real: Cases, images: np.ndarray, labels: np.ndarray | None) -> Cases:
  return Cases(np.concatenate([real.images, images]),
               None if real.labels is None else np.concatenate([real.labels, labels]),
               real.names + tuple(f"synthetic_{i:04d}" for i in range(len(images))),
               num_real=len(real.names))


def evaluate_cases(model: downstream.Trained, task: downstream.Task, test: Cases, ev,
                   seed: int) -> list[dict[str, float]]:
  """Per-case metrics on the test set, in its order; cases grouped by voxel spacing."""
  results = [None] * len(test.names)
  for spacing in sorted(set(test.spacings)):
    index = [i for i, s in enumerate(test.spacings) if s == spacing]
    targets = test.labels[index] if task.is_segmentation else None  # None: the clean images
    scores = downstream.evaluate_downstream(
        model, task, test.images[index], targets,
        spacing=spacing, nsd_tolerance_mm=ev.nsd_tolerance_mm, batch_size=ev.batch_size,
        seed=seed)
    for i, case in zip(index, scores):
      results[i] = case
  return results


def run_arm(key: dict, net: str, task: downstream.Task, train: Cases, test: Cases, ev,
            augment: downstream.Augment, record_path: str, test_seed: int) -> list[dict]:
  """Trains one network on `train`, scores it on `test`; the rows of results.csv.

  Reuses the rows saved at `record_path` when they were made under the same `key`.
  """
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
    if record["key"] == key:
      return record["rows"]
  start = time.time()
  spatial_dims = train.images.ndim - 2
  model = downstream.train_downstream(
      net_factory(net, task, ev.nets[net].to_dict(), spatial_dims), task, train.images,
      train.labels if task.is_segmentation else None, steps=ev.steps,
      batch_size=ev.batch_size,
      learning_rate=learning_rate(task, ev), seed=key["seed"], augment=augment,
      num_real=train.num_real, real_share=ev.real_share, synthetic_weight=ev.synthetic_weight,
      pretrain_steps=round(ev.steps * ev.pretrain_fraction) if train.num_real else 0)
  trained = time.time()
  scores = evaluate_cases(model, task, test, ev, test_seed)
  rows = [{"arm": key["arm"], "n": key["n"], "net": net, "task": key["task"],
           "seed": key["seed"], "case": case, "metric": metric, "value": value}
          for case, values in zip(test.names, scores) for metric, value in values.items()]
  os.makedirs(os.path.dirname(record_path), exist_ok=True)
  write_json_atomically(record_path, {"key": key, "rows": rows,
                                      "final_loss": float(model.losses[-1])})
  logging.info("[evaluate] %s %s %s n=%d seed=%d: %d training cases, final loss %.4f; "
               "trained in %.1f s, evaluated in %.1f s", key["task"], net, key["arm"],
               key["n"], key["seed"], len(train.names), float(model.losses[-1]),
               trained - start, time.time() - trained)
  return rows


def _check_settings(config) -> None:
  ev = config.evaluate
  unknown = [arm for arm in ev.arms if arm not in ARMS]
  if unknown or not ev.arms:
    raise ValueError(f"evaluate.arms={tuple(ev.arms)}: unknown {unknown}; choose from {ARMS}")
  if not ev.seeds:
    raise ValueError("evaluate.seeds is empty")
  if not 0 <= ev.pretrain_fraction < 1 or ev.synthetic_weight <= 0:
    raise ValueError(f"evaluate.pretrain_fraction={ev.pretrain_fraction} must lie in [0, 1) "
                     f"and evaluate.synthetic_weight={ev.synthetic_weight} be > 0")
  if not ev.num_train and any(arm != "upper" for arm in ev.arms):
    raise ValueError("evaluate.num_train is empty but the arms need few-shot sizes")
  label_only = [arm for arm in ev.arms
                if arm in TRAINED_ARMS and not PSEUDO_MASK_METHODS[TRAINED_ARMS[arm][0]]]
  if label_only and config.data.num_classes < 2:
    raise ValueError(f"evaluate.arms has {label_only}, whose synthesizers make or paint label "
                     f"maps: they need labels (data.num_classes >= 2, got "
                     f"{config.data.num_classes})")
  if jax.process_count() > 1:
    raise ValueError("mode=evaluate runs in a single process; start it without "
                     "jax.distributed")


def training_sets(config, workdir: str, split: Split) -> dict[tuple[str, int, int], Cases]:
  """`(arm, n, seed) -> training cases` of every arm; trains the synthesizers it needs."""
  ev = config.evaluate
  synthesizers = {}  # name -> the folders the arms want of it
  for arm in ev.arms:
    if arm in TRAINED_ARMS:
      name, folder = TRAINED_ARMS[arm]
      synthesizers.setdefault(name, []).append(folder)
  sets, loaded = {}, {}
  for n in map(int, ev.num_train):
    examples = few_shot_subset(split.pool, n)
    real = stack_cases(config, examples)
    for seed in map(int, ev.seeds):
      roots = {name: ensure_synthetic(config, workdir, n, seed, examples, name, folders)
               for name, folders in synthesizers.items()}
      for arm in ev.arms:
        if arm == "baseline":
          sets[arm, n, seed] = real
        elif arm in TRAINED_ARMS:
          name, folder = TRAINED_ARMS[arm]
          path = roots[name].synthetic(folder)
          if path not in loaded:  # one synthesizer for every seed: read its folders once
            loaded[path] = _join(real, *load_synthetic(path, config.synthesize.num_samples,
                                                       config))
          sets[arm, n, seed] = loaded[path]
  if "upper" in ev.arms:
    pool = stack_cases(config, split.pool)
    sets.update({("upper", len(split.pool), int(seed)): pool for seed in ev.seeds})
  return sets


# What a table's numbers depend on besides the code and the config: a fresh install of other
# versions gave other numbers (issue 13).
VERSIONED = ("acis-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy")


def environment() -> dict[str, Any]:
  """The package versions, Python, platform and JAX devices of this run."""
  versions = {}
  for name in VERSIONED:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {"packages": versions, "python": platform.python_version(),
          "platform": platform.platform(),
          "devices": sorted({d.device_kind for d in jax.devices()})}


def run(config, workdir: str) -> None:
  """Runs the protocol (module docstring) and writes WORKDIR/eval/."""
  _check_settings(config)
  ev = config.evaluate
  tasks = downstream_tasks(config)
  for task in tasks:
    task_nets(task, ev)  # fail on a misnamed network before hours of training
  split = load_split(config)
  test = stack_cases(config, split.test)
  logging.info("[evaluate] training pool %d case(s), test set %d case(s): %s",
               len(split.pool), len(split.test), list(test.names))
  sets = training_sets(config, workdir, split)
  out = Workdir(workdir).eval
  augment_params = AugmentParams.from_config(ev.augment)
  # One augment function per kind of target, so every arm reuses one compiled train step.
  augments = {True: downstream_augment(augment_params, config.data.num_classes or None),
              False: downstream_augment(augment_params)}
  rows = []
  for task in tasks:
    for net in task_nets(task, ev):
      for (arm, n, seed), train in sets.items():
        key = {"task": task_label(task), "net": net, "arm": arm, "n": n, "seed": int(seed),
               "net_config": ev.nets[net].to_dict(), "steps": ev.steps,
               "batch_size": ev.batch_size, "loss": downstream.LOSSES[task.is_segmentation],
               "learning_rate": learning_rate(task, ev), "augment": ev.augment.to_dict(),
               "nsd_tolerance_mm": ev.nsd_tolerance_mm, "test_seed": config.seed,
               "train_digest": train.digest(), "test_digest": test.digest()}
        if train.num_real:
          key.update(real_share=ev.real_share, synthetic_weight=ev.synthetic_weight,
                     pretrain_fraction=ev.pretrain_fraction)
        # The ConfigDict's tuples would read back from JSON as lists: compare like with like.
        key = json.loads(json.dumps(key))
        record = os.path.join(out, "runs", key["task"], net, f"{arm}_n{n}_seed{seed}.json")
        rows += run_arm(key, net, task, train, test, ev, augments[task.is_segmentation],
                        record, config.seed)
  env = environment()
  write_json_atomically(os.path.join(out, "environment.json"), env)
  packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
  paths = report.write_report(rows, out, alpha=ev.alpha, preamble=(
      f"{split_note(config, split)}\n\nMade with {packages}, Python {env['python']} on "
      f"{', '.join(env['devices'])} (environment.json)."))
  logging.info("[evaluate] wrote %s", ", ".join(paths))
