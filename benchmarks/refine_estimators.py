"""The refinement's gradient estimators head to head, on a trained synthesizer.

    python benchmarks/refine_estimators.py --config=experiments/demo.py --workdir=runs/demo
    python benchmarks/refine_estimators.py --config=experiments/fewshot_chest2d.py:swap \\
        --workdir=runs/fewshot_chest2d_swap --n=4       # the evaluation's synthesizer of n = 4

The work directory must hold the finished masks, images and registration stages (with
`--n`, WORKDIR/synth_n{n}/ of an evaluation, trained on the protocol's n few-shot cases). From
the state the refinement starts in, each estimator's update of the image generator is taken
for `--keys` step keys (each key draws its own pseudo-masks, real batch, registration passes
and actions), with the realism term off and plain SGD of rate 1, so that the update is the
reward's gradient estimate itself. Estimators:

- `paper`: policy gradient, one action per sample with per-voxel noise, moving-average
  baseline (`refine.actions=1, refine.noise_factor=1`);
- `policy`: policy gradient as configured (`refine.actions`, `refine.noise_factor`);
- `backprop`: the reward differentiated through the frozen registration net.

Columns: `snr`, the signal-to-noise ratio of one estimate, |mean g|^2 / mean |g - mean g|^2
over the keys (an estimate averaging m keys has m times it); `cos mean`, the cosine between
the estimator's mean and backprop's mean (the direction it should find); `cos one`, the mean
cosine of a single estimate with backprop's mean; compile and step seconds (median of the
keys); XLA's buffer assignment of the compiled step (arguments + outputs - aliases +
temporaries), GiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from acis_jax.config_utils import load_config_file
from acis_jax.rng import step_key
from acis_jax.train import refine, trainer
from acis_jax.train.networks import load_network
from acis_jax.train.stages import REFINE, stages
from acis_jax.workdir import Workdir

ESTIMATORS = {"paper": {"mode": "policy_gradient", "actions": 1, "noise_factor": 1},
              "policy": {"mode": "policy_gradient"},
              "backprop": {"mode": "backprop"}}


def training_data(config, n):
  if not n:
    return trainer.load_training_data(config)
  from acis_jax.eval import splits
  return trainer.load_training_data(
      config, splits.few_shot_subset(splits.load_split(config).pool, n))


def estimates(config, workdir: Workdir, data, settings: dict, keys: int):
  """`(updates (keys, parameters), compile s, median step s, GiB)` of one estimator."""
  config = config.copy_and_resolve_references()
  config.refine.realism_weight = 0.0
  config.refine.update(settings)
  stage = next(s for s in stages(config) if s.name == REFINE)
  ctx = dataclasses.replace(trainer.step_context(config, stage),
                            optimizers={n: optax.sgd(1.0) for n in stage.trained})
  start = {n: load_network(workdir, s, n, config) for n, s in stage.init_from.items()}
  state = trainer.fresh_state(stage, config, ctx, start)
  frozen = {n: load_network(workdir, s, n, config) for n, s in stage.frozen.items()}
  flat = lambda params: jnp.concatenate([x.ravel() for x in jax.tree.leaves(params)])
  before = flat(state.params["image_generator"])
  batch = trainer.sample_batch(data, config, REFINE, 0, stage.pairs)
  began = time.perf_counter()
  step = jax.jit(refine.make_refine_step(ctx)).lower(
      state, frozen, batch, step_key(config.seed, "bench", 0)).compile()
  compile_s = time.perf_counter() - began
  memory = step.memory_analysis()
  gib = float("nan") if memory is None else (
      memory.argument_size_in_bytes + memory.output_size_in_bytes
      - memory.alias_size_in_bytes + memory.temp_size_in_bytes) / 2**30
  updates, times = [], []
  for k in range(keys):
    batch = trainer.sample_batch(data, config, REFINE, k, stage.pairs)
    began = time.perf_counter()
    new, _ = step(state, frozen, batch, step_key(config.seed, "bench", k))
    updates.append(np.asarray(before - flat(new.params["image_generator"])))
    times.append(time.perf_counter() - began)
  return np.stack(updates), compile_s, float(np.median(times)), gib


def cosine(a, b) -> float:
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="FILE.py[:preset] the run was made with")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--n", type=int, default=0, help="the evaluation's synthesizer of n cases")
  parser.add_argument("--keys", type=int, default=32)
  parser.add_argument("--estimators", default=",".join(ESTIMATORS))
  args = parser.parse_args(argv)
  path, _, preset = args.config.partition(":")
  config = load_config_file(path, preset or None)
  workdir = Workdir(os.path.join(args.workdir, f"synth_n{args.n}") if args.n else args.workdir)
  data = training_data(config, args.n)
  rows = {name: estimates(config, workdir, data, ESTIMATORS[name], args.keys)
          for name in args.estimators.split(",")}
  reference = rows["backprop"][0].mean(0) if "backprop" in rows else None
  print(f"{args.keys} keys, batch {config.train.batch_size}, {tuple(config.data.image_shape)}, "
        f"T = {config.refine.passes}, policy: K = {config.refine.actions} actions, noise "
        f"factor {config.refine.noise_factor}, sigma {config.refine.sigma}")
  print("| estimator | snr | cos mean | cos one | compile s | step s | GiB |")
  print("|---|---|---|---|---|---|---|")
  for name, (updates, compile_s, step_s, gib) in rows.items():
    mean = updates.mean(0)
    snr = float(mean @ mean / np.mean(np.sum((updates - mean) ** 2, axis=1)))
    cos_mean = cos_one = float("nan")
    if reference is not None:
      cos_mean = cosine(mean, reference)
      cos_one = float(np.mean([cosine(u, reference) for u in updates]))
    print(f"| {name} | {snr:.3g} | {cos_mean:.3f} | {cos_one:.3f} | {compile_s:.1f} | "
          f"{step_s:.3f} | {gib:.3f} |")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
