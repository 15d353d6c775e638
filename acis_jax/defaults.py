"""The default config every experiment starts from; experiments override fields.

Every default the paper leaves open (see DESIGN.md) is a field here, so a run
can change it from the command line (`--config.pseudomask.bandwidth=4`).
"""

import dataclasses

import ml_collections

from acis_jax.data.augment import AugmentParams
from acis_jax.data.nnunet import dataset_folder_name
from acis_jax.pseudomask import PseudoMaskParams
from acis_jax.synthesizers import SYNTHESIZERS, uses_pseudo_masks
from acis_jax.synthesizers.synthseg import SynthSegParams
from acis_jax.train.refine import MODES as REFINE_MODES
from acis_jax.workdir import SYNTHETIC_FOLDERS

# What `synthesize` starts each pair from (acis_jax.jobs.synthesize).
SYNTHESIS_SOURCES = ("generated", "real", "labels")


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mode = "pseudomask"
  config.seed = 0
  config.synthesizer = "acis"        # or superpixel, joint_gan, labels_first, synthseg
                                     # (acis_jax.synthesizers)
  # The SynthSeg-style synthesizer's randomisation (synthesizer "synthseg", arm "synthseg").
  config.synthseg = ml_collections.ConfigDict(dataclasses.asdict(SynthSegParams()))

  config.data = ml_collections.ConfigDict()
  config.data.data_dir = ""          # nnU-Net folder; empty = the built-in sample below
  config.data.sample = "chest"       # "chest", "lobes", "abdomen" (sample CTs; several
                                     # joined by commas) or "phantom"
  config.data.classes = ()           # class names to train on, in order (acis_jax.data.labels);
                                     # () = the label ids as stored; named, they set
                                     # num_classes (resolve_config)
  config.data.image_shape = (192, 192, 160)
  config.data.patch_shape = ()       # train on random patches of this shape; () = whole grid
  config.data.spacing_mm = ()        # voxel size (mm, one or per axis) of the training grid,
                                     # centred on each volume: the same physical scale in every
                                     # case; () = each volume's field of view resized to it
  config.data.require_labels = True
  config.data.max_cases = 0          # 0 = every case
  config.data.num_slices = 1         # 2-D runs: axial slices per volume
  config.data.slice_band = (0.3, 0.7)  # ... taken from this fraction of the axial extent
  config.data.phantom_seed = 0
  config.data.num_classes = 5        # counts the background; 0 = label-free (images only)

  # The method is the synthesizer's (config.synthesizer), not a setting of its own.
  config.pseudomask = ml_collections.ConfigDict(
      {k: v for k, v in dataclasses.asdict(PseudoMaskParams()).items() if k != "method"})
  config.pseudomask.num_seeds = 8192

  config.augment = ml_collections.ConfigDict(dataclasses.asdict(AugmentParams()))

  # Widths per network; `dtype` is the compute dtype (parameters stay float32).
  config.model = ml_collections.ConfigDict()
  config.model.latent_dim = 128
  config.model.mask_generator_features = (256, 128, 64, 32, 16)
  config.model.critic_features = (32, 64, 128, 256)
  config.model.annotation_features = (32, 64, 128, 256)
  config.model.image_features = (64, 128, 256, 512)
  config.model.image_dropout = 0.5
  config.model.discriminator_features = (64, 128, 256, 512)
  config.model.registration_features = (16, 32, 32, 32, 32)
  config.model.registration_dropout = 0.2
  config.model.integration_steps = 7
  config.model.int_downsize = 1
  config.model.dtype = "float32"
  config.model.remat = False

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 2
  config.train.masks_steps = 2000
  config.train.annotation_finetune_steps = 500  # then labels of generated masks (labelled runs)
  config.train.images_steps = 2000
  config.train.images_finetune_steps = 1000
  config.train.registration_steps = 2000
  config.train.n_critic = 5
  config.train.gradient_penalty = 10.0
  config.train.adversarial_weight = 1.0
  config.train.reconstruction_weight = 100.0   # pix2pix's weight on its reconstruction term
  config.train.smoothness_weight = 1.0
  config.train.wgan_learning_rate = 1e-4
  config.train.gan_learning_rate = 2e-4
  config.train.registration_learning_rate = 1e-4
  config.train.log_every = 50
  config.train.checkpoint_every = 500
  config.train.image_every = 500   # TensorBoard sample images every this many steps; 0 = none
  config.train.keep_checkpoints = 2

  # acis_jax.train.refine; defaults measured head to head in the README ("What the
  # refinement changes"): backprop lowered eq. 3 where the policy gradient did not.
  config.refine = ml_collections.ConfigDict()
  config.refine.mode = "backprop"          # or "policy_gradient" (the paper's; less memory)
  config.refine.steps = 500
  config.refine.passes = 8                 # T of eq. 3
  config.refine.uncertainty_weight = 1.0   # w_u, on eq. 3 divided by its running std
  config.refine.label_weight = 1.0         # w_l, on 1 - label consistency, the same way
  config.refine.realism_weight = 3.0       # the images stage's objective alongside; 0 = off
  # The appearance gap (intensity distribution, texture) to the matched real case, over its
  # running std: at 1 it halved the lungs' brightening and kept the texture, with the reward's
  # gains (README "The appearance term"); 3 cancelled most of them. It cost :swap's U-Net
  # 0.5-0.8 Dice (README, "The other way round"): 0 where downstream Dice is all that counts.
  config.refine.appearance_weight = 1.0
  config.refine.actions = 4                # policy_gradient: K actions per sample (1: the
                                           # paper's moving-average baseline)
  config.refine.noise_factor = 8           # ... noise on a grid this many times coarser
                                           # (1: per voxel, the paper's)
  config.refine.sigma = 0.05               # ... std of the Gaussian image policy
  config.refine.baseline_decay = 0.9       # running baseline and term variances
  config.refine.learning_rate = 1e-4

  config.synthesize = ml_collections.ConfigDict()
  config.synthesize.num_samples = 16
  config.synthesize.batch_size = 2
  config.synthesize.unrefined = False      # also write ACIS- (before refinement)
  config.synthesize.quality = True         # and the quality report of each synthetic folder
  config.synthesize.source = "generated"   # noise -> mask -> labels -> image (sec 2.2);
                                           # "real": each real case moved by a random smooth
                                           # diffeomorphism -> new mask, its labels -> image;
                                           # "labels": the maps of labels_dir -> the nearest
                                           # real case registered onto each -> mask -> image
  config.synthesize.deformation = 2.0      # "real": RMS of the velocity field, voxels
  config.synthesize.deformation_scale = 8.0  # "real": its smoothing Gaussian's std, voxels
  config.synthesize.labels_dir = ""        # "labels": a folder of label maps (a labelsTr)
  config.synthesize.label_fit_steps = 300  # "labels": Adam steps of the label registration

  config.quality = ml_collections.ConfigDict()  # acis_jax.eval.quality
  config.quality.segmenter_steps = 300     # its U-Net (evaluate.nets.unet), on real cases only

  # mode = "export": an nnU-Net v2 dataset of the real cases and the synthetic pairs.
  config.export = ml_collections.ConfigDict()
  config.export.dataset_id = 501           # DatasetNNN_Name (1..999, unused in nnUNet_raw)
  config.export.name = "ACIS"
  config.export.arm = "acis"               # "acis" or "acis-" (synthesize.unrefined)
  config.export.out_dir = ""               # "" = WORKDIR/nnunet; e.g. $nnUNet_raw
  config.export.num_folds = 5              # splits_final.json folds; 0 = no file

  config.evaluate = evaluate_config()

  config.distributed = ml_collections.ConfigDict()
  config.distributed.enabled = False
  config.distributed.coordinator_address = ""
  config.distributed.num_processes = -1
  config.distributed.process_id = -1
  return config


