"""The quality report of a set of synthetic pairs, against the real cases they imitate.

`mode = "quality"` (and the end of `synthesize`, with `synthesize.quality`) writes
SYNTHETIC/quality.json, quality.md and quality.png for each synthetic folder (ACIS, and ACIS-
when there is one). Measures, each for the synthetic pairs and for the real training cases:

- label-image consistency: a segmenter (the evaluation's U-Net, `evaluate.nets.unet`) trained
  on real cases only, applied to the synthetic images, Dice against the synthetic labels per
  class; next to the same segmenter's Dice on real cases it did not train on (two folds of the
  real cases, contiguous halves in name order, i.e. in axial order for slices; with one real
  case, on its training case, said so in the report). The segmenters are cached per set of real
  cases (WORKDIR/quality/).
- intensity realism: per class, the HU mean and standard deviation inside the label.
- texture: high-frequency energy, the mean squared Laplacian of the [0, 1] image.
- diversity and memorisation: the mean pairwise distance among synthetic and among real cases
  (images: RMSE in [0, 1]; labels: 1 - mean Dice), and each synthetic sample's distance to its
  nearest real case against the real cases' nearest-neighbour distances among themselves; a
  sample nearer to a real case than half the smallest real-real distance counts as a copy.
- anatomical plausibility: label islands (connected components per class beyond the largest,
  face connectivity), and the folding fraction and Jacobian range of the trained registration
  net's field from each sample onto its nearest real case (real cases: onto their nearest
  other real case).

When both ACIS and ACIS- folders are there (`synthesize.unrefined`), whose pair k share
their latents and dropout keys, the ACIS report adds what the refinement changed: eq. 3's
appearance uncertainty and the label consistency of each pair against its nearest real case
(T stochastic passes of the trained registration net), ACIS beside ACIS-, with one-sided
Wilcoxon signed-rank tests over the pairs.

Nothing here trains on synthetic data, and every random draw comes from `config.seed`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from scipy import ndimage

from acis_jax.data.preprocess import unwindow_hu
from acis_jax.data.sources import Example
from acis_jax.data.synthetic import load_synthetic, run_labels, synthetic_complete
from acis_jax.eval import downstream, metrics
from acis_jax.eval.nets import net_factory
from acis_jax.eval.statistics import wilcoxon_greater
from acis_jax.models.registration import register
from acis_jax.rng import stream_key
from acis_jax.spatial import appearance_uncertainty, label_consistency
from acis_jax.spatial.jacobian import jacobian_determinant
from acis_jax.synthesizers import pairs_title
from acis_jax.train.checkpoint import restore_state, save_state
from acis_jax.train.networks import abstract_params, load_network
from acis_jax.train.stages import stages
from acis_jax.train.trainer import load_training_data, run_fingerprint
from acis_jax.viz import save_figure
from acis_jax.workdir import (SYNTHETIC_FOLDERS, Workdir, read_json, write_json_atomically,
                              write_text_atomically)

# ---------------------------------------------------------------------------------------------
# Measures: pure functions of arrays (images `(n, *spatial)` in [0, 1], labels `(n, *spatial)`)


def high_frequency_energy(images: np.ndarray) -> float:
  """The mean over cases `(n, *spatial)` of `metrics.high_frequency_energy`."""
  return float(np.mean(metrics.high_frequency_energy(images, spatial_dims=images.ndim - 1)))


def class_intensities(images: np.ndarray, labels: np.ndarray, num_classes: int
                      ) -> dict[str, dict[str, float] | None]:
  """Per class 1..C-1, the HU mean and standard deviation of every voxel it covers (None when
  no case has the class)."""
  hu = unwindow_hu(images)
  out = {}
  for c in range(1, num_classes):
    inside = hu[labels == c]
    out[str(c)] = (None if inside.size == 0 else
                   {"mean": float(inside.mean()), "std": float(inside.std())})
  return out


def label_islands(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """`(n, C - 1)`: connected components of each class beyond its largest (0 when absent)."""
  return np.array([[max(ndimage.label(x == c)[1] - 1, 0) for c in range(1, num_classes)]
                   for x in labels])


def nearest(distances: np.ndarray, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(distance, index) of each row's nearest column (not itself when `exclude_self`)."""
  d = distances.copy()
  if exclude_self:
    np.fill_diagonal(d, np.inf)
  return d.min(1), d.argmin(1)


