"""mode=evaluate on axial slices of a phantom volume: the split, the arms, the outputs, resuming.

Synthetic data come from fake folders (written here in the `synthesize` layout), so the
protocol test trains only tiny downstream networks for a few steps; the synthesizer-per-n path
is checked with the trainer and `synthesize` replaced by recorders.
"""
import csv
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from acis_jax.data.nifti import save_nifti
from acis_jax.data.phantom import phantom_case
from acis_jax.defaults import base_config
from acis_jax.eval import arms, downstream, protocol, report, splits

NUM_CLASSES = 6       # the phantom's background + 5 structures
SHAPE = (32, 32)
POOL, TEST, N, M = 6, 5, 2, 3  # pool slices, test slices, few-shot size, synthetic pairs


def make_config(tmp_path, **evaluate):
  phantom_case(tmp_path / "real", (32, 32, 40))
  config = base_config()
  config.mode = "evaluate"
  config.data.data_dir = str(tmp_path / "real")
  config.data.image_shape = SHAPE
  config.data.num_classes = NUM_CLASSES
  config.data.num_slices = POOL
  config.synthesize.num_samples = M
  ev = config.evaluate
  ev.num_train = (N,)
  ev.seeds = (0,)
  ev.train_band = (0.2, 0.45)
  ev.test_band = (0.55, 0.8)
  ev.num_test_slices = TEST
  ev.denoise_sigmas = (0.1,)
  ev.superres_factors = ()
  ev.segmentation_nets = ("unet",)
  ev.reconstruction_nets = ("resnet",)
  ev.segmentation_steps = 2
  ev.reconstruction_steps = 3
  ev.batch_size = 2
  ev.augment.enabled = False
  ev.train_synthesizer = False
  ev.synthesizer_per_seed = False
  ev.nets.unet.features = (4, 8)
  ev.nets.resnet.features = 4
  ev.nets.resnet.num_blocks = 1
  for name, value in evaluate.items():
    ev[name] = value
  return config


def write_fake_synthetic(folder, seed, shape=SHAPE):
  """M pairs as `synthesize` writes them: HU int16 images, uint8 labels."""
  rng = np.random.default_rng(seed)
  hus = []
  for i in range(M):
    hu = rng.integers(-1200, 800, shape).astype(np.int16)  # beyond the window: clipped
    save_nifti(folder / "imagesTr" / f"synth_{i:04d}_0000.nii.gz", hu, np.eye(4))
    save_nifti(folder / "labelsTr" / f"synth_{i:04d}.nii.gz",
               rng.integers(0, NUM_CLASSES, shape).astype(np.uint8), np.eye(4))
    hus.append(hu)
  return np.stack(hus)


def windowed(hu):
  """[-1000, 600] HU -> [0, 1], written out independently of the package."""
  return np.clip((hu.astype(np.float64) + 1000.0) / 1600.0, 0.0, 1.0)


def z_index(name):
  return int(name.rsplit("_z", 1)[1])


def test_split_is_two_disjoint_bands_and_subsets_spread_over_the_pool(tmp_path):
  config = make_config(tmp_path)
  split = splits.load_split(config)
  pool = [z_index(e.name) for e in split.pool]
  test = [z_index(e.name) for e in split.test]
  assert len(pool) == POOL and len(test) == TEST
  assert pool == sorted(pool) and max(pool) < min(test)
  assert 0.2 * 39 <= min(pool) and max(test) <= 0.8 * 39  # inside the bands (40 slices)
  for n in range(1, POOL + 1):
    subset = [pool.index(z_index(e.name)) for e in splits.few_shot_subset(split.pool, n)]
    # n distinct pool slices in order, the ends included, gaps within one of each other.
    assert len(set(subset)) == n and subset == sorted(subset)
    if n >= 2:
      gaps = np.diff(subset)
      assert subset[0] == 0 and subset[-1] == POOL - 1 and gaps.max() - gaps.min() <= 1
  with pytest.raises(ValueError, match="training pool holds 6"):
    splits.few_shot_subset(split.pool, 7)


def test_overlapping_bands_are_refused(tmp_path):
  config = make_config(tmp_path, test_band=(0.4, 0.8))
  with pytest.raises(ValueError, match="overlap"):
    splits.load_split(config)


