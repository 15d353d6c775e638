"""The training loop of the ACIS stages: resumable, data parallel, checked for NaNs.

Stages run in order (`acis_jax.train.stages`). Each writes orbax checkpoints and, once
finished, its trained networks into the work directory (`acis_jax.workdir`), which later
stages and `synthesize` read. A finished stage is never retrained; an interrupted one
resumes from its latest readable checkpoint and ends with the same number of steps. A work
directory that holds a run of another configuration is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from acis_jax.data.augment import AugmentParams
from acis_jax.data.patches import check_patch_shape
from acis_jax.data.sources import Example, cases_digest, label_table, load_examples
from acis_jax.synthesizers import pseudomask_params
from acis_jax.rng import numpy_rng, step_key, stream_key
from acis_jax.train import parallel, steps
from acis_jax.train.checkpoint import save_state
from acis_jax.train.generation import Chain
from acis_jax.train.networks import (abstract_params, init_networks, load_network,
                                     parameter_count)
from acis_jax.train.progress import Progress
from acis_jax.train.stage_checkpoints import StageCheckpoints
from acis_jax.train.stages import REFINE, Stage, stages
from acis_jax.train.state import TrainState
from acis_jax.stops import Stopped, StopRequest, stops_deferred
from acis_jax.viz import preview_tiles
from acis_jax.workdir import Workdir


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

  def digest(self) -> str:
    return cases_digest(self.names, self.images, self.labels)


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
    too_high = [e for e in examples if e.label.array.max() >= num_classes]
    if too_high:
      first = too_high[0]
      raise ValueError(f"{first.label.path or first.name}: labels go up to "
                       f"{first.label.array.max()} but config.data.num_classes={num_classes} "
                       f"(it must count the background too; {len(too_high)} case(s) like this, "
                       "or pick classes by name with data.classes)")
    labels = np.stack([e.label.array for e in examples]).astype(np.int32)
  images = np.stack([e.image.array for e in examples]).astype(np.float32)[..., None]
  for example, image in zip(examples, images):
    if image.min() == image.max():
      logging.warning("%s: the image is constant after the HU window, so it has no edges; "
                      "its pseudo-masks fall back to seeds drawn uniformly", example.name)
  return TrainingData(images, labels, examples[0].image.affine,
                      tuple(e.name for e in examples))


def optimizer(name: str, stage: str, config) -> optax.GradientTransformation:
  """Adam with each network family's customary settings (see DESIGN.md)."""
  train = config.train
  if stage == REFINE:
    return optax.adam(config.refine.learning_rate)
  if name in ("mask_generator", "mask_critic"):
    return optax.adam(train.wgan_learning_rate, b1=0.0, b2=0.9)  # Gulrajani et al. 2017
  if name == "registration":
    return optax.adam(train.registration_learning_rate)  # VoxelMorph
  return optax.adam(train.gan_learning_rate, b1=0.5, b2=0.999)  # pix2pix


# Fields of config.train that change how a run is logged, not what it computes.
_BOOKKEEPING = ("log_every", "checkpoint_every", "keep_checkpoints", "image_every")


def model_fingerprint(config) -> dict[str, Any]:
  """What fixes the networks' shapes: enough for a job that only reads trained networks."""
  return {"image_shape": list(config.data.image_shape), "num_classes": config.data.num_classes,
          "synthesizer": config.synthesizer, "model": json.loads(config.model.to_json())}


def run_fingerprint(config, data: TrainingData) -> dict[str, Any]:
  """What makes a run: its data, shapes, widths, seed, step counts and training settings."""
  train = {k: v for k, v in json.loads(config.train.to_json()).items() if k not in _BOOKKEEPING}
  # The SynthSeg-style synthesizer's settings are its whole run (it trains no network).
  painted = ({"synthseg": json.loads(config.synthseg.to_json())}
             if config.synthesizer == "synthseg" else {})
  return {**model_fingerprint(config), **painted,
          "data": {"cases": list(data.names), "digest": data.digest()},
          "patch_shape": list(config.data.patch_shape), "seed": config.seed,
          "steps": {s.name: s.total_steps for s in stages(config)},
          "train": train, "refine": json.loads(config.refine.to_json()),
          "pseudomask": json.loads(config.pseudomask.to_json()),
          "augment": json.loads(config.augment.to_json())}


def make_chain(config, names) -> Chain:
  return Chain(graphdefs={n: abstract_params(n, config)[0] for n in names},
               num_classes=config.data.num_classes, latent_dim=config.model.latent_dim,
               synthesizer=config.synthesizer)


