"""Few-shot downstream evaluation on 2-D slices of the built-in sample chest CT (paper sec 3.1).

  python -m acis_jax.main --config=experiments/fewshot_ct2d.py --workdir=runs/fewshot_ct2d

What it does (mode "evaluate", acis_jax/eval/protocol.py): axial slices of the sample chest CT
(heart and aorta from TotalSegmentator's reference masks, left and right lung derived by
thresholding; acis_jax.data.sample), resized to 64x64 (about 5.5 x 3.9 mm pixels). The training
pool is 32 slices of the axial band 0.20-0.42 (lower heart), the test set 16 slices of the
disjoint band 0.44-0.64 (upper heart, aortic root): the test slices are never trained on, but
they come from the same patient, so the Wilcoxon p-values are optimistic (see protocol.py).
For n = 4 and 8 real training slices (spread evenly over the pool) a small synthesizer is
trained on those n slices only (WORKDIR/synth_n{n}/) and writes 32 ACIS and 32 ACIS- pairs;
then for 2 seeds each arm (baseline, +ACIS-, +ACIS, upper bound = the 32 pool slices) trains
  * segmentation (4 labels: heart, aorta, left lung, right lung): U-Net and MedNeXt;
  * denoising (sigma 0.1) and super-resolution x2: ResNet and RED-CNN, plus ESRT for x2;
for the same number of steps, with tiny widths so that all of it fits the budget below.
Outputs: WORKDIR/eval/{results.csv,table.md,significance.csv,plots/}. Re-running resumes
(finished synthesizer stages, synthetic folders and trained arms are reused).

Budget (45 minutes on the 2-core CPU), measured at this size while the machine was shared
(load average 4-5 on its 2 cores; a free machine is faster):
  synthesizer per n, the steps below: 300 s wall for n = 4 (masks 86 s, images 86 s,
    registration 33 s, refine 77 s, synthesize 18 s; ~25 s of each stage is compilation);
    ~600 s for n = 4 and 8;
  downstream per step at batch 4 (`measure` preset): U-Net 55 ms, MedNeXt 185 ms, ResNet
    47-50 ms, RED-CNN 73 ms, ESRT 170 ms, so 0.65 s for one step of all 7 (task, net) pairs;
    7 training sets (3 arms x 2 n + the upper bound) x 2 seeds x 160 steps x 0.65 s = ~1460 s;
    compiling the 7 train steps ~60 s; evaluation ~0.1-0.4 s per arm; data and report < 30 s.
  Projected total: ~2150 s, about 36 minutes. If a run goes over, re-run the same command (it
  resumes) or shorten it with --config.evaluate.steps=120.
The run writes every trained arm as it goes, so an interrupted run loses at most one arm.

Presets: `measure` (the same pipeline with a few steps of everything, n = 4, one seed: it
checks the plumbing end to end on the real data in ~5 minutes; its table means nothing).
"""

from acis_jax.defaults import base_config
from acis_jax.eval.protocol import default_evaluate_config


def get_config(arg=None):
  presets = set(arg.split(",")) if arg else set()
  config = base_config()
  config.mode = "evaluate"
  config.data.sample = "chest"
  config.data.image_shape = (64, 64)
  config.data.num_classes = 5     # background, heart, aorta, left lung, right lung
  config.data.num_slices = 32     # the training pool (the upper-bound arm)

  # The synthesizer, scaled to 64x64 slices and a CPU.
  config.pseudomask.num_edge_points = 1024
  config.pseudomask.num_seeds = 256
  config.pseudomask.bandwidth = 2.0
  config.model.latent_dim = 32
  config.model.mask_generator_features = (64, 32, 16, 8)
  config.model.critic_features = (16, 32, 64)
  config.model.annotation_features = (16, 32, 64)
  config.model.image_features = (16, 32, 64)
  config.model.discriminator_features = (16, 32, 64)
  config.model.registration_features = (8, 16, 16, 16)
  config.train.batch_size = 4
  config.train.masks_steps = 500
  config.train.images_steps = 400
  config.train.images_finetune_steps = 100
  config.train.registration_steps = 200
  config.refine.steps = 60
  config.refine.passes = 4
  config.train.log_every = 50
  config.train.checkpoint_every = 200
  config.synthesize.num_samples = 32
  config.synthesize.batch_size = 8
  config.synthesize.unrefined = True

  ev = default_evaluate_config()
  ev.num_train = (4, 8)
  ev.seeds = (0, 1)
  ev.train_band = (0.2, 0.42)
  ev.test_band = (0.44, 0.64)
  ev.num_test_slices = 16
  ev.denoise_sigmas = (0.1,)
  ev.superres_factors = (2,)
  ev.steps = 160
  ev.batch_size = 4
  ev.segmentation_learning_rate = 2e-3
  ev.reconstruction_learning_rate = 5e-4
  ev.nsd_tolerance_mm = 4.0    # about one 64x64 pixel
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
  config.evaluate = ev

  if "measure" in presets:
    config.train.masks_steps = 20
    config.train.images_steps = 10
    config.train.images_finetune_steps = 10
    config.train.registration_steps = 20
    config.refine.steps = 10
    config.train.log_every = 5
    config.train.checkpoint_every = 1000
    config.synthesize.num_samples = 8
    ev.num_train = (4,)
    ev.seeds = (0,)
    ev.steps = 30
  return config
