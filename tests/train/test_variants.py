"""`synthesize.source="real"`: variants of the real cases, moved by random diffeomorphisms,
in 2-D and 3-D, through the chain and through `synthesize`."""
import json
import os

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from acis_jax.config_utils import load_config_file
from acis_jax.data.phantom import chest_phantom
from acis_jax.data.preprocess import window_hu
from acis_jax.eval import metrics, quality
from acis_jax.jobs import synthesize
from acis_jax.pseudomask import PseudoMaskParams
from acis_jax.train import trainer
from acis_jax.train.networks import init_networks
from acis_jax.data.nifti import save_nifti
from acis_jax.workdir import FingerprintMismatch, Workdir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def mean_dice(a: np.ndarray, b: np.ndarray) -> float:
  """Mean Dice over the foreground classes present in `b`."""
  classes = [k for k in np.unique(b) if k]
  return float(np.mean([2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k))
                        for k in classes]))


def smoke(preset=None):
  return load_config_file(os.path.join(REPO, "experiments", "smoke.py"), preset)


def real_cases(config, count=2):
  shape = tuple(config.data.image_shape)
  cases = [chest_phantom(shape, seed=seed) for seed in range(count)]
  images = jnp.asarray(np.stack([window_hu(hu) for hu, _ in cases])[..., None], jnp.float32)
  labels = jnp.asarray(np.stack([label for _, label in cases]), jnp.int32)
  return images, labels


@pytest.mark.parametrize("preset", [None, "3d"])
def test_variants_keep_the_real_labels_moved_and_make_new_images(preset):
  config = smoke(preset)
  chain = trainer.make_chain(config, ["image_generator"])
  _, params = init_networks(["image_generator"], config, 0)
  images, labels = real_cases(config)
  pm = PseudoMaskParams.from_config(config.pseudomask)
  key = jax.random.key(2)

  # No deformation: the labels are the real ones and the mask a pseudo-mask of the real image.
  masks, same, fake = chain.variants(params, key, images, labels, pm, 0.0, 4.0)
  np.testing.assert_array_equal(same, labels)
  assert fake.shape == images.shape and masks.shape == images.shape
  assert float(jnp.min(fake)) >= 0.0 and float(jnp.max(fake)) <= 1.0
  for mask, image in zip(masks, images):
    values = set(np.unique(np.asarray(mask)).tolist())
    assert values <= set(np.unique(np.asarray(image)).tolist())  # cells take image values

  # A deformation moves the labels: each case's classes stay, overlapping their old places.
  _, moved, _ = chain.variants(params, key, images, labels, pm, 1.0, 4.0)
  assert moved.shape == labels.shape
  for real, variant in zip(np.asarray(labels), np.asarray(moved)):
    assert set(np.unique(variant)) == set(np.unique(real))
    assert not np.array_equal(real, variant)
    assert 0.5 < mean_dice(variant, real) < 1.0


def zero_step_smoke():
  config = smoke()
  for field in ("masks_steps", "annotation_finetune_steps", "images_steps",
                "images_finetune_steps", "registration_steps"):
    config.train[field] = 0
  config.refine.steps = 0
  config.train.batch_size = 8
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  trainer.train(zero_step_smoke(), str(workdir))
  return workdir


def test_synthesize_from_real_cases_writes_variants_of_them(trained):
  tmp_path = trained
  config = zero_step_smoke()
  config.synthesize.source = "real"
  data = trainer.load_training_data(config)
  folder = tmp_path / "synthetic" / "labelsTr"

  def written_labels():
    paths = sorted(folder.iterdir())
    assert len(paths) == config.synthesize.num_samples
    return [np.asarray(nib.load(path).dataobj) for path in paths]

  config.synthesize.deformation = 0.0  # the real labels themselves
  synthesize.run(config, str(tmp_path))
  for variant in written_labels():
    np.testing.assert_array_equal(variant, data.labels[0])
  # The evaluation's "ACIS from real anatomy" folder holds the same pairs, whatever the
  # config's source.
  generated = zero_step_smoke()
  generated.synthesize.deformation = 0.0
  synthesize.write_from_real(generated, str(tmp_path))
  for kind in ("imagesTr", "labelsTr"):
    ours = sorted((tmp_path / "synthetic_from_real" / kind).iterdir())
    assert [p.name for p in ours] == [p.name for p in sorted((folder.parent / kind).iterdir())]
    for path in ours:
      np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj),
                                    np.asarray(nib.load(folder.parent / kind / path.name).dataobj))
  config.synthesize.deformation = 1.0
  synthesize.run(config, str(tmp_path))
  variants = written_labels()
  for variant in variants:
    assert set(np.unique(variant)) == set(np.unique(data.labels[0]))
    assert 0.5 < mean_dice(variant, data.labels[0]) < 1.0
  assert not np.array_equal(variants[0], variants[1])  # each its own deformation

  # Variants of other cases than the run's are refused, naming the difference.
  config.data.phantom_seed = 1
  with pytest.raises(FingerprintMismatch, match=r"data\.digest"):
    synthesize.run(config, str(tmp_path))