def step_context(config, stage: Stage) -> steps.StepContext:
  return steps.StepContext(
      chain=make_chain(config, (*stage.trained, *stage.frozen)), trained=stage.trained,
      optimizers={name: optimizer(name, stage.name, config) for name in stage.trained},
      pseudomask=pseudomask_params(config),
      augment=AugmentParams.from_config(config.augment), train=config.train,
      refine=config.refine,
      patch_shape=check_patch_shape(config.data.patch_shape, config.data.image_shape))


def fresh_state(stage: Stage, config, ctx: steps.StepContext,
                start_params: dict | None = None) -> TrainState:
  """The state before the stage's first step: fresh networks, except those in
  `start_params` (the earlier results the stage continues from)."""
  start_params = start_params or {}
  _, params = init_networks([n for n in stage.trained if n not in start_params], config,
                            config.seed)
  params = {n: (start_params | params)[n] for n in stage.trained}
  extras = {name: jnp.zeros((), jnp.float32) for name in stage.extras}
  return TrainState.create(params, {n: ctx.optimizers[n].init(params[n]) for n in stage.trained},
                           **extras)


def sample_batch(data: TrainingData, config, stage: str, step: int, pairs: bool):
  """This process's rows of the global batch of `step` (the same on every re-run)."""
  global_batch = config.train.batch_size
  rng = numpy_rng(config.seed, f"batches/{stage}", step)
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
  bad = {k: float(v) for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"stage '{stage}', step {step}: non-finite {bad}; stopped before saving, so the last "
        "checkpoint is the last good state")


def _resume(stage: Stage, config, workdir: Workdir, ctx, checkpoints: StageCheckpoints,
            mesh) -> tuple[int, TrainState]:
  """`(first step, state)`: the latest readable checkpoint, restored straight into the
  state's shapes (nothing initialised), else the fresh state."""
  replicated = parallel.replicated(mesh)
  abstract = jax.eval_shape(lambda: fresh_state(stage, config, ctx))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          abstract)
  start, state = checkpoints.restore_latest(abstract, stage.total_steps)
  if state is not None:
    logging.info("[%s] resuming from step %d of %d", stage.name, start, stage.total_steps)
    return start, parallel.replicate(state, mesh)
  start_params = {n: load_network(workdir, s, n, config) for n, s in stage.init_from.items()}
  return 0, parallel.replicate(fresh_state(stage, config, ctx, start_params), mesh)


_PREVIEW_SAMPLES = 4


def make_preview(config, stage: Stage, chain: Chain):
  """`preview(params) -> {kind: samples}` of the generators a stage has (trained or read),
  from fixed latents so that TensorBoard shows them change; None for a stage without a
  generator from noise (registration)."""
  has = set(stage.trained) | set(stage.frozen)
  key = stream_key(config.seed, "tensorboard")
  if not has & {"mask_generator", "label_generator", "joint_generator"}:
    return None

  def preview(params):
    if not chain.uses_masks:  # the comparison synthesizers: labels, then images if made
      if "label_generator" in has and "image_generator" not in has:
        return {"labels": chain.generated_labels(params, key, _PREVIEW_SAMPLES)}
      _, labels, images = chain.sample(params, key, _PREVIEW_SAMPLES)
      return {"labels": labels, "image": images[..., 0]}
    masks = chain.masks(params, key, _PREVIEW_SAMPLES)
    labels = chain.labels(params, masks) if "annotation_generator" in has else None
    images = (chain.image(params, chain.condition(masks, labels), None)
              if "image_generator" in has else None)
    return {"pseudo-mask": masks[..., 0], "labels": labels,
            "image": None if images is None else images[..., 0]}
  return jax.jit(preview)


