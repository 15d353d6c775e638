"""The stages of an ACIS run, in order: which networks each trains and reads, and its steps.

This table is the one statement of which stage makes which network. Everything else is
derived from it: the networks a stage reads frozen and which stage made each
(`Stage.frozen`), the earlier result a trained network continues from
(`Stage.init_from`), and which stage's result `synthesize` samples from (`generator_sources`).

  masks         mask generator vs WGAN-GP critic; annotation generator (sec 2.2), then the
                annotation generator alone, also on generated pseudo-masks
  images        pix2pix image generator, then fine-tuning on generated conditions (sec 2.2)
  registration  the registration net on pairs of real images (sec 2.3)
  refine        annotation and image generators refined by the registration reward (sec 2.3),
                the image discriminator trained alongside

The comparison synthesizers without pseudo-masks have tables of their own, in their modules
(`acis_jax.synthesizers.joint_gan`, `.labels_first`, `.synthseg`), with the same generator
budget as ACIS's (`generator_budget`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from acis_jax.synthesizers import comparison_module, uses_pseudo_masks
from acis_jax.train import refine, steps

# The generators a synthesizer samples from (`acis_jax.train.generation`): ACIS's chain in
# order, then the comparison synthesizers'.
GENERATORS = ("mask_generator", "annotation_generator", "image_generator", "label_generator",
              "joint_generator")
REFINE = "refine"


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage. `phases`: `(steps, step factory)` run one after the other; `reads`: networks
  it reads frozen; `continues`: trained networks that start from their latest earlier
  result instead of fresh parameters; `pairs`: batches also carry a second image;
  `extras`: scalars the steps carry in the state besides the networks, zero at the start."""

  name: str
  trained: tuple[str, ...]
  phases: tuple[tuple[int, Callable], ...]
  reads: tuple[str, ...] = ()
  continues: tuple[str, ...] = ()
  pairs: bool = False
  extras: tuple[str, ...] = ()
  frozen: dict[str, str] = dataclasses.field(default_factory=dict)     # derived
  init_from: dict[str, str] = dataclasses.field(default_factory=dict)  # derived

  @property
  def total_steps(self) -> int:
    return sum(n for n, _ in self.phases)


def generator_budget(config) -> int:
  """The steps of ACIS's generator stages (every stage but registration): what every trained
  comparison synthesizer gets."""
  train = config.train
  return (train.masks_steps + train.annotation_finetune_steps + train.images_steps
          + train.images_finetune_steps + config.refine.steps)


def _acis_table(config) -> list[Stage]:
  """ACIS's stages (module docstring; label-free runs have no annotation generator)."""
  train = config.train
  labelled = config.data.num_classes > 0
  annotation = ("annotation_generator",) if labelled else ()
  return [
      Stage("masks", ("mask_generator", "mask_critic") + annotation
            + (("label_discriminator",) if labelled else ()),
            ((train.masks_steps, steps.make_masks_step),)
            + (((train.annotation_finetune_steps,
                 functools.partial(steps.make_masks_step, finetune=True)),) if labelled else ())),
      Stage("images", ("image_generator", "image_discriminator"),
            ((train.images_steps, functools.partial(steps.make_images_step, finetune=False)),
             (train.images_finetune_steps,
              functools.partial(steps.make_images_step, finetune=True))),
            reads=("mask_generator",) + annotation),
      Stage("registration", ("registration",),
            ((train.registration_steps, steps.make_registration_step),), pairs=True),
      Stage(REFINE, ("image_generator", "image_discriminator") + annotation,
            ((config.refine.steps, refine.make_refine_step),),
            reads=("mask_generator", "registration"),
            continues=("image_generator", "image_discriminator") + annotation,
            extras=refine.EXTRAS),
  ]


def stages(config) -> list[Stage]:
  """The stages of a run of `config`, in order."""
  table = (_acis_table(config) if uses_pseudo_masks(config.synthesizer)
           else comparison_module(config.synthesizer).stages(config))
  derived = []
  for index, stage in enumerate(table):
    earlier = table[:index]
    derived.append(dataclasses.replace(
        stage, frozen={n: made_by(earlier, n) for n in stage.reads},
        init_from={n: made_by(earlier, n) for n in stage.continues}))
  return derived


def made_by(table: list[Stage], network: str) -> str:
  """The last stage of `table` that trains `network`."""
  for stage in reversed(table):
    if network in stage.trained:
      return stage.name
  raise ValueError(f"no stage of {[s.name for s in table]} trains {network!r}")


def generator_sources(config, refined: bool) -> dict[str, str]:
  """`generator -> stage` whose result `synthesize` samples: the last stage that trained it
  (ACIS), or the last before refinement (ACIS-, `refined=False`)."""
  table = stages(config)
  if not refined:
    table = [s for s in table if s.name != REFINE]
  trained = {n for s in table for n in s.trained}
  return {n: made_by(table, n) for n in GENERATORS if n in trained}