def mean_pairwise(distances: np.ndarray) -> float:
  """The mean off-diagonal entry of a square distance matrix (nan with fewer than 2)."""
  n = len(distances)
  return float("nan") if n < 2 else float(distances[~np.eye(n, dtype=bool)].mean())


# ---------------------------------------------------------------------------------------------
# The segmenter and the registration net


def _folds(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """(train, held-out) index pairs: two contiguous halves, or one case trained and scored on."""
  if n < 2:
    return [(np.arange(n), np.arange(n))]
  half = n // 2
  first, second = np.arange(half), np.arange(half, n)
  return [(first, second), (second, first)]


def _segmenter_factory(config):
  task = downstream.Task("segmentation", num_classes=config.data.num_classes)
  return task, net_factory("unet", task, dict(config.evaluate.nets.unet),
                           len(config.data.image_shape))


def _pad(config, x: np.ndarray) -> np.ndarray:
  """`x` `(n, *spatial, ...)` zero-padded at the far end of each spatial axis to a multiple of
  what the U-Net's down-samplings need (zero: air after the window, background in labels)."""
  factor = 2 ** len(config.evaluate.nets.unet.features)
  spatial = x.shape[1:1 + len(config.data.image_shape)]
  widths = [(0, 0)] + [(0, -s % factor) for s in spatial] + [(0, 0)] * (
      x.ndim - 1 - len(spatial))
  return np.pad(x, widths)


def _predict(config, model, task, images: np.ndarray) -> np.ndarray:
  """The segmenter's labels for `images` `(n, *spatial)`, on their own grid."""
  crop = (slice(None),) + tuple(slice(0, s) for s in images.shape[1:])
  return np.asarray(downstream.predict(model, task, _pad(config, images)[..., None]))[crop]


def segmenters(config, workdir: Workdir, images: np.ndarray, labels: np.ndarray
               ) -> list[downstream.Trained]:
  """One U-Net per fold of the real cases, trained or read from WORKDIR/quality/ when that
  holds segmenters of these very cases and settings."""
  task, factory = _segmenter_factory(config)
  settings = {"steps": config.quality.segmenter_steps, "seed": config.seed,
              "unet": json.loads(config.evaluate.nets.unet.to_json()),
              "learning_rate": config.evaluate.segmentation_learning_rate,
              "loss": downstream.LOSSES[True]}
  sha = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
  sha.update(np.ascontiguousarray(images).tobytes())
  sha.update(np.ascontiguousarray(labels).tobytes())
  key_path = os.path.join(workdir.quality, "segmenters.json")
  cached = os.path.exists(key_path) and read_json(key_path).get("digest") == sha.hexdigest()
  models = []
  for fold, (train, _) in enumerate(_folds(len(images))):
    path = os.path.join(workdir.quality, f"segmenter_{fold}")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))
    if cached:
      models.append(downstream.Trained(graphdef, restore_state(path, abstract), None))
      continue
    model = downstream.train_downstream(
        factory, task, _pad(config, images[train])[..., None], _pad(config, labels[train]),
        steps=config.quality.segmenter_steps, batch_size=min(4, len(train)),
        learning_rate=config.evaluate.segmentation_learning_rate, seed=config.seed + fold)
    save_state(path, model.params, force=True)
    models.append(model)
  if not cached:
    write_json_atomically(key_path, {"digest": sha.hexdigest(), "settings": settings})
  return models


def _per_class_dice(pred: np.ndarray, target: np.ndarray, num_classes: int
                    ) -> dict[str, float | None]:
  """Per class, the mean Dice over the cases whose target has the class."""
  scores = metrics.dice(pred, target, labels=range(1, num_classes),
                        spatial_dims=target.ndim - 1)
  out = {}
  for c in range(1, num_classes):
    has = (target == c).reshape(len(target), -1).any(1)
    out[str(c)] = float(np.asarray(scores[str(c)])[has].mean()) if has.any() else None
  return out


