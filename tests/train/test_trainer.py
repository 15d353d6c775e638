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
from acis_jax.train.stages import stages
from acis_jax.train.trainer import (fresh_state, load_training_data, run_stage, sample_batch,
                                    step_context)
from acis_jax.workdir import Workdir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def smoke_config(arg=None):
  return load_config_file(os.path.join(REPO, "experiments", "smoke.py"), arg)


def test_one_step_on_8_devices_equals_the_same_batch_on_1(tmp_path):
  assert jax.device_count() == 8, "tests/conftest.py fakes 8 CPU devices"
  config = smoke_config()
  config.train.batch_size = 8
  stage = stages(config)[0]  # masks: pseudo-masks, augmentation and four networks
  data = load_training_data(config)
  # Plain SGD: Adam's first step is lr * sign(gradient), which turns float noise in
  # near-zero gradients into full-size differences and would hide what is compared.
  ctx = dataclasses.replace(step_context(config, stage),
                            optimizers={n: optax.sgd(1e-2) for n in stage.trained})
  state = fresh_state(stage, config, ctx)
  batch = sample_batch(data, config, stage.name, 0, stage.pairs)
  step = stage.phases[0][1](ctx)
  key = jax.random.key(3)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    run = jax.jit(step, out_shardings=parallel.replicated(mesh))
    new_state, metrics = run(parallel.replicate(state, mesh), {},
                             parallel.shard_batch(batch, mesh), key)
    results.append(jax.device_get((new_state.params, metrics)))
  (params_1, metrics_1), (params_8, metrics_8) = results
  for name in stage.trained:
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(),
                                           state.params[name], params_1[name]))
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
  run_stage(stage, config, Workdir(str(workdir)), load_training_data(config), mesh)
  return config, stage


def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  config, stage = registration_run(tmp_path, registration_steps=2)
  # Make it look interrupted after step 2, then go on with a learning rate that breaks it.
  os.remove(tmp_path / "networks" / "registration" / "DONE")
  with pytest.raises(FloatingPointError, match="stage 'registration', step 3: non-finite"):
    registration_run(tmp_path, registration_steps=4, registration_learning_rate=float("nan"))
  checkpoints = StageCheckpoints(str(tmp_path / "checkpoints" / "registration"))
  assert checkpoints.latest_step() == 2
  abstract = jax.eval_shape(lambda: fresh_state(stage, config, step_context(config, stage)))
  step, restored = checkpoints.restore_latest(abstract, stage.total_steps)
  assert step == 2
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(restored.params))


def test_a_corrupt_latest_checkpoint_resumes_from_the_previous_one(tmp_path):
  config, stage = registration_run(tmp_path, registration_steps=3)
  os.remove(tmp_path / "networks" / "registration" / "DONE")
  # keep_checkpoints=2: steps 2 and 3 are kept; wreck every file of step 3.
  latest = tmp_path / "checkpoints" / "registration" / "3"
  for path in latest.rglob("*"):
    if path.is_file():
      path.write_bytes(b"not a checkpoint")
  checkpoints = StageCheckpoints(str(tmp_path / "checkpoints" / "registration"))
  abstract = jax.eval_shape(lambda: fresh_state(stage, config, step_context(config, stage)))
  step, restored = checkpoints.restore_latest(abstract, stage.total_steps)
  assert step == 2
  expected = checkpoints.restore(2, abstract)
  jax.tree.map(np.testing.assert_array_equal, restored.params, expected.params)
  checkpoints.close()
  # And the stage itself goes on from there to the end.
  registration_run(tmp_path, registration_steps=3)
  assert (tmp_path / "networks" / "registration" / "DONE").exists()
  assert (tmp_path / "checkpoints" / "registration" / "3.unreadable").is_dir()


def test_keeping_fewer_than_two_checkpoints_is_refused(tmp_path):
  with pytest.raises(ValueError, match="keep_checkpoints=1: keep at least 2"):
    StageCheckpoints(str(tmp_path), keep=1)


def test_batch_size_must_split_over_the_devices():
  with pytest.raises(ValueError, match="batch_size=6 must be a multiple of the 8 devices"):
    parallel.check_batch_size(6, parallel.make_mesh())


def test_labels_beyond_num_classes_name_the_file(tmp_path):
  from acis_jax.data.phantom import phantom_case
  phantom_case(tmp_path, (32, 32, 24), name="case_a")
  config = smoke_config()
  config.data.data_dir = str(tmp_path)
  config.data.image_shape = (32, 32, 24)
  config.data.num_classes = 3  # the phantom's labels go up to 5
  with pytest.raises(ValueError, match=r"labelsTr/case_a\.nii\.gz: labels go up to 5 but "
                                       r"config\.data\.num_classes=3"):
    load_training_data(config)