def _run_steps(stage: Stage, config, ctx, data: TrainingData, mesh, start: int, state, frozen,
               progress: Progress, checkpoints: StageCheckpoints, stop: StopRequest):
  """Steps `start` .. the stage's end, or up to the step at which a stop was asked for (then
  checkpointed); returns (state, steps done)."""
  replicated = parallel.replicated(mesh)
  preview = make_preview(config, stage, ctx.chain) if config.train.image_every else None
  done, phase_end = start, 0
  for steps_in_phase, factory in stage.phases:
    phase_start, phase_end = phase_end, phase_end + steps_in_phase
    if start >= phase_end:
      continue
    step_fn = jax.jit(factory(ctx), donate_argnums=0, out_shardings=replicated)
    pending = []  # (step, metrics on device) since the last fetch: no host sync per step
    for step in range(max(start, phase_start), phase_end):
      batch = parallel.shard_batch(sample_batch(data, config, stage.name, step, stage.pairs),
                                   mesh)
      key = step_key(config.seed, f"train/{stage.name}", step)
      if not pending and step == max(start, phase_start):
        began = time.perf_counter()
        step_fn = step_fn.lower(state, frozen, batch, key).compile()
        logging.info("[%s] step compiled in %.1f s", stage.name, time.perf_counter() - began)
        progress.restart_clock(step)
      state, metrics = step_fn(state, frozen, batch, key)
      done = step + 1
      pending.append((done, metrics))
      if preview is not None and done % config.train.image_every == 0:
        samples = jax.device_get(preview({**frozen, **state.params}))
        progress.images(done, preview_tiles(samples, data.affine))
      stopping = stop.signum is not None
      log = done % config.train.log_every == 0 or done == stage.total_steps or stopping
      save = done % config.train.checkpoint_every == 0 or done == stage.total_steps or stopping
      if not (log or save):
        continue
      for at, values in jax.device_get(pending):
        _check_finite(stage.name, at, values)
      pending = []
      if log:
        progress.log(done, {k: float(v) for k, v in jax.device_get(metrics).items()})
      if save:
        if not _all_finite(state.params):
          raise FloatingPointError(
              f"stage '{stage.name}', step {done}: non-finite parameters; stopped before "
              "saving, so the last checkpoint is the last good state")
        checkpoints.save(done, state)
      if stopping:
        return state, done
  return state, done


def run_stage(stage: Stage, config, workdir: Workdir, data: TrainingData, mesh) -> None:
  """Trains one stage to its total step count, resuming from its checkpoints."""
  if workdir.stage_done(stage.name):
    logging.info("[%s] already trained; skipping", stage.name)
    return
  ctx = step_context(config, stage)
  checkpoints = StageCheckpoints(workdir.checkpoints(stage.name),
                                 keep=config.train.keep_checkpoints)
  start, state = _resume(stage, config, workdir, ctx, checkpoints, mesh)
  frozen = parallel.replicate(
      {n: load_network(workdir, s, n, config) for n, s in stage.frozen.items()}, mesh)
  logging.info("[%s] %s", stage.name, ", ".join(
      f"{n} {parameter_count(state.params[n]):,} parameters" for n in stage.trained))
  progress = Progress(workdir.metrics, stage.name, start, stage.total_steps,
                      events_dir=workdir.tensorboard)
  with stops_deferred() as stop, contextlib.closing(progress):
    state, done = _run_steps(stage, config, ctx, data, mesh, start, state, frozen, progress,
                             checkpoints, stop)
    checkpoints.close()
    finished = done == stage.total_steps
    if finished:
      for network in stage.trained:
        save_state(workdir.network(stage.name, network), state.params[network], force=True)
      if jax.process_index() == 0:
        workdir.mark_done(stage.name, stage.total_steps)
      logging.info("[%s] finished (%d steps)", stage.name, stage.total_steps)
    if stop.signum is not None:
      raise Stopped(stop.signum, f"[{stage.name}] " + (
          "finished; the same command goes on with the next stage" if finished else
          f"checkpoint of step {done}/{stage.total_steps} saved in {checkpoints.directory}; "
          "the same command resumes from it"))


def train(config, workdir: str, examples: list[Example] | None = None) -> None:
  """Runs every stage in order (finished ones are skipped) on `examples` (default: the
  examples `config.data` names), after checking that `workdir` holds this run or none."""
  workdir = Workdir(workdir)
  mesh = parallel.make_mesh()
  table = stages(config)
  if table:  # the SynthSeg-style synthesizer has no stage: no batch to split
    parallel.check_batch_size(config.train.batch_size, mesh)
  data = load_training_data(config, examples)
  logging.info("Training on %d example(s) of shape %s, %d classes, %d device(s)",
               len(data.images), data.images.shape[1:-1], config.data.num_classes,
               mesh.devices.size)
  fingerprint = run_fingerprint(config, data)
  lead = jax.process_index() == 0
  with workdir.lock() if lead else contextlib.nullcontext():
    workdir.check_fingerprint(fingerprint)
    if lead:
      workdir.claim(fingerprint, json.loads(config.to_json()), {
          "affine": data.affine.tolist(), "image_shape": list(data.images.shape[1:-1]),
          "num_classes": config.data.num_classes, "cases": list(data.names),
          "labels": {str(k): v for k, v in label_table(config.data).items()}})
    for stage in table:
      run_stage(stage, config, workdir, data, mesh)
