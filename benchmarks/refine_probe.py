"""Refinement settings side by side on one trained synthesizer: what each does to eq. 3, the
label consistency and the realism figures of the quality report.

    python benchmarks/refine_probe.py --config=experiments/fewshot_chest2d.py:swap \\
        --workdir=runs/refine_probe --n=4 --seed=0 \\
        --setting=control:refine.uncertainty_weight=0,refine.label_weight=0 \\
        --setting=default: --setting=anchor:refine.intensity_weight=10

The evaluation's synthesizer of n real cases and `--seed` (WORKDIR/synth_n{n}_seed{seed}/,
`acis_jax.eval.arms`; trained first if it is not there, as the evaluation trains it) gives
the stages the refinement starts from. Each `--setting=NAME:FIELD=VALUE,...` reruns the
refinement from them, in memory, with those config fields changed and the run's own step keys
and batches; then draws `--pairs` pairs with the synthesis keys (pair k of every setting and
of ACIS-, the generators before refinement, from the same keys) and measures them as the
quality report does (`acis_jax.eval.quality`), against the n real cases. The first setting is
the reference of the last column: each other setting's uncertainty and consistency against
it, pair by pair (one-sided Wilcoxon). Prints a markdown table and writes
WORKDIR/refine_probe_n{n}_seed{seed}.json.
"""

from __future__ import annotations

import argparse
import ast
import os
import time

from absl import logging
import jax
import numpy as np
from flax import nnx

from acis_jax.config_utils import load_config_file
from acis_jax.eval import arms, quality, splits
from acis_jax.jobs.synthesize import drawn_batches, make_sampler
from acis_jax.models.registration import register
from acis_jax.rng import step_key, stream_key
from acis_jax.train import refine, trainer
from acis_jax.train.networks import abstract_params, load_network
from acis_jax.train.stages import REFINE, generator_sources, stages
from acis_jax.workdir import Workdir, write_json_atomically


def parse_setting(text: str) -> tuple[str, dict]:
  """`NAME:FIELD=VALUE,...` -> (name, {field: value}); values are Python literals."""
  name, _, fields = text.partition(":")
  changes = {}
  for item in filter(None, fields.split(",")):
    field, _, value = item.partition("=")
    changes[field] = ast.literal_eval(value)
  return name, changes


def with_changes(config, changes: dict):
  config = config.copy_and_resolve_references()
  for field, value in changes.items():
    *path, last = field.split(".")
    node = config
    for part in path:
      node = node[part]
    node[last] = type(node[last])(value)
  return config


def refined_generators(config, root: Workdir, data) -> dict:
  """The refinement stage run in memory from the trained stages of `root`, step for step as
  `trainer.train` runs it; its generators' parameters."""
  stage = next(s for s in stages(config) if s.name == REFINE)
  ctx = trainer.step_context(config, stage)
  start = {n: load_network(root, s, n, config) for n, s in stage.init_from.items()}
  state = trainer.fresh_state(stage, config, ctx, start)
  frozen = {n: load_network(root, s, n, config) for n, s in stage.frozen.items()}
  step = jax.jit(refine.make_refine_step(ctx), donate_argnums=0)
  for i in range(stage.total_steps):
    batch = trainer.sample_batch(data, config, REFINE, i, stage.pairs)
    state, metrics = step(state, frozen, batch, step_key(config.seed, f"train/{REFINE}", i))
  logging.info("[probe] last step: %s", {k: round(float(v), 4) for k, v in metrics.items()})
  return state.params


def draw_pairs(config, params: dict, count: int):
  """`(images (count, *spatial), labels)` drawn as `synthesize` draws them."""
  drawn = [batch for _, batch in drawn_batches(config, make_sampler(config), params, count)]
  return (np.concatenate([x[..., 0] for _, _, x in drawn]),
          np.concatenate([y for _, y, _ in drawn]))


