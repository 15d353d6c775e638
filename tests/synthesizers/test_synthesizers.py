"""The comparison synthesizers (`config.synthesizer`), trained and sampled at smoke size in
2-D and 3-D: V2UM2I-like ("superpixel", ACIS's stages on SLIC superpixel masks), StyleGAN-like
("joint_gan") and MedGen3D-like ("labels_first"), without pseudo-masks and with ACIS's
generator budget, and SynthSeg-style ("synthseg"), which trains nothing and paints the run's
label maps. ACIS itself: tests/train/test_trainer.py and tests/test_main.py."""
import json

import nibabel as nib
import numpy as np
import pytest

from acis_jax.config_utils import load_config_file
from acis_jax.defaults import check_config
from acis_jax.jobs import synthesize
from acis_jax.train import stages, trainer
from acis_jax.workdir import Workdir

NUM_CLASSES = 6  # the phantom's


def generator_steps(config) -> int:
  """Steps of the stages that train a generator (ACIS's registration stage trains none)."""
  return sum(s.total_steps for s in stages.stages(config)
             if any(n.endswith("_generator") for n in s.trained))


@pytest.mark.parametrize("synthesizer", ["joint_gan", "labels_first"])
def test_same_generator_budget_as_acis_and_no_pseudo_masks(synthesizer):
  config = load_config_file("experiments/smoke.py")
  acis = generator_steps(config)
  config.synthesizer = synthesizer
  assert generator_steps(config) == acis
  table = stages.stages(config)
  assert not {"mask_generator", "annotation_generator", "registration"} & {
      n for s in table for n in s.trained}
  for stage in table:
    assert not trainer.step_context(config, stage).chain.uses_masks


@pytest.mark.parametrize("synthesizer", ["joint_gan", "labels_first", "synthseg"])
def test_refuses_real_anatomy_and_label_free_runs(synthesizer):
  config = load_config_file("experiments/smoke.py")
  config.synthesizer = synthesizer
  config.synthesize.source = "real"
  with pytest.raises(ValueError, match="no pseudo-masks"):
    check_config(config)
  config.synthesize.source = "generated"
  config.data.num_classes = 0
  with pytest.raises(ValueError, match="needs labels"):
    check_config(config)


# Superpixel's stages are ACIS's, and its 3-D SLIC is tested against scikit-image in
# tests/pseudomask/test_superpixel.py: its 3-D run here only added compile time (the slowest
# test of the suite).
@pytest.mark.parametrize("synthesizer, preset", [
    ("superpixel", None), ("joint_gan", None), ("labels_first", None), ("synthseg", None),
    ("joint_gan", "3d"), ("labels_first", "3d"), ("synthseg", "3d")])
def test_trains_and_samples_valid_pairs(tmp_path, synthesizer, preset):
  config = load_config_file("experiments/smoke.py", preset)
  config.synthesizer = synthesizer
  config.train.batch_size = 8  # a multiple of the 8 test devices
  if synthesizer == "superpixel":
    # The masks and images stages are where pseudo-masks are made; the later two stages run
    # the same code as ACIS's (and cost most of the compile time).
    config.train.registration_steps = 0
    config.refine.steps = 0
    for stage in stages.stages(config):
      assert trainer.step_context(config, stage).pseudomask.method == "superpixel"
  trainer.train(config, str(tmp_path))
  synthesize.run(config, str(tmp_path))
  workdir = Workdir(str(tmp_path))
  with open(workdir.fingerprint) as f:
    assert json.load(f)["synthesizer"] == synthesizer
  for stage in stages.stages(config):
    assert workdir.stage_done(stage.name)
  folder = tmp_path / "synthetic"
  images = sorted((folder / "imagesTr").iterdir())
  labels = sorted((folder / "labelsTr").iterdir())
  assert len(images) == len(labels) == config.synthesize.num_samples
  for image, label in zip(images, labels):
    hu, classes = np.asarray(nib.load(image).dataobj), np.asarray(nib.load(label).dataobj)
    assert hu.shape == classes.shape == tuple(config.data.image_shape)
    assert np.all(np.isfinite(hu)) and set(np.unique(classes)) <= set(range(NUM_CLASSES))
  assert (folder / "contact_sheet.png").stat().st_size > 0
  if synthesizer == "synthseg":  # the real label maps, deformed: no new classes
    real = trainer.load_training_data(config).labels
    painted = np.stack([np.asarray(nib.load(f).dataobj) for f in labels])
    assert set(np.unique(painted)) <= set(np.unique(real))
    assert [p.name for p in (tmp_path / "networks").iterdir()] == ["grid.json"]  # no network
  # A work directory of another synthesizer is refused, naming the field.
  config.synthesizer = "acis"
  with pytest.raises(Exception, match="synthesizer"):
    trainer.train(config, str(tmp_path))