def test_protocol_writes_every_arm_and_resumes(tmp_path, monkeypatch):
  config = make_config(tmp_path)
  workdir = tmp_path / "work"
  synth = workdir / f"synth_n{N}"
  refined = write_fake_synthetic(synth / "synthetic", seed=1)
  unrefined = write_fake_synthetic(synth / "synthetic_unrefined", seed=2)

  trained_on = []
  real_train = downstream.train_downstream

  def recording_train(factory, task, inputs, targets=None, **kw):
    trained_on.append((task.name, np.asarray(inputs)[..., 0]))
    # The synthetic arms' batches take their real share from the n real cases, first.
    assert kw["num_real"] == (N if len(inputs) == N + M else 0)
    assert kw["real_share"] == config.evaluate.real_share
    assert kw["steps"] == (2 if task.is_segmentation else 3)  # each task's own count
    return real_train(factory, task, inputs, targets, **kw)

  monkeypatch.setattr(downstream, "train_downstream", recording_train)
  protocol.run(config, str(workdir))
  out = workdir / "eval"

  # Every (task, net) trains 4 arms: n real, n real + M of each synthetic folder, the pool.
  sizes = sorted(len(x) for task, x in trained_on if task == "segmentation")
  assert sizes == [N, N + M, N + M, POOL]
  for folder_hu in (refined, unrefined):
    matches = [x for task, x in trained_on if len(x) == N + M
               and np.allclose(x[N:], windowed(folder_hu), atol=1e-6)]
    assert len(matches) == 2  # segmentation and denoising
  baseline = next(x for task, x in trained_on if len(x) == N)
  assert all(np.array_equal(x[:N], baseline) for task, x in trained_on if len(x) == N + M)

  with open(out / "results.csv", newline="") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == report.COLUMNS
    rows = list(reader)
  seg_metrics = {f"{m}/{label}" for m in ("dice", "msd", "nsd", "hd95")
                 for label in list(range(1, NUM_CLASSES)) + ["mean"]}
  recon_metrics = {"psnr", "ssim", "psnr_input", "ssim_input"}
  runs = {("baseline", str(N)), ("acis-", str(N)), ("acis", str(N)), ("upper", str(POOL))}
  by_task = {}
  for row in rows:
    by_task.setdefault((row["task"], row["net"]), []).append(row)
  assert set(by_task) == {("segmentation", "unet"), ("denoise_0.1", "resnet")}
  for (task, _), task_rows in by_task.items():
    metrics = seg_metrics if task == "segmentation" else recon_metrics
    assert len(task_rows) == len(runs) * TEST * len(metrics)
    assert {(r["arm"], r["n"]) for r in task_rows} == runs
    assert {r["metric"] for r in task_rows} == metrics
    assert {r["seed"] for r in task_rows} == {"0"}
  test_cases = {e.name for e in splits.load_split(config).test}
  assert {r["case"] for r in rows} == test_cases

  with open(out / "environment.json") as f:
    env = json.load(f)
  assert env["packages"]["jax"] == jax.__version__
  assert env["packages"]["numpy"] == np.__version__

  table = (out / "table.md").read_text()
  assert f"jax {jax.__version__}" in table
  for title in ("### segmentation", "### denoise_0.1", "Baseline DSC (%)", "ACIS- MSD (mm)",
                "ACIS PSNR (dB)", "Upper bound SSIM"):
    assert title in table
  assert table.count("**") >= 2 * 4  # a bold best in each of the 4 metric columns
  assert "disjoint band (0.55, 0.8)" in table and "one patient" in table
  plots = sorted(os.listdir(out / "plots"))
  assert plots == ["denoise_0.1_psnr.png", "denoise_0.1_ssim.png",
                   "segmentation_dice_mean.png", "segmentation_msd_mean.png"]

  # A re-run reuses every trained arm: nothing is trained again, the results are the same.
  def refuse(*args, **kwargs):
    raise AssertionError("an arm was trained again")

  monkeypatch.setattr(downstream, "train_downstream", refuse)
  before = (out / "results.csv").read_text()
  protocol.run(config, str(workdir))
  assert (out / "results.csv").read_text() == before

  # Changed settings are not served from the old records: a reconstruction step count
  # retrains the reconstruction arms only.
  retrained = []

  def train_reconstruction_only(factory, task, inputs, targets=None, **kw):
    assert not task.is_segmentation, "a segmentation arm was trained again"
    retrained.append(kw["steps"])
    return real_train(factory, task, inputs, targets, **kw)

  monkeypatch.setattr(downstream, "train_downstream", train_reconstruction_only)
  config.evaluate.reconstruction_steps = 4
  protocol.run(config, str(workdir))
  assert retrained == [4] * len(runs)


