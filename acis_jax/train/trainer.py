"""The training loop of the ACIS stages: resumable, data parallel, checked for NaNs.

Stages run in order: `masks` (sec 2.2: mask GAN + annotation generator),
`images` (pix2pix, then fine-tuning on generated pseudo-masks), `registration`
and `refine` (sec 2.3). Each writes orbax checkpoints under
`WORKDIR/checkpoints/<stage>/` and, once finished, its trained networks under
`WORKDIR/networks/<stage>/<network>/`, which later stages and `synthesize`
read. A finished stage is never retrained; an interrupted one resumes from its
latest checkpoint and ends with the same number of steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from acis_jax.data.augment import AugmentParams
from acis_jax.data.patches import check_patch_shape
from acis_jax.data.sources import Example, load_examples
from acis_jax.pseudomask import PseudoMaskParams
from acis_jax.train import parallel, steps
from acis_jax.train.checkpoint import restore_state, save_state
from acis_jax.train.networks import abstract_params, init_networks
from acis_jax.train.progress import Progress
from acis_jax.train.stage_checkpoints import StageCheckpoints, write_json_atomically


@dataclasses.dataclass(frozen=True)
class TrainingData:
  """The preprocessed real examples, in host memory.

  images: float32 `(n, *spatial, 1)` in [0, 1]; labels: int32 `(n, *spatial)` or None;
  affine: the grid of the first example (synthetic volumes are written on it).
  """

  images: np.ndarray
  labels: np.ndarray | None
  affine: np.ndarray
  names: tuple[str, ...]


def load_training_data(config, examples: list[Example] | None = None) -> TrainingData:
  """The real examples stacked; `examples` (default: those `config.data` names) are taken as
  given, e.g. a few-shot subset chosen by `acis_jax.eval.protocol`."""
  examples = load_examples(config.data) if examples is None else examples
  num_classes = config.data.num_classes
  labels = None
  if num_classes:
    missing = [e.name for e in examples if e.label is None]
    if missing:
      raise ValueError(f"config.data.num_classes={num_classes} but these cases have no labels: "
                       f"{missing}; set num_classes=0 for label-free training")
    labels = np.stack([e.label.array for e in examples]).astype(np.int32)
    if labels.max() >= num_classes:
      raise ValueError(f"labels go up to {labels.max()} but config.data.num_classes="
                       f"{num_classes}; it must count the background too")
  images = np.stack([e.image.array for e in examples]).astype(np.float32)[..., None]
  return TrainingData(images, labels, examples[0].image.affine,
                      tuple(e.name for e in examples))


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: the networks it trains, those it reads, and its steps.

  `init_from` maps trained networks that start from an earlier stage's result;
  `frozen` maps read-only networks to the stage that made them. `phases` lists
  `(steps, step factory)` run one after the other.
  """

  name: str
  trained: tuple[str, ...]
  frozen: dict[str, str]
  init_from: dict[str, str]
  phases: tuple[tuple[int, Callable], ...]
  pairs: bool = False  # batches also carry a second image (registration)

  @property
  def total_steps(self) -> int:
    return sum(n for n, _ in self.phases)


def stages(config) -> list[Stage]:
  train = config.train
  labelled = config.data.num_classes > 0
  annotation = ("annotation_generator", "label_discriminator") if labelled else ()
  stage1 = {"mask_generator": "masks", **({"annotation_generator": "masks"} if labelled else {})}
  return [
      Stage("masks", ("mask_generator", "mask_critic") + annotation, {}, {},
            ((train.masks_steps, steps.make_masks_step),)),
      Stage("images", ("image_generator", "image_discriminator"), stage1, {},
            ((train.images_steps, lambda ctx: steps.make_images_step(ctx, finetune=False)),
             (train.images_finetune_steps, lambda ctx: steps.make_images_step(ctx, True)))),
      Stage("registration", ("registration",), {}, {},
            ((train.registration_steps, steps.make_registration_step),), pairs=True),
      Stage("refine", ("image_generator",) + (("annotation_generator",) if labelled else ()),
            {"mask_generator": "masks", "registration": "registration"},
            {"image_generator": "images", **({"annotation_generator": "masks"} if labelled
                                             else {})},
            ((config.refine.steps, steps.make_refine_step),)),
  ]


def optimizer(name: str, stage: str, config) -> optax.GradientTransformation:
  """Adam with each network family's customary settings (see DESIGN.md)."""
  train = config.train
  if stage == "refine":
    return optax.adam(config.refine.learning_rate)
  if name in ("mask_generator", "mask_critic"):
    return optax.adam(train.wgan_learning_rate, b1=0.0, b2=0.9)  # Gulrajani et al. 2017
  if name == "registration":
    return optax.adam(train.registration_learning_rate)  # VoxelMorph
  return optax.adam(train.gan_learning_rate, b1=0.5, b2=0.999)  # pix2pix


GRID_FILE = "grid.json"  # under WORKDIR/networks: the grid synthetic volumes are written on


def network_dir(workdir: str, stage: str, network: str) -> str:
  return os.path.join(workdir, "networks", stage, network)


def load_network(workdir: str, stage: str, network: str, config):
  """Parameters of `network` as trained by `stage`, on this process's first device.

  Readable on any devices, whatever those it was trained on (refused if shapes
  differ). In a multi-host run every process must call it (orbax synchronizes).
  """
  path = network_dir(workdir, stage, network)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is missing: run the '{stage}' stage first (mode=train)")
  _, abstract = abstract_params(network, config)
  # Without a target device orbax places each array as it was saved, which fails
  # on other devices (e.g. networks trained on a pod, read on one machine).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
  return restore_state(path, abstract)


def _done_marker(workdir: str, stage: str) -> str:
  return os.path.join(workdir, "networks", stage, "DONE")


