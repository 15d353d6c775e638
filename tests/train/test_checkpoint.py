"""orbax round trips of every network's state, and clear errors for mismatching targets."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from acis_jax.models import (AnnotationGenerator, Critic, ImageGenerator, MaskGenerator,
                             PatchDiscriminator, RegistrationNet)
from acis_jax.train.checkpoint import restore_state, save_state

_X = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 16, 16, 1)), jnp.float32)
# name: (constructor taking a seed, inputs)
NETWORKS = {
    "mask": (lambda s: MaskGenerator(4, (16, 16), features=(4, 4), rngs=_rngs(s)),
             (jnp.ones((1, 4)),)),
    "annotation": (lambda s: AnnotationGenerator(3, 2, features=(4, 4), rngs=_rngs(s)), (_X,)),
    "image": (lambda s: ImageGenerator(2, 2, features=(4, 4), rngs=_rngs(s)),
              (_X, jnp.concatenate([_X, 1 - _X], -1))),
    "critic": (lambda s: Critic(1, _X.shape[1:-1], features=(4, 4), rngs=_rngs(s)), (_X,)),
    "patch": (lambda s: PatchDiscriminator(1, 2, features=(4, 4), rngs=_rngs(s)), (_X,)),
    "registration": (lambda s: RegistrationNet(2, features=(4, 4), final_convs=(4,),
                                               rngs=_rngs(s)), (_X, _X[:, ::-1])),
}


def _rngs(seed):
  # "rbg" keys: XLA compiles their generator much faster on CPU than threefry's.
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, args):
  return nnx.merge(graphdef, state)(*args)


def _run(model, args):
  return _apply(*nnx.split(model), args)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_round_trip_into_a_fresh_model(name, tmp_path):
  build, args = NETWORKS[name]
  model = build(0)
  save_state(tmp_path / "ckpt", nnx.state(model))
  fresh = build(1)
  assert not np.array_equal(_run(fresh, args), _run(model, args))
  abstract = nnx.state(nnx.eval_shape(lambda: build(2)))
  nnx.update(fresh, restore_state(tmp_path / "ckpt", abstract))
  np.testing.assert_array_equal(_run(fresh, args), _run(model, args))
  # No shared references: NNX tree mode splits the model into the same arrays.
  tree_leaves = jax.tree.leaves(nnx.split(model, graph=False)[1])
  assert len(tree_leaves) == len(jax.tree.leaves(nnx.state(model)))


def test_other_widths_fail_clearly(tmp_path):
  save_state(tmp_path / "ckpt", nnx.state(Critic(1, _X.shape[1:-1], features=(4, 8), rngs=_rngs(0))))
  wider = nnx.state(nnx.eval_shape(lambda: Critic(1, _X.shape[1:-1], features=(4, 16), rngs=_rngs(0))))
  with pytest.raises(ValueError, match=r"trunk/blocks/1/conv/kernel.*\(4, 4, 4, 8\).*16"):
    restore_state(tmp_path / "ckpt", wider)
  deeper = nnx.state(nnx.eval_shape(lambda: Critic(1, _X.shape[1:-1], features=(4, 8, 8), rngs=_rngs(0))))
  with pytest.raises(ValueError, match="missing from checkpoint: trunk/blocks/2"):
    restore_state(tmp_path / "ckpt", deeper)


def test_plain_pytrees_overwrite_and_missing_path(tmp_path):
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones(4, jnp.int32)}}
  save_state(tmp_path / "t", tree)
  save_state(tmp_path / "t", jax.tree.map(lambda x: x + 1, tree), force=True)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  restored = restore_state(tmp_path / "t", abstract)
  np.testing.assert_array_equal(restored["w"], tree["w"] + 1)
  np.testing.assert_array_equal(restored["b"]["c"], tree["b"]["c"] + 1)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    restore_state(tmp_path / "absent", tree)


@pytest.mark.parametrize("damage", ["data", "index"])
def test_a_damaged_network_folder_names_the_network_and_how_to_rebuild_it(tmp_path, damage):
  import pathlib
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "experiments"))
  import smoke
  from acis_jax.train.networks import abstract_params, load_network
  from acis_jax.workdir import Workdir

  config, workdir = smoke.get_config(), Workdir(tmp_path)
  _, abstract = abstract_params("image_generator", config)
  folder = pathlib.Path(workdir.network("images", "image_generator"))
  save_state(folder, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract))
  for path in folder.rglob("*"):
    if damage == "data" and path.is_file() and path.parent.name == "d":
      path.write_bytes(b"\0" * 10)
    if damage == "index" and path.name == "manifest.ocdbt":
      path.unlink()
  with pytest.raises(ValueError) as error:
    load_network(workdir, "images", "image_generator", config)
  message = str(error.value)
  assert "the image_generator network of stage 'images'" in message
  assert f"delete {workdir.done_marker('images')}" in message
