"""Few-shot downstream evaluation on 2-D slices of the built-in sample chest CT (paper sec 3.1).

  python -m acis_jax.main --config=experiments/fewshot_ct2d.py --workdir=runs/fewshot_ct2d

What it does (mode "evaluate", acis_jax/eval/protocol.py): axial slices of the sample chest CT
(heart and aorta from TotalSegmentator's reference masks, left and right lung derived by
thresholding; acis_jax.data.sample), resized to 64x64 (about 5.5 x 3.9 mm pixels). The training
pool is 32 slices of the axial band 0.20-0.42 (lower heart), the test set 16 slices of the
disjoint band 0.44-0.64 (upper heart, aortic root): the test slices are never trained on, but
they come from the same patient, so the Wilcoxon p-values are optimistic (see protocol.py).
For n = 4 and 8 real training slices (spread evenly over the pool) and each seed a small
synthesizer is trained on those n slices only (WORKDIR/synth_n{n}_seed{seed}/) and writes 32
ACIS and 32 ACIS- pairs; then for 2 seeds each arm (baseline, +ACIS-, +ACIS, upper bound =
the 32 pool slices) trains
  * segmentation (4 labels: heart, aorta, left lung, right lung): U-Net and MedNeXt;
  * denoising (sigma 0.1) and super-resolution x2: ResNet and RED-CNN, plus ESRT for x2;
for the same number of steps, with tiny widths so that all of it fits the budget below.
Outputs: WORKDIR/eval/{results.csv,table.md,significance.csv,plots/}. Re-running resumes
(finished synthesizer stages, synthetic folders and trained arms are reused).

Measured on an idle 2-core CPU (budget: 45 minutes): 37.5 minutes in all.
  synthesizers: 2.8 min for n = 4 (masks 77 s, images 40 s, registration 13 s, refine 28 s,
    synthesize ACIS and ACIS- 7 s), 2.9 min for n = 8;
  downstream: 98 trainings (7 training sets: 3 arms x 2 n + the upper bound; x 2 seeds; x 7
    (task, net) pairs) of 360 steps at batch 4, 1890 s together (MedNeXt and ESRT ~40 s
    each, the others 8-15 s); evaluation, data and report under a minute.
  If your machine is slower, re-run the same command (it resumes) or shorten it with
  --config.evaluate.segmentation_steps=200 --config.evaluate.reconstruction_steps=200.
The result, and why synthetic data does not help in it, is in the README.
The run writes every trained arm as it goes, so an interrupted run loses at most one arm.

Presets: `measure` (the same pipeline with a few steps of everything, n = 4, one seed: it
checks the plumbing end to end on the real data in ~5 minutes; its table means nothing);
`smoke` (n = 2, two steps of everything, one net per task: what the test of
colab/03_evaluate.ipynb runs, about 90 s; its table means nothing either).
"""

from acis_jax.config_utils import parse_presets
from acis_jax.defaults import base_config, fewshot_2d_on_cpu, fewshot_smoke


def get_config(arg=None):
  presets = parse_presets(arg, known=("measure", "smoke"))
  config = fewshot_2d_on_cpu(base_config())
  config.data.sample = "chest"
  config.data.num_classes = 5     # background, heart, aorta, left lung, right lung
  config.data.num_slices = 32     # the training pool (the upper-bound arm)

  ev = config.evaluate
  ev.seeds = (0, 1)
  ev.train_band = (0.2, 0.42)
  ev.test_band = (0.44, 0.64)
  ev.num_test_slices = 16
  ev.superres_factors = (2,)
  ev.nsd_tolerance_mm = 4.0    # about one 64x64 pixel

  if "measure" in presets:
    config.train.masks_steps = 20
    config.train.annotation_finetune_steps = 5
    config.train.images_steps = 10
    config.train.images_finetune_steps = 10
    config.train.registration_steps = 20
    config.refine.steps = 10
    config.train.log_every = 5
    config.train.checkpoint_every = 1000
    config.synthesize.num_samples = 8
    ev.num_train = (4,)
    ev.seeds = (0,)
    ev.segmentation_steps = 30
    ev.reconstruction_steps = 30
  if "smoke" in presets:
    fewshot_smoke(config)
  return config