def stage_done(workdir: str, stage: str) -> bool:
  return os.path.exists(_done_marker(workdir, stage))


def fingerprint(config) -> dict[str, Any]:
  """The config fields that fix the shapes of every stage's state."""
  return {"image_shape": list(config.data.image_shape), "num_classes": config.data.num_classes,
          "model": json.loads(config.model.to_json())}


def step_context(config, graphdefs: dict, stage: Stage) -> steps.StepContext:
  return steps.StepContext(
      graphdefs=graphdefs,
      optimizers={name: optimizer(name, stage.name, config) for name in stage.trained},
      num_classes=config.data.num_classes, latent_dim=config.model.latent_dim,
      pseudomask=PseudoMaskParams.from_config(config.pseudomask),
      augment=AugmentParams.from_config(config.augment), train=config.train,
      refine=config.refine,
      patch_shape=check_patch_shape(config.data.patch_shape, config.data.image_shape))


def initial_state(stage: Stage, config, workdir: str):
  graphdefs, params = init_networks(stage.trained, config, config.seed)
  graphdefs |= {name: abstract_params(name, config)[0] for name in stage.frozen}
  for network, source in stage.init_from.items():
    params[network] = load_network(workdir, source, network, config)
  ctx = step_context(config, graphdefs, stage)
  state = {"params": params,
           "opt_state": {n: ctx.optimizers[n].init(params[n]) for n in stage.trained},
           "extras": {"step": jnp.zeros((), jnp.int32), "baseline": jnp.zeros((), jnp.float32)}}
  return ctx, state


def sample_batch(data: TrainingData, config, stage_index: int, step: int, pairs: bool):
  """This process's rows of the global batch of `step` (the same on every re-run)."""
  global_batch = config.train.batch_size
  rng = np.random.default_rng((config.seed, stage_index, step))
  rows = parallel.process_rows(global_batch)
  index = rng.integers(0, len(data.images), global_batch)[rows]
  batch = {"image": data.images[index]}
  if data.labels is not None:
    batch["labels"] = data.labels[index]
  if pairs:
    batch["pair_image"] = data.images[rng.integers(0, len(data.images), global_batch)[rows]]
  return batch


def _all_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


def _check_finite(stage: str, step: int, metrics: dict) -> None:
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"stage '{stage}', step {step}: non-finite {bad}; stopped before saving, so the last "
        "checkpoint is the last good state")


def run_stage(stage: Stage, stage_index: int, config, workdir: str, data: TrainingData,
              mesh) -> None:
  """Trains one stage to its total step count, resuming from its checkpoints."""
  if stage_done(workdir, stage.name):
    logging.info("[%s] already trained; skipping", stage.name)
    return
  checkpoints = StageCheckpoints(os.path.join(workdir, "checkpoints", stage.name),
                                 fingerprint(config), keep=config.train.keep_checkpoints)
  ctx, state = initial_state(stage, config, workdir)
  start = min(checkpoints.latest_step(), stage.total_steps)
  if start:
    state = checkpoints.restore(start, state)
    logging.info("[%s] resuming from step %d of %d", stage.name, start, stage.total_steps)
  state = parallel.replicate(state, mesh)
  frozen = parallel.replicate(
      {n: load_network(workdir, s, n, config) for n, s in stage.frozen.items()}, mesh)
  replicated = parallel.replicated(mesh)
  progress = Progress(workdir, stage.name, start, stage.total_steps)
  stage_key = jax.random.fold_in(jax.random.key(config.seed), stage_index)
  phase_end = 0
  for steps_in_phase, factory in stage.phases:
    phase_start, phase_end = phase_end, phase_end + steps_in_phase
    if start >= phase_end:
      continue
    step_fn = jax.jit(factory(ctx), donate_argnums=0, out_shardings=replicated)
    for step in range(max(start, phase_start), phase_end):
      batch = parallel.shard_batch(
          sample_batch(data, config, stage_index, step, stage.pairs), mesh)
      state, metrics = step_fn(state, frozen, batch, jax.random.fold_in(stage_key, step))
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      _check_finite(stage.name, step + 1, metrics)
      done = step + 1
      if done % config.train.log_every == 0 or done == stage.total_steps:
        progress.log(done, metrics)
      if done % config.train.checkpoint_every == 0 or done == stage.total_steps:
        if not _all_finite(state["params"]):
          raise FloatingPointError(
              f"stage '{stage.name}', step {done}: non-finite parameters; stopped before "
              "saving, so the last checkpoint is the last good state")
        checkpoints.save(done, state)
  checkpoints.close()
  for network in stage.trained:
    save_state(network_dir(workdir, stage.name, network), state["params"][network], force=True)
  if jax.process_index() == 0:
    write_json_atomically(_done_marker(workdir, stage.name), {"steps": stage.total_steps})
  logging.info("[%s] finished (%d steps)", stage.name, stage.total_steps)


def train(config, workdir: str, examples: list[Example] | None = None) -> None:
  """Runs every stage in order (finished ones are skipped) on `examples` (default: the
  examples `config.data` names)."""
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.train.batch_size, mesh)
  data = load_training_data(config, examples)
  logging.info("Training on %d example(s) of shape %s, %d classes, %d device(s)",
               len(data.images), data.images.shape[1:-1], config.data.num_classes,
               mesh.devices.size)
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "networks"), exist_ok=True)
    write_json_atomically(os.path.join(workdir, "networks", GRID_FILE), {
        "affine": data.affine.tolist(), "image_shape": list(data.images.shape[1:-1]),
        "num_classes": config.data.num_classes, "cases": list(data.names)})
    write_json_atomically(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
  for index, stage in enumerate(stages(config)):
    run_stage(stage, index, config, workdir, data, mesh)
