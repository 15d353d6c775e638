"""The V2UM2I-like synthesizer (`config.synthesizer = "superpixel"`): ACIS's stages on SLIC
superpixel masks, trained and sampled at smoke size in 2-D and 3-D."""
import json

import nibabel as nib
import numpy as np
import pytest

from acis_jax.config_utils import load_config_file
from acis_jax.jobs import synthesize
from acis_jax.train import stages, trainer
from acis_jax.workdir import Workdir

NUM_CLASSES = 6  # the phantom's


@pytest.mark.parametrize("preset", [None, "3d"])
def test_trains_and_samples_pairs_on_superpixel_masks(tmp_path, preset):
  config = load_config_file("experiments/smoke.py", preset)
  config.synthesizer = "superpixel"
  config.train.batch_size = 8  # a multiple of the 8 test devices
  # The masks and images stages are where pseudo-masks are made; the later two stages run
  # the same code as ACIS's (and cost most of the compile time).
  config.train.registration_steps = 0
  config.refine.steps = 0
  for stage in stages.stages(config):
    assert trainer.step_context(config, stage).pseudomask.method == "superpixel"
  trainer.train(config, str(tmp_path))
  synthesize.run(config, str(tmp_path))
  with open(Workdir(str(tmp_path)).fingerprint) as f:
    assert json.load(f)["synthesizer"] == "superpixel"
  folder = tmp_path / "synthetic"
  images = sorted((folder / "imagesTr").iterdir())
  labels = sorted((folder / "labelsTr").iterdir())
  assert len(images) == len(labels) == config.synthesize.num_samples
  for image, label in zip(images, labels):
    hu, classes = np.asarray(nib.load(image).dataobj), np.asarray(nib.load(label).dataobj)
    assert hu.shape == classes.shape == tuple(config.data.image_shape)
    assert np.all(np.isfinite(hu)) and set(np.unique(classes)) <= set(range(NUM_CLASSES))
  # A work directory of the other synthesizer is refused, naming the field.
  config.synthesizer = "acis"
  with pytest.raises(Exception, match="synthesizer"):
    trainer.train(config, str(tmp_path))