def consistency(config, models, images, labels, synthetic_images, synthetic_labels):
  """(Dice on real held-out cases, Dice on the synthetic pairs), per class, fold-averaged."""
  num_classes = config.data.num_classes
  task = downstream.Task("segmentation", num_classes=num_classes)
  real, synthetic = [], []
  for model, (_, held_out) in zip(models, _folds(len(images))):
    real.append(_per_class_dice(_predict(config, model, task, images[held_out]),
                                labels[held_out], num_classes))
    synthetic.append(_per_class_dice(_predict(config, model, task, synthetic_images),
                                     synthetic_labels, num_classes))
  average = lambda runs: {c: (None if any(r[c] is None for r in runs)
                              else float(np.mean([r[c] for r in runs]))) for c in runs[0]}
  return average(real), average(synthetic)


@jax.jit
def _jacobian_summary(disp):
  det = jacobian_determinant(disp)
  axes = tuple(range(1, det.ndim))
  return jnp.mean(det <= 0, axis=axes), jnp.min(det, axis=axes), jnp.max(det, axis=axes)


def registration_plausibility(net, moving: np.ndarray, fixed: np.ndarray) -> dict[str, float]:
  """Folding fraction and Jacobian range of `net`'s fields moving[k] -> fixed[k]."""
  folds, lows, highs = [], [], []
  for k in range(len(moving)):
    disp = net(jnp.asarray(moving[k:k + 1, ..., None]), jnp.asarray(fixed[k:k + 1, ..., None]))
    f, lo, hi = (np.asarray(v) for v in _jacobian_summary(disp))
    folds.append(f)
    lows.append(lo)
    highs.append(hi)
  return {"folding_fraction": float(np.mean(folds)), "jacobian_min": float(np.min(lows)),
          "jacobian_max": float(np.max(highs))}


def refinement_effect(passes, real_images, real_labels, refined, unrefined,
                      num_classes: int) -> dict[str, Any]:
  """What refinement changed, pair by pair: eq. 3 uncertainty (and label consistency) of
  each synthetic pair against its nearest real case, for `refined` and `unrefined`
  (`(images, labels)`, pair k of one drawn with the keys of pair k of the other).

  `passes(moving, fixed)` returns T stochastic displacements `(T, 1, *spatial, ndim)`.
  """
  out: dict[str, Any] = {}
  for arm, (images, labels) in (("acis", refined), ("acis-", unrefined)):
    if num_classes:
      _, near = nearest(metrics.label_distances(labels, real_labels, num_classes))
    else:
      _, near = nearest(metrics.image_distances(images, real_images))
    uncertainty, dice = [], []
    for k, j in enumerate(near):
      x, x_hat = real_images[j][None, ..., None], images[k][None, ..., None]
      forward, backward = passes(x, x_hat), passes(x_hat, x)
      uncertainty.append(float(appearance_uncertainty(x, x_hat, forward, backward)[1][0]))
      if num_classes:
        dice.append(float(label_consistency(real_labels[j][None], labels[k][None], forward,
                                            num_classes)[0]))
    out[arm] = {"uncertainty": uncertainty, "label_consistency": dice}
  result: dict[str, Any] = {"pairs": len(refined[0])}
  measures = [("uncertainty", "p_lower")] + ([("label_consistency", "p_higher")]
                                             if num_classes else [])
  for name, p in measures:
    after, before = out["acis"][name], out["acis-"][name]
    better, worse = (before, after) if p == "p_lower" else (after, before)
    result[name] = {"acis-": float(np.mean(before)), "acis": float(np.mean(after)),
                    p: wilcoxon_greater(better, worse)}
  return result


def refinement_markdown(result: dict) -> str:
  """The refinement section of ACIS's quality.md."""
  rows = [("eq. 3 appearance uncertainty (lower is better)", "uncertainty", "p_lower")]
  if "label_consistency" in result:
    rows.append(("label consistency after registration (higher is better)",
                 "label_consistency", "p_higher"))
  lines = ["", "## What the refinement changed", "",
           f"{result['pairs']} pairs of ACIS and ACIS- drawn with the same keys, each against "
           "its nearest real case; p: one-sided Wilcoxon signed-rank test over the pairs that "
           "ACIS is better.", "", "| measure | ACIS- | ACIS | p |", "|---|---|---|---|"]
  lines += [f"| {name} | {_fmt(result[key]['acis-'])} | {_fmt(result[key]['acis'])} | "
            f"{_fmt(result[key][p])} |" for name, key, p in rows]
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The report