def test_synthesize_from_label_maps_keeps_them_exactly(trained, tmp_path):
  """Two maps of the phantom's anatomy, moved: every pair's labels are its map itself."""
  config = zero_step_smoke()
  real = trainer.load_training_data(config).labels[0]
  maps = [np.roll(real, (2, -1), (0, 1)), np.roll(real, (-1, 2), (0, 1))]
  folder = tmp_path / "labelsTr"
  folder.mkdir()
  affine = np.asarray(Workdir(str(trained)).read_grid()["affine"])
  for i, label in enumerate(maps):
    save_nifti(folder / f"case_{i}.nii.gz", label.astype(np.uint8), affine)
  config.synthesize.source = "labels"
  config.synthesize.labels_dir = str(folder)
  config.synthesize.label_fit_steps = 20
  synthesize.run(config, str(trained))
  written = sorted((trained / "synthetic" / "labelsTr").iterdir())
  assert len(written) == config.synthesize.num_samples == 4
  for k, path in enumerate(written):  # pair k from map k * 2 // 4
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), maps[k * 2 // 4])
  assert len(list((trained / "synthetic" / "imagesTr").iterdir())) == 4


@pytest.mark.parametrize("bad, message", [
    (lambda label: label.astype(np.uint8) * 0 + 9, "labels go up to 9"),
    (lambda label: np.stack([label] * 3, -1).astype(np.uint8), "3-D label map for a 2-D run"),
])
def test_bad_label_maps_are_refused_naming_the_file_before_anything_is_written(
    trained, tmp_path, bad, message):
  config = zero_step_smoke()
  synthesize.run(config, str(trained))
  before = {p.name: p.read_bytes() for p in (trained / "synthetic" / "labelsTr").iterdir()}
  folder = tmp_path / "maps"
  folder.mkdir()
  label = trainer.load_training_data(config).labels[0]
  save_nifti(folder / "ok.nii.gz", label.astype(np.uint8), np.eye(4))
  save_nifti(folder / "wrong.nii.gz", bad(label), np.eye(4))
  config.synthesize.source = "labels"
  config.synthesize.labels_dir = str(folder)
  with pytest.raises(ValueError, match=f"wrong.nii.gz: .*{message}"):
    synthesize.run(config, str(trained))
  assert {p.name: p.read_bytes()
          for p in (trained / "synthetic" / "labelsTr").iterdir()} == before


def test_the_nearest_real_case_is_the_one_that_overlaps_most():
  real = np.zeros((3, 8, 8), np.int32)
  real[0, :4], real[1, 4:], real[2, :, :4] = 1, 1, 1
  given = np.stack([real[2], real[0], np.roll(real[1], 1, axis=0)])
  _, nearest = quality.nearest(metrics.label_distances(given, real, 2))
  np.testing.assert_array_equal(nearest, [2, 0, 1])


def test_a_run_on_given_examples_is_reported_against_them(tmp_path):
  """The evaluation's synthesizers train on a few-shot subset (`examples`) that
  `config.data` does not name; the quality report at the end of `synthesize` compares the
  pairs with that subset (it used to reload `config.data` and refuse the work directory)."""
  from acis_jax.data.sources import load_examples
  config = zero_step_smoke()
  config.synthesize.quality = True
  other = zero_step_smoke()
  other.data.phantom_seed = 1  # not the data config.data names
  examples = load_examples(other.data)
  trainer.train(config, str(tmp_path), examples=examples)
  synthesize.run(config, str(tmp_path), examples=examples)
  with open(tmp_path / "synthetic" / "quality.json") as f:
    result = json.load(f)
  assert result["cases"] == {"real": len(examples), "synthetic": config.synthesize.num_samples}
  real = np.stack([e.image.array for e in examples])
  np.testing.assert_allclose(
      result["texture"]["real"],
      np.mean([np.mean(ndimage.laplace(x.astype(np.float64)) ** 2) for x in real]), rtol=1e-5)