# Fields with a range, and the range: `check_config` refuses a value outside it before any
# work (a zero here used to surface as a ZeroDivisionError after the first compile).
_AT_LEAST = {
    "data.num_classes": 0, "data.max_cases": 0, "data.num_slices": 1,
    "train.batch_size": 1, "train.n_critic": 1, "train.log_every": 1,
    "train.checkpoint_every": 1, "train.keep_checkpoints": 1, "train.image_every": 0,
    "train.masks_steps": 0, "train.annotation_finetune_steps": 0, "train.images_steps": 0,
    "train.images_finetune_steps": 0,
    "train.registration_steps": 0, "refine.steps": 0, "refine.passes": 2,
    "refine.actions": 1, "refine.noise_factor": 1,
    "synthesize.num_samples": 1, "synthesize.batch_size": 1,
    "pseudomask.num_seeds": 1, "pseudomask.num_edge_points": 1, "export.num_folds": 0,
    "quality.segmenter_steps": 1, "synthesize.label_fit_steps": 1,
}


def resolve_config(config: ml_collections.ConfigDict) -> None:
  """Fields that follow from others, settled once before `check_config` (in place).

  `data.classes` may come from the command line as one comma-joined string
  (`--config.data.classes=left_lung,right_lung`): it is split into names. Named classes fix
  the class count: `data.num_classes` becomes their number + 1 (the background), so a config
  that names other classes than its file needs no second override.
  """
  classes = tuple(name.strip() for item in config.data.classes
                  for name in str(item).split(",") if name.strip())
  config.data.classes = classes
  if classes:
    config.data.num_classes = len(classes) + 1


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses values that cannot work, naming the field and what it may be.

  Raises:
    ValueError listing every bad field at once.
  """
  problems = []
  for path, low in _AT_LEAST.items():
    section, field = path.split(".")
    value = config[section][field]
    if not isinstance(value, int) or value < low:
      problems.append(f"{path}={value!r} (an integer >= {low})")
  if config.data.num_classes == 1:
    problems.append("data.num_classes=1 (0 for images only, or the classes + the background, "
                    ">= 2)")
  shape = tuple(config.data.image_shape)
  if len(shape) not in (2, 3) or not all(isinstance(s, int) and s > 0 for s in shape):
    problems.append(f"data.image_shape={shape} (2 or 3 positive integers)")
  try:
    dataset_folder_name(config.export.dataset_id, config.export.name)
  except ValueError as e:
    problems.append(str(e))
  if config.synthesizer not in SYNTHESIZERS:
    problems.append(f"synthesizer={config.synthesizer!r} (one of {list(SYNTHESIZERS)})")
  elif not uses_pseudo_masks(config.synthesizer):
    if config.data.num_classes < 2:
      problems.append(f"synthesizer={config.synthesizer!r} makes label maps: it needs labels "
                      f"(data.num_classes >= 2, got {config.data.num_classes})")
    if config.synthesize.source != "generated":
      problems.append(f"synthesize.source={config.synthesize.source!r} with synthesizer="
                      f"{config.synthesizer!r}, which has no pseudo-masks to paint real "
                      "anatomy from ('generated' only)")
  if config.synthesizer == "synthseg" or "synthseg" in config.evaluate.arms:
    try:
      SynthSegParams.from_config(config.synthseg)
    except ValueError as e:
      problems.append(str(e))
  if config.refine.mode not in REFINE_MODES:
    problems.append(f"refine.mode={config.refine.mode!r} (one of {list(REFINE_MODES)})")
  if config.synthesize.source not in SYNTHESIS_SOURCES:
    problems.append(f"synthesize.source={config.synthesize.source!r} (one of "
                    f"{list(SYNTHESIS_SOURCES)})")
  if config.synthesize.source == "labels" and not config.synthesize.labels_dir:
    problems.append("synthesize.source='labels' needs synthesize.labels_dir (a folder of "
                    "label maps, e.g. a labelsTr)")
  if config.synthesize.source == "labels" and not config.data.num_classes:
    problems.append("synthesize.source='labels' needs a labelled run (data.num_classes > 0)")
  if not config.synthesize.deformation >= 0:
    problems.append(f"synthesize.deformation={config.synthesize.deformation!r} (voxels, >= 0)")
  if not config.synthesize.deformation_scale > 0:
    problems.append(f"synthesize.deformation_scale={config.synthesize.deformation_scale!r} "
                    "(voxels, > 0)")
  if config.export.arm not in SYNTHETIC_FOLDERS:
    problems.append(f"export.arm={config.export.arm!r} (one of {sorted(SYNTHETIC_FOLDERS)})")
  if problems:
    raise ValueError("config: " + "; ".join(problems))


def evaluate_config() -> ml_collections.ConfigDict:
  """The `evaluate` section with the paper's settings where it gives them (sec 3.1).

  Network sizes are the paper's (3DUNet features [16, 32, 64, 128], MedNeXt-S, EDSR-style
  ResNet, RED-CNN, ESRT); steps, learning rates and the test split are ours.
  """
  ev = ml_collections.ConfigDict()
  ev.num_train = (4, 8, 16)         # few-shot sizes n (each <= the training pool)
  ev.arms = ("baseline", "acis-", "acis", "upper")  # acis- = no refinement; + "synthseg",
                                    # "acis-real" (ACIS painting moved real cases),
                                    # "superpixel", "joint_gan", "labels_first" (report.ARM_TITLES)
  ev.seeds = (0, 1, 2)
  ev.train_band = (0.2, 0.42)       # 2-D: axial band of the training pool (fractions)
  ev.test_band = (0.44, 0.64)       # 2-D: axial band of the test slices, disjoint from it
  ev.num_test_slices = 16           # 2-D: test slices per volume
  ev.num_test_cases = 1             # 3-D: held-out volumes (the last ones in name order)
  ev.test_cases = ()                # held-out patients by case name (2-D and 3-D); when
                                    # given, the split is by patient and the bands may overlap
  ev.by_patient = False             # 2-D without test_cases: hold out the last num_test_cases
                                    # volumes in name order (else: bands of every volume)
  ev.train_synthesizer = True       # train the synthesizer per n when its folders are missing
  ev.quality_reports = False        # the quality report of each synthesizer of the first seed
  ev.synthesizer_per_seed = True    # one synthesizer per n and seed (its variance in the error
                                    # bars); False: one per n, seeded by config.seed

  ev.segmentation = True            # needs data.num_classes >= 2
  ev.denoise_sigmas = (0.1,)        # paper: 0.1, 0.2, 0.5 (intensity units, images in [0, 1])
  ev.deblur_sigmas = ()             # paper: 1, 2, 5 (voxels)
  ev.superres_factors = (2,)        # paper: 2, 4
  ev.segmentation_nets = ("unet", "mednext")
  ev.reconstruction_nets = ("resnet", "redcnn")
  ev.superres_nets = ("esrt",)      # added for super-resolution only, as in the paper

  ev.segmentation_steps = 2000      # per arm, the same for every arm
  ev.reconstruction_steps = 2000    # (denoising, deblurring, super-resolution)
  ev.batch_size = 4
  ev.real_share = 0.5               # of each batch from the real cases when synthetic pairs are
                                    # added (uniform over all cases: -1, the paper's silence)
  ev.synthetic_weight = 1.0          # a synthetic case's loss weight in its batch (real: 1)
  ev.pretrain_fraction = 0.5        # that fraction of the steps on synthetic cases only, then
                                    # real only (pretrain, fine-tune; README); 0: mixed batches
  ev.segmentation_learning_rate = 1e-3
  ev.reconstruction_learning_rate = 1e-4
  ev.nsd_tolerance_mm = 2.0
  ev.alpha = 0.05                   # the '*' threshold of the one-sided Wilcoxon test
  ev.augment = ml_collections.ConfigDict(dataclasses.asdict(AugmentParams()))

  # Constructor arguments of each network (acis_jax.eval.seg_nets / recon_nets).
  ev.nets = ml_collections.ConfigDict()
  ev.nets.unet = ml_collections.ConfigDict({"features": (16, 32, 64, 128)})
  ev.nets.mednext = ml_collections.ConfigDict({"width": 32, "blocks": (2,) * 9,
                                               "expansion": (2,) * 9, "kernel_size": 3})
  ev.nets.resnet = ml_collections.ConfigDict({"features": 64, "num_blocks": 16,
                                              "res_scale": 0.1})
  ev.nets.redcnn = ml_collections.ConfigDict({"features": 96, "kernel_size": 5})
  ev.nets.esrt = ml_collections.ConfigDict({"features": 32, "num_hpb": 3,
                                            "num_transformers": 1, "heads": 4,
                                            "split_size": 256})
  return ev


def fewshot_2d_on_cpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The synthesizer and downstream networks of the 2-D few-shot experiments, sized for 64x64
  slices on a 2-core CPU (experiments/fewshot_ct2d.py, fewshot_chest2d.py)."""
  config.mode = "evaluate"
  config.data.image_shape = (64, 64)
  config.pseudomask.num_edge_points = 1024
  config.pseudomask.num_seeds = 256
  config.pseudomask.bandwidth = 2.0
  config.model.latent_dim = 32
  config.model.mask_generator_features = (64, 32, 16, 8)
  config.model.critic_features = (16, 32, 64, 128)
  config.model.annotation_features = (16, 32, 64)
  config.model.image_features = (16, 32, 64)
  config.model.discriminator_features = (16, 32, 64)
  config.model.registration_features = (8, 16, 16, 16)
  config.train.batch_size = 4
  config.train.wgan_learning_rate = 3e-4  # as experiments/demo.py: a short run on a CPU
  config.train.masks_steps = 800
  config.train.annotation_finetune_steps = 100
  config.train.images_steps = 400
  config.train.images_finetune_steps = 100
  config.train.registration_steps = 200
  config.refine.steps = 100
  config.refine.passes = 4
  config.train.log_every = 50
  config.train.checkpoint_every = 200
  config.synthesize.num_samples = 32
  config.synthesize.batch_size = 8
  config.synthesize.unrefined = True

  ev = config.evaluate
  ev.num_train = (4, 8)
  ev.denoise_sigmas = (0.1,)
  ev.segmentation_steps = 360
  ev.reconstruction_steps = 360
  ev.batch_size = 4
  ev.segmentation_learning_rate = 2e-3
  ev.reconstruction_learning_rate = 5e-4
  ev.nets.unet.features = (8, 16, 32, 64)
  ev.nets.mednext.width = 8
  ev.nets.mednext.blocks = (1,) * 9
  ev.nets.resnet.features = 16
  ev.nets.resnet.num_blocks = 4
  ev.nets.redcnn.features = 16
  ev.nets.redcnn.kernel_size = 3
  ev.nets.esrt.features = 16
  ev.nets.esrt.num_hpb = 1
  ev.nets.esrt.heads = 2
  return config


def fewshot_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Two steps of everything, n = 2, one seed, one net per task: a few-shot experiment's
  plumbing in a minute or two (its table means nothing)."""
  config.data.num_slices = 4
  for stage in ("masks", "images", "images_finetune", "registration"):
    config.train[f"{stage}_steps"] = 2
  config.refine.steps = 2
  config.train.log_every = 1
  config.synthesize.num_samples = 4
  ev = config.evaluate
  ev.num_train = (2,)
  ev.seeds = (0,)
  ev.num_test_slices = 4
  ev.segmentation_nets = ("unet",)
  ev.reconstruction_nets = ("resnet",)
  ev.superres_factors = ()
  ev.segmentation_steps = 2
  ev.reconstruction_steps = 2
  return config