def report(config, workdir: Workdir, real_images, real_labels, images, labels,
           registration=None) -> dict[str, Any]:
  """The measures of the module docstring for synthetic `images`, `labels` against the real
  ones, as one JSON-able dict (`registration`: the trained net, or None to skip it)."""
  num_classes = config.data.num_classes
  real_d = metrics.image_distances(real_images, real_images)
  syn_d = metrics.image_distances(images, real_images)
  several = len(real_images) > 1  # real-real distances need two real cases
  real_nn, real_nearest = nearest(real_d, exclude_self=True) if several else (np.zeros(0), None)
  syn_nn, syn_nearest = nearest(syn_d)
  smallest_real = float(real_nn.min()) if several else float("nan")
  out = {
      "cases": {"real": len(real_images), "synthetic": len(images)},
      "texture": {"real": high_frequency_energy(real_images),
                  "synthetic": high_frequency_energy(images)},
      "diversity": {"image_real": mean_pairwise(real_d),
                    "image_synthetic": mean_pairwise(metrics.image_distances(images, images))},
      "memorisation": {"nearest_real_median": float(np.median(syn_nn)),
                       "real_nearest_median": float(np.median(real_nn)) if several
                       else float("nan"),
                       "copies": int(np.sum(syn_nn < 0.5 * smallest_real))},
  }
  if num_classes:
    models = segmenters(config, workdir, real_images, real_labels)
    real_dice, syn_dice = consistency(config, models, real_images, real_labels, images, labels)
    out["consistency"] = {"real_held_out": real_dice, "synthetic": syn_dice,
                          "held_out": len(real_images) > 1}
    out["intensity"] = {"real": class_intensities(real_images, real_labels, num_classes),
                        "synthetic": class_intensities(images, labels, num_classes)}
    out["islands"] = {"real": label_islands(real_labels, num_classes).mean(0).tolist(),
                      "synthetic": label_islands(labels, num_classes).mean(0).tolist()}
    out["diversity"].update(
        labels_real=mean_pairwise(metrics.label_distances(real_labels, real_labels,
                                                          num_classes)),
        labels_synthetic=mean_pairwise(metrics.label_distances(labels, labels, num_classes)))
  if registration is not None and several:
    out["registration"] = {
        "real": registration_plausibility(registration, real_images, real_images[real_nearest]),
        "synthetic": registration_plausibility(registration, images, real_images[syn_nearest])}
  out["nearest_distances"] = {"real": real_nn.tolist(), "synthetic": syn_nn.tolist()}
  return out


def _fmt(value) -> str:
  return "-" if value is None or value != value else f"{value:.4g}"


def markdown(result: dict, label_names: dict[int, str], title: str) -> str:
  """quality.md: one row per measure, real beside synthetic."""
  rows = [("high-frequency energy (mean squared Laplacian)", result["texture"]["real"],
           result["texture"]["synthetic"]),
          ("diversity: mean pairwise image RMSE", result["diversity"]["image_real"],
           result["diversity"]["image_synthetic"]),
          ("nearest-real image RMSE, median (real: nearest other real)",
           result["memorisation"]["real_nearest_median"],
           result["memorisation"]["nearest_real_median"])]
  if "consistency" in result:
    rows.append(("diversity: mean pairwise label 1 - Dice", result["diversity"]["labels_real"],
                 result["diversity"]["labels_synthetic"]))
    for c, name in sorted(label_names.items()):
      if c == 0:
        continue
      k = str(c)
      real_i, syn_i = result["intensity"]["real"][k], result["intensity"]["synthetic"][k]
      rows += [(f"{name}: segmenter Dice", result["consistency"]["real_held_out"][k],
                result["consistency"]["synthetic"][k]),
               (f"{name}: HU mean", real_i and real_i["mean"], syn_i and syn_i["mean"]),
               (f"{name}: HU std", real_i and real_i["std"], syn_i and syn_i["std"]),
               (f"{name}: islands per case", result["islands"]["real"][c - 1],
                result["islands"]["synthetic"][c - 1])]
  for name in ("folding_fraction", "jacobian_min", "jacobian_max"):
    if "registration" in result:
      rows.append((f"registration onto the nearest real case: {name.replace('_', ' ')}",
                   result["registration"]["real"][name],
                   result["registration"]["synthetic"][name]))
  lines = [f"# {title}", "",
           f"{result['cases']['synthetic']} synthetic pairs against {result['cases']['real']} "
           f"real training cases; {result['memorisation']['copies']} synthetic sample(s) nearer "
           "to a real case than half the smallest real-real distance (copies).", ""]
  if "consistency" in result and not result["consistency"]["held_out"]:
    lines += ["One real case only: the segmenter's real Dice is on its own training case.", ""]
  lines += ["| measure | real | synthetic |", "|---|---|---|"]
  lines += [f"| {m} | {_fmt(r)} | {_fmt(s)} |" for m, r, s in rows]
  return "\n".join(lines) + "\n"