def test_synthetic_folders_are_checked(tmp_path):
  config = make_config(tmp_path)
  workdir = tmp_path / "work"
  with pytest.raises(ValueError, match="train_synthesizer=False"):
    protocol.run(config, str(workdir))
  synth = workdir / f"synth_n{N}"
  write_fake_synthetic(synth / "synthetic", seed=1, shape=(16, 16))
  write_fake_synthetic(synth / "synthetic_unrefined", seed=2)
  with pytest.raises(ValueError, match=r"synthetic/imagesTr/synth_0000_0000.nii.gz: synthetic image "
                                       r"of shape \(16, 16\)"):
    protocol.run(config, str(workdir))


def test_each_seed_trains_each_synthesizer_on_only_those_n_slices(tmp_path, monkeypatch):
  config = make_config(tmp_path, num_train=(2, 3), seeds=(0, 1), train_synthesizer=True,
                       synthesizer_per_seed=True,
                       arms=("acis", "acis-real", "superpixel", "labels_first"),
                       quality_reports=True,
                       segmentation=False, denoise_sigmas=(), superres_factors=(2,),
                       superres_nets=())
  workdir = tmp_path / "work"
  calls = []

  def record(step, synth_config, root, examples):
    calls.append((step, synth_config.synthesizer, root, synth_config.seed,
                  [e.name for e in examples]))

  def fake_train(synth_config, root, examples):
    record("train", synth_config, root, examples)

  def fake_synthesize(synth_config, root, examples):
    assert not synth_config.synthesize.unrefined  # ACIS- is not an arm here
    record("synthesize", synth_config, root, examples)
    write_fake_synthetic(Path(root) / arms.SYNTHETIC_FOLDERS["acis"], seed=0)

  def fake_from_real(synth_config, root, examples):
    record("from_real", synth_config, root, examples)
    write_fake_synthetic(Path(root) / arms.SYNTHETIC_FOLDERS["acis-real"], seed=1)

  def fake_quality(synth_config, root, examples):
    record("quality", synth_config, root.root, examples)
    for folder in arms.SYNTHETIC_FOLDERS.values():
      if (Path(root.root) / folder).is_dir():
        (Path(root.root) / folder / "quality.json").write_text("{}")

  monkeypatch.setattr(arms.trainer, "train", fake_train)
  monkeypatch.setattr(arms.quality, "write_reports", fake_quality)
  monkeypatch.setattr(arms.synthesize, "run", fake_synthesize)
  monkeypatch.setattr(arms.synthesize, "write_from_real", fake_from_real)
  protocol.run(config, str(workdir))
  pool = splits.load_split(config).pool
  expected = []
  for n in (2, 3):
    subset = [e.name for e in splits.few_shot_subset(pool, n)]
    for seed in (0, 1):
      acis, superpixel, labels_first = (str(workdir / f"{prefix}_n{n}_seed{seed}")
                                        for prefix in ("synth", "superpixel", "labels_first"))
      expected += [(step, "acis", acis, seed, subset)
                   for step in ("train", "synthesize", "from_real")]
      expected += [(step, name, root, seed, subset)
                   for name, root in (("superpixel", superpixel), ("labels_first", labels_first))
                   for step in ("train", "synthesize")]
      if seed == 0:  # the quality reports: each synthesizer of the first seed
        expected += [("quality", name, root, seed, subset)
                     for name, root in (("acis", acis), ("superpixel", superpixel),
                                        ("labels_first", labels_first))]
  assert calls == expected
  rows = list(csv.DictReader(open(workdir / "eval" / "results.csv")))
  assert {r["arm"] for r in rows} == {"acis", "acis-real", "superpixel", "labels_first"}
  # Complete folders are reused: a second run trains no synthesizer; a missing folder is
  # written without rewriting the others.
  calls.clear()
  protocol.run(config, str(workdir))
  assert calls == []
  shutil.rmtree(workdir / "synth_n2_seed1" / arms.SYNTHETIC_FOLDERS["acis-real"])
  protocol.run(config, str(workdir))
  assert [c[0] for c in calls] == ["train", "from_real"]


