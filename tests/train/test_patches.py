"""Patch training (`config.data.patch_shape`): the crops, and what each stage's networks see."""

import os

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from acis_jax.config_utils import load_config_file
from acis_jax.data.patches import check_patch_shape, random_crops, random_origins
from acis_jax.train.networks import init_networks
from acis_jax.train.stages import stages
from acis_jax.train.trainer import fresh_state, step_context

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRID = (32, 32)
PATCH = (16, 16)


def test_crops_match_numpy_slicing_at_one_corner_per_example():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(3, 12, 10, 8, 2)).astype(np.float32)
  labels = rng.integers(0, 5, size=(3, 12, 10, 8)).astype(np.int32)
  patch = (5, 10, 3)
  key = jax.random.key(1)
  cut_image, nothing, cut_labels = random_crops(key, [jnp.asarray(image), None,
                                                      jnp.asarray(labels)], patch)
  assert nothing is None
  origins = np.asarray(random_origins(key, 3, image.shape[1:4], patch))
  for i, (a, b, c) in enumerate(origins):
    np.testing.assert_array_equal(cut_image[i], image[i, a:a + 5, b:b + 10, c:c + 3])
    np.testing.assert_array_equal(cut_labels[i], labels[i, a:a + 5, b:b + 10, c:c + 3])
  assert random_crops(key, [image], None)[0] is image


def test_every_corner_is_drawn_about_equally_often():
  # A 7-long axis and 3-long patch: corners 0..4, each with probability 1/5.
  origins = np.asarray(random_origins(jax.random.key(0), 20000, (7, 3), (3, 3)))
  assert (origins[:, 1] == 0).all()
  counts = np.bincount(origins[:, 0], minlength=5)
  assert len(counts) == 5
  expected = len(origins) / 5
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 18.5  # chi-square, 4 degrees of freedom, p = 0.001


@pytest.mark.parametrize("patch, message", [((16,), "has 1 axes"), ((40, 16), "within"),
                                            ((0, 16), "within")])
def test_bad_patch_shapes_are_refused(patch, message):
  with pytest.raises(ValueError, match=message):
    check_patch_shape(patch, GRID)


def test_no_patch_or_the_whole_grid_means_whole_grids():
  assert check_patch_shape((), GRID) is None
  assert check_patch_shape(GRID, GRID) is None
  assert check_patch_shape([16, 8], GRID) == (16, 8)


def smoke_config(patch_shape):
  config = load_config_file(os.path.join(REPO, "experiments", "smoke.py"))
  assert tuple(config.data.image_shape) == GRID
  config.data.patch_shape = patch_shape
  config.train.batch_size = 2
  config.refine.passes = 2
  return config


def conv_input_sizes(jaxpr) -> set[tuple[int, ...]]:
  """Spatial shapes of every convolution's input (channel-last), nested jaxprs included."""
  sizes = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      sizes.add(tuple(eqn.invars[0].aval.shape[1:-1]))
    for sub in jex.core.jaxprs_in_params(eqn.params):
      sizes |= conv_input_sizes(sub)
  return sizes


def step_jaxpr(config, stage_name: str, phase: int):
  """The jaxpr of one trainer step of a stage, traced from shapes alone (nothing compiled)."""
  stage = next(s for s in stages(config) if s.name == stage_name)
  ctx = step_context(config, stage)

  def arrays():
    state = fresh_state(stage, config, step_context(config, stage))
    return state, init_networks(tuple(stage.frozen), config, config.seed)[1]

  state, frozen = jax.eval_shape(arrays)
  batch = {"image": jax.ShapeDtypeStruct((2, *GRID, 1), jnp.float32),
           "labels": jax.ShapeDtypeStruct((2, *GRID), jnp.int32),
           "pair_image": jax.ShapeDtypeStruct((2, *GRID, 1), jnp.float32)}
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.jit(stage.phases[phase][1](ctx)).trace(state, frozen, batch, key).jaxpr.jaxpr


@pytest.mark.parametrize("stage_name, phase", [("images", 0), ("registration", 0)])
def test_conditional_stages_see_only_patches(stage_name, phase):
  whole = conv_input_sizes(step_jaxpr(smoke_config(()), stage_name, phase))
  patched = conv_input_sizes(step_jaxpr(smoke_config(PATCH), stage_name, phase))
  assert GRID in whole
  assert max(patched) == PATCH


@pytest.mark.parametrize("stage_name, phase", [("masks", 0), ("images", 1), ("refine", 0)])
def test_the_mask_generator_keeps_the_whole_grid(stage_name, phase):
  """The mask generator (and its critic) make whole grids; the networks after it, patches."""
  sizes = conv_input_sizes(step_jaxpr(smoke_config(PATCH), stage_name, phase))
  assert GRID in sizes and PATCH in sizes
