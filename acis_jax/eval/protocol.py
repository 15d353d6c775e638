"""mode = "evaluate": the downstream protocol of the paper (sec 3.1, Tables 1 and 2).

For every few-shot size n in `evaluate.num_train`, every downstream task and network, and every
seed, one network is trained per arm and scored on held-out real cases only:

  * "baseline": the n real training cases;
  * "joint_gan": + M pairs of a StyleGAN-like synthesizer (image and labels drawn together
                from noise);
  * "labels_first": + M pairs of a MedGen3D-like synthesizer (a label map from noise, then an
                image painted from the labels alone);
  * "superpixel": + M pairs of a V2UM2I-like synthesizer (ACIS's stages on SLIC superpixel
                masks);
  * "synthseg": + M SynthSeg-style pairs painted on the n real label maps (no training);
  * "acis-":    + M pairs of ACIS before refinement;
  * "acis":     + M pairs of ACIS;
  * "acis-real": + M pairs of ACIS's refined image generator painting fresh pseudo-masks of
                the n real cases moved by random smooth diffeomorphisms, their labels moved
                alike ("ACIS from real anatomy", `synthesize.source = "real"`);
  * "upper":    every case of the real training pool (does not depend on n; trained once and
                recorded with n = the pool size).
Each synthetic arm's synthesizer (`acis_jax.synthesizers`) is trained on the n real cases
only, whose pairs join them (`acis_jax.eval.arms`); the real cases, their split into a
training pool and a held-out test set and the few-shot subsets: `acis_jax.eval.splits`.

Every arm trains for the same `evaluate.segmentation_steps` (or `reconstruction_steps`) with
the same seeds, batch size and augmentation, so arms differ only in their data. In the arms
with synthetic pairs a fixed share of each batch, `evaluate.real_share`, comes from the n real
cases and the rest from the M pairs; -1 draws batches uniformly from the whole set (the
paper adds the pairs to the training set and says nothing about re-weighting them: at n = 4,
M = 32 such batches are 89 % synthetic). A synthetic case's loss weighs
`evaluate.synthetic_weight` against a real one's 1; `evaluate.pretrain_fraction` > 0 trains
that share of the steps on the synthetic pairs alone and the rest on the real cases alone
instead. M = `config.synthesize.num_samples`.

Outputs under WORKDIR/eval/: results.csv (one row per arm, n, net, task, seed, test case and
metric), table.md (the paper's layout, see `acis_jax.eval.report`) and plots/*.png (metric
against n, one line per arm). Each trained arm's rows are also kept in
eval/runs/<task>/<net>/<arm>_n<n>_seed<seed>.json with a key of everything that determines
them (settings, and digests of the training and test arrays): a re-run reuses an arm only when
its key is unchanged, so an interrupted evaluation resumes where it stopped.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time
from typing import Any

from absl import logging
import jax

from acis_jax.data.augment import AugmentParams, downstream_augment
from acis_jax.eval import downstream, report
from acis_jax.eval.arms import TRAINED_ARMS, training_sets
from acis_jax.eval.nets import RECONSTRUCTION_NETS, SEGMENTATION_NETS, net_factory
from acis_jax.eval.splits import Cases, load_split, split_note, stack_cases
from acis_jax.synthesizers import uses_pseudo_masks
from acis_jax.workdir import Workdir, write_json_atomically

ARMS = tuple(report.ARM_TITLES)


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


def training_steps(task: downstream.Task, ev) -> int:
  """How many optimiser steps a task's networks train for, in every arm."""
  return ev.segmentation_steps if task.is_segmentation else ev.reconstruction_steps


# ---------------------------------------------------------------------------------------------
# One arm


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

  Reuses the rows saved at `record_path` when they were made under the same `key`; trains
  with the key's seed, step count and learning rate, so a record says what made it.
  """
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
    if record["key"] == key:
      return record["rows"]
  start = time.time()
  spatial_dims = train.images.ndim - 2
  steps = key["steps"]
  model = downstream.train_downstream(
      net_factory(net, task, ev.nets[net].to_dict(), spatial_dims), task, train.images,
      train.labels if task.is_segmentation else None, steps=steps,
      batch_size=ev.batch_size,
      learning_rate=key["learning_rate"], seed=key["seed"], augment=augment,
      num_real=train.num_real, real_share=ev.real_share, synthetic_weight=ev.synthetic_weight,
      pretrain_steps=round(steps * ev.pretrain_fraction) if train.num_real else 0)
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
                if arm in TRAINED_ARMS and not uses_pseudo_masks(TRAINED_ARMS[arm][0])]
  if label_only and config.data.num_classes < 2:
    raise ValueError(f"evaluate.arms has {label_only}, whose synthesizers make or paint label "
                     f"maps: they need labels (data.num_classes >= 2, got "
                     f"{config.data.num_classes})")
  if jax.process_count() > 1:
    raise ValueError("mode=evaluate runs in a single process; start it without "
                     "jax.distributed")


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
               "net_config": ev.nets[net].to_dict(), "steps": training_steps(task, ev),
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