def test_the_synthseg_arm_paints_the_n_real_label_maps_without_training(tmp_path, monkeypatch):
  config = make_config(tmp_path, arms=("baseline", "synthseg"), denoise_sigmas=(),
                       train_synthesizer=True)
  trained_on = []
  real_train = downstream.train_downstream

  def recording_train(factory, task, inputs, targets=None, **kw):
    trained_on.append((np.asarray(inputs)[..., 0], np.asarray(targets)))
    return real_train(factory, task, inputs, targets, **kw)

  monkeypatch.setattr(downstream, "train_downstream", recording_train)
  protocol.run(config, str(tmp_path / "work"))
  painter = Path(arms.synthesizer_dir(config, str(tmp_path / "work"), N, 0, "synthseg").root)
  assert (painter / "synthetic" / "dataset.json").exists()
  assert [p.name for p in (painter / "networks").iterdir()] == ["grid.json"]  # no network
  (base_x, base_y), (synth_x, synth_y) = sorted(trained_on, key=lambda t: len(t[0]))
  assert len(base_x) == N and len(synth_x) == N + M
  np.testing.assert_array_equal(synth_x[:N], base_x)
  np.testing.assert_array_equal(synth_y[:N], base_y)
  assert set(np.unique(synth_y[N:])) <= set(np.unique(base_y))
  assert 0.0 <= synth_x[N:].min() and synth_x[N:].max() <= 1.0
  assert "SynthSeg-style DSC (%)" in (tmp_path / "work" / "eval" / "table.md").read_text()

  config.data.num_classes = 0
  config.evaluate.segmentation = False
  config.evaluate.denoise_sigmas = (0.1,)
  with pytest.raises(ValueError, match="synthseg.*need labels"):
    protocol.run(config, str(tmp_path / "work"))


def two_patient_config(tmp_path, **evaluate):
  config = make_config(tmp_path, train_band=(0.3, 0.7), test_band=(0.3, 0.7), **evaluate)
  patients = tmp_path / "patients"
  phantom_case(patients, (32, 32, 40), name="patient_a", seed=0)
  phantom_case(patients, (32, 32, 40), name="patient_b", seed=1)
  config.data.data_dir = str(patients)
  return config


def test_by_patient_holds_out_the_last_patients_in_name_order(tmp_path):
  config = two_patient_config(tmp_path, by_patient=True)
  split = splits.load_split(config)
  assert {e.name.rsplit("_z", 1)[0] for e in split.pool} == {"patient_a"}
  assert {e.name.rsplit("_z", 1)[0] for e in split.test} == {"patient_b"}
  assert "Split by patient" in splits.split_note(config, split)
  config.evaluate.num_test_cases = 2
  with pytest.raises(ValueError, match="num_test_cases=2.*2 patients"):
    splits.load_split(config)


def test_split_by_patient_keeps_the_test_patient_out_of_every_training(tmp_path, monkeypatch):
  config = two_patient_config(tmp_path, test_cases=("patient_b",), train_synthesizer=True,
                              arms=("baseline", "acis", "upper"), denoise_sigmas=())
  split = splits.load_split(config)
  assert {e.name.rsplit("_z", 1)[0] for e in split.pool} == {"patient_a"}
  assert {e.name.rsplit("_z", 1)[0] for e in split.test} == {"patient_b"}
  assert len(split.pool) == POOL and len(split.test) == TEST
  # The same band of both patients: without the patient split these would overlap.
  assert {z_index(e.name) for e in split.pool} & {z_index(e.name) for e in split.test}
  assert "Split by patient" in splits.split_note(config, split)

  synthesizer_saw, downstream_saw = [], []

  def fake_train(synth_config, root, examples):
    synthesizer_saw.extend(e.name for e in examples)

  def fake_synthesize(synth_config, root, examples):
    for i, folder in enumerate(arms.SYNTHETIC_FOLDERS.values()):
      write_fake_synthetic(Path(root) / folder, seed=i)

  real_train = downstream.train_downstream

  def recording_train(factory, task, inputs, targets=None, **kw):
    downstream_saw.append(np.asarray(inputs)[..., 0])
    return real_train(factory, task, inputs, targets, **kw)

  monkeypatch.setattr(arms.trainer, "train", fake_train)
  monkeypatch.setattr(arms.synthesize, "run", fake_synthesize)
  monkeypatch.setattr(downstream, "train_downstream", recording_train)
  protocol.run(config, str(tmp_path / "work"))

  assert synthesizer_saw and all(n.startswith("patient_a_z") for n in synthesizer_saw)
  test_images = [e.image.array for e in split.test]
  pool_images = [e.image.array for e in split.pool]
  assert len(downstream_saw) == 3
  for inputs in downstream_saw:
    assert not any(np.allclose(row, t) for row in inputs for t in test_images)
    assert any(np.allclose(inputs[0], p) for p in pool_images)


def test_split_by_patient_names_the_cases(tmp_path):
  config = two_patient_config(tmp_path, test_cases=("patient_c",))
  with pytest.raises(ValueError, match=r"no case named \['patient_c'\]; the cases are "
                                       r"\['patient_a', 'patient_b'\]"):
    splits.load_split(config)
  config.evaluate.test_cases = ("patient_a", "patient_b")
  with pytest.raises(ValueError, match="none is left to train on"):
    splits.load_split(config)
