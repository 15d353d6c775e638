"""The training loop in process: data parallel equivalence, NaN stops, foreign checkpoints."""

import dataclasses
import os

import jax
import numpy as np
import optax
import pytest

from acis_jax.config_utils import load_config_file
from acis_jax.train import parallel
from acis_jax.train.stage_checkpoints import StageCheckpoints
from acis_jax.train.trainer import (fingerprint, initial_state, load_training_data, run_stage,
                                    sample_batch, stages)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def smoke_config(arg=None):
  return load_config_file(os.path.join(REPO, "experiments", "smoke.py"), arg)


def test_one_step_on_8_devices_equals_the_same_batch_on_1(tmp_path):
  assert jax.device_count() == 8, "tests/conftest.py fakes 8 CPU devices"
  config = smoke_config()
  config.train.batch_size = 8
  stage = stages(config)[0]  # masks: pseudo-masks, augmentation and four networks
  data = load_training_data(config)
  ctx, state = initial_state(stage, config, str(tmp_path))
  # Plain SGD: Adam's first step is lr * sign(gradient), which turns float noise in
  # near-zero gradients into full-size differences and would hide what is compared.
  ctx = dataclasses.replace(ctx, optimizers={n: optax.sgd(1e-2) for n in stage.trained})
  state["opt_state"] = {n: ctx.optimizers[n].init(state["params"][n]) for n in stage.trained}
  batch = sample_batch(data, config, 0, 0, stage.pairs)
  step = stage.phases[0][1](ctx)
  key = jax.random.key(3)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    run = jax.jit(step, out_shardings=parallel.replicated(mesh))
    new_state, metrics = run(parallel.replicate(state, mesh), {},
                             parallel.shard_batch(batch, mesh), key)
    results.append(jax.device_get((new_state["params"], metrics)))
  (params_1, metrics_1), (params_8, metrics_8) = results
  for name in stage.trained:
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(),
                                           state["params"][name], params_1[name]))
    assert max(changed) > 0, f"{name} was not updated"
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params_1, params_8)
  for k in metrics_1:
    np.testing.assert_allclose(metrics_1[k], metrics_8[k], rtol=1e-4, atol=1e-6)


def registration_run(workdir, **train):
  config = smoke_config()
  config.train.update(train)
  config.train.checkpoint_every = 1
  stage = stages(config)[2]
  assert stage.name == "registration"
  mesh = parallel.make_mesh(jax.devices()[:1])
  run_stage(stage, 2, config, str(workdir), load_training_data(config), mesh)
  return config, stage


def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  config, stage = registration_run(tmp_path, registration_steps=2)
  # Make it look interrupted after step 2, then go on with a learning rate that breaks it.
  os.remove(tmp_path / "networks" / "registration" / "DONE")
  with pytest.raises(FloatingPointError, match="stage 'registration', step 3: non-finite"):
    registration_run(tmp_path, registration_steps=4, registration_learning_rate=float("nan"))
  checkpoints = StageCheckpoints(str(tmp_path / "checkpoints" / "registration"),
                                 fingerprint(config))
  assert checkpoints.latest_step() == 2
  _, state = initial_state(stage, config, str(tmp_path))
  restored = checkpoints.restore(2, state)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(restored["params"]))


def test_checkpoints_of_another_config_are_refused(tmp_path):
  registration_run(tmp_path, registration_steps=1)
  os.remove(tmp_path / "networks" / "registration" / "DONE")
  config = smoke_config()
  config.model.registration_features = (8, 8, 16)
  with pytest.raises(ValueError, match="holds checkpoints of another configuration"):
    run_stage(stages(config)[2], 2, config, str(tmp_path), load_training_data(config),
              parallel.make_mesh(jax.devices()[:1]))


def test_batch_size_must_split_over_the_devices():
  with pytest.raises(ValueError, match="batch_size=6 must be a multiple of the 8 devices"):
    parallel.check_batch_size(6, parallel.make_mesh())