def row(name: str, result: dict, effect: dict | None, against: dict | None,
        classes: list[str]) -> str:
  def cell(measure):
    if effect is None:
      return ""
    e = effect[measure]
    p = e.get("p_lower", e.get("p_higher"))
    return f"{e['acis-']:.4g} -> {e['acis']:.4g} ({p:.2g})"

  def versus(measure):
    if against is None:
      return ""
    e = against[measure]
    return f"{e['acis']:.4g} ({e.get('p_lower', e.get('p_higher')):.2g})"

  side = "real" if name == "real slices" else "synthetic"
  intensity = result["intensity"][side]
  hu = " / ".join("-" if intensity[c] is None else f"{intensity[c]['mean']:.0f}" for c in classes)
  spread = " / ".join("-" if intensity[c] is None else f"{intensity[c]['std']:.0f}"
                      for c in classes)
  islands = " / ".join(f"{v:.2f}" for v in result["islands"][side])
  dice_source = result["consistency"]["real_held_out" if side == "real" else "synthetic"]
  dice = " / ".join(f"{dice_source[c]:.2f}" if dice_source.get(c) is not None else "-"
                    for c in classes)
  diversity = result["diversity"]
  return (f"| {name} | {cell('uncertainty')} | {cell('label_consistency')} | "
          f"{versus('uncertainty')} | {versus('label_consistency')} | "
          f"{result['texture'][side]:.4f} | {diversity['image_' + side]:.3f} | "
          f"{diversity['labels_' + side]:.3f} | {hu} | {spread} | {islands} | {dice} |")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="FILE.py[:preset]")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--n", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--pairs", type=int, default=64)
  parser.add_argument("--setting", action="append", required=True,
                      help="NAME:FIELD=VALUE,... (repeat; the first is the reference)")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  path, _, preset = args.config.partition(":")
  base = load_config_file(path, preset or None)
  settings = [parse_setting(s) for s in args.setting]
  examples = splits.few_shot_subset(splits.load_split(base).pool, args.n)
  config = arms.synthesizer_config(base, args.seed, "acis", ("acis", "acis-"))
  root = arms.synthesizer_dir(base, args.workdir, args.n, args.seed, "acis")
  trainer.train(config, root.root, examples=examples)
  data = trainer.load_training_data(config, examples)
  real_images, real_labels = data.images[..., 0], data.labels
  num_classes = config.data.num_classes
  classes = [str(c) for c in range(1, num_classes)]

  graphdef = abstract_params("registration", config)[0]
  model = nnx.merge(graphdef, load_network(root, "registration", "registration", config))
  passes_key = stream_key(config.seed, "quality/refinement")
  passes = lambda moving, fixed: register(model, moving, fixed, passes_key,
                                          config.refine.passes)

  unrefined = {n: load_network(root, s, n, config)
               for n, s in generator_sources(config, refined=False).items()}
  pairs = {"ACIS-": draw_pairs(config, unrefined, args.pairs)}
  seconds = {}
  for name, changes in settings:
    variant = with_changes(config, changes)
    began = time.perf_counter()
    params = refined_generators(variant, root, data)
    seconds[name] = time.perf_counter() - began
    pairs[name] = draw_pairs(variant, {n: params.get(n, p) for n, p in unrefined.items()},
                             args.pairs)
    logging.info("[probe] %s refined in %.0f s", name, seconds[name])

  reference = settings[0][0]
  out = {"settings": dict(settings), "seconds": seconds, "results": {}}
  lines = [f"{args.pairs} pairs per setting, n = {args.n}, seed {args.seed}; columns 2-3: "
           "ACIS- -> setting (one-sided Wilcoxon p); 4-5: the setting against "
           f"{reference} (p); HU and islands per class {', '.join(classes)}", "",
           "| setting | uncertainty | label consistency | uncertainty vs ref. | consistency vs "
           "ref. | high-freq. energy | image diversity | label diversity | HU mean | HU std | "
           "islands per case | segmenter Dice |", "|" + "---|" * 12]
  for name, (images, labels) in pairs.items():
    result = quality.report(config, root, real_images, real_labels, images, labels)
    effect = against = None
    if name != "ACIS-":
      effect = quality.refinement_effect(passes, real_images, real_labels, (images, labels),
                                         pairs["ACIS-"], num_classes)
      if name != reference:
        against = quality.refinement_effect(passes, real_images, real_labels,
                                            (images, labels), pairs[reference], num_classes)
    if name == "ACIS-":
      lines.append(row("real slices", result, None, None, classes))
    lines.append(row(name, result, effect, against, classes))
    result.pop("nearest_distances")
    out["results"][name] = {"quality": result, "against_unrefined": effect,
                            "against_reference": against}
  table = "\n".join(lines)
  print(table)
  out["table"] = table
  write_json_atomically(os.path.join(args.workdir,
                                     f"refine_probe_n{args.n}_seed{args.seed}.json"), out)


if __name__ == "__main__":
  main()