def figure(path: str, result: dict, title: str) -> None:
  """quality.png: nearest-real distances (copies sit at 0) and high-frequency energy."""
  fig, ax = plt.subplots(figsize=(6, 3.5))
  near = result["nearest_distances"]
  bins = np.linspace(0, max(near["real"] + near["synthetic"] + [1e-6]) * 1.05, 25)
  ax.hist(near["real"], bins=bins, alpha=0.6, label="real: nearest other real case")
  ax.hist(near["synthetic"], bins=bins, alpha=0.6, label="synthetic: nearest real case")
  ax.set_xlabel("image RMSE (intensities in [0, 1])")
  ax.set_ylabel("cases")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  save_figure(fig, path)


def write_reports(config, workdir: Workdir, paired_arms: bool = False,
                  examples: list[Example] | None = None) -> None:
  """quality.json, .md and .png in every complete synthetic folder of `workdir` (the caller
  holds its lock); the real cases are the run's training data, checked by fingerprint.
  `paired_arms`: the ACIS and ACIS- folders were just written together, pair k of both from
  the same keys, so ACIS's report also says what the refinement changed. `examples`: the
  real cases of the run when they are not those `config.data` names (`synthesize.run`)."""
  data = load_training_data(config, examples)
  workdir.require_trained(run_fingerprint(config, data))
  real_images = data.images[..., 0]
  real_labels = data.labels
  registration = passes = None
  if config.train.registration_steps and any(s.name == "registration" for s in stages(config)):
    graphdef = abstract_params("registration", config)[0]
    params = load_network(workdir, "registration", "registration", config)
    forward = jax.jit(lambda p, moving, fixed: nnx.merge(graphdef, p)(moving, fixed))
    registration = lambda moving, fixed: forward(params, moving, fixed)
    model, key = nnx.merge(graphdef, params), stream_key(config.seed, "quality/refinement")
    passes = lambda moving, fixed: register(model, moving, fixed, key, config.refine.passes)
  labels_named = run_labels(workdir.read_grid(), config.data.num_classes)
  count, labelled = config.synthesize.num_samples, config.data.num_classes > 0
  folders = {arm: workdir.synthetic(arm) for arm in SYNTHETIC_FOLDERS
             if synthetic_complete(workdir.synthetic(arm), count, labelled)}
  pairs = {arm: load_synthetic(folder, count, config) for arm, folder in folders.items()}
  for arm, folder in folders.items():
    images, labels = pairs[arm]
    result = report(config, workdir, real_images, real_labels, images[..., 0], labels,
                    registration)
    title = (f"{pairs_title(config.synthesizer, arm)}: synthetic pairs against the real "
             "training cases")
    text = markdown(result, labels_named, title)
    if arm == "acis" and paired_arms and passes is not None and len(folders) == 2:
      result["refinement"] = refinement_effect(
          passes, real_images, real_labels, (images[..., 0], labels),
          (pairs["acis-"][0][..., 0], pairs["acis-"][1]), config.data.num_classes)
      text += refinement_markdown(result["refinement"])
    write_json_atomically(os.path.join(folder, "quality.json"), result)
    write_text_atomically(os.path.join(folder, "quality.md"), text)
    figure(os.path.join(folder, "quality.png"), result, title)
    logging.info("[quality %s] high-frequency energy %.3g (real %.3g), %d copies; wrote %s/"
                 "quality.{json,md,png}", pairs_title(config.synthesizer, arm),
                 result["texture"]["synthetic"], result["texture"]["real"],
                 result["memorisation"]["copies"], folder)


def run(config, workdir: str) -> None:
  """mode = "quality"."""
  workdir = Workdir(workdir)
  with workdir.lock():
    write_reports(config, workdir)
