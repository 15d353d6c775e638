"""One process of a multi-host run for tests/train/test_multihost.py (not a test itself).

Trains the `masks` stage of experiments/smoke.py (label-free) with plain SGD over every
device of every process, then reads the exported networks back and writes them
to `OUT/params_<process>.npz`. With `--stop_after=K` it stops right after the
checkpoint of step K is committed (exit code 3), as a preempted job would.

  python tests/train/multihost_worker.py --workdir=W --out=O --steps=4 \
      [--coordinator=127.0.0.1:PORT --num_processes=2 --process_id=I] [--stop_after=K]
"""

import argparse
import os
import sys

from absl import logging
import jax
import numpy as np
import optax

from acis_jax.config_utils import load_config_file
from acis_jax.train import parallel, trainer
from acis_jax.train.networks import load_network
from acis_jax.train.stage_checkpoints import StageCheckpoints
from acis_jax.train.stages import stages
from acis_jax.workdir import Workdir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STOPPED = 3  # exit code after --stop_after


class Stopped(Exception):
  pass


def run_config(steps: int, batch_size: int = 4):
  """experiments/smoke.py, label-free (half the compile time of the labelled step)."""
  config = load_config_file(os.path.join(REPO, "experiments", "smoke.py"))
  config.data.num_classes = 0
  config.train.batch_size = batch_size
  config.train.masks_steps = steps
  config.train.checkpoint_every = 2
  config.train.log_every = 1
  return config


def exported_networks(workdir: str, config) -> dict[str, np.ndarray]:
  """The networks the `masks` stage exported, as host arrays by key path."""
  params = {name: load_network(Workdir(workdir), "masks", name, config)
            for name in stages(config)[0].trained}
  return {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def stop_after(step: int) -> None:
  """Makes the run end once the checkpoint of `step` is on disk."""
  save = StageCheckpoints.save

  def save_then_stop(self, done, state):
    save(self, done, state)
    if done == step:
      self.close()
      raise Stopped

  StageCheckpoints.save = save_then_stop


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, required=True)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--stop_after", type=int, default=0)
  parser.add_argument("--coordinator", default="")
  parser.add_argument("--num_processes", type=int, default=-1)
  parser.add_argument("--process_id", type=int, default=-1)
  args = parser.parse_args()
  logging.set_verbosity(logging.INFO)  # the trainer's "resuming from step" line

  config = run_config(args.steps, args.batch_size)
  if args.coordinator:
    config.distributed.enabled = True
    config.distributed.coordinator_address = args.coordinator
    config.distributed.num_processes = args.num_processes
    config.distributed.process_id = args.process_id
  parallel.maybe_initialize_distributed(config)  # before anything asks JAX for devices

  # Plain SGD: Adam's first steps are lr * sign(gradient), which would turn the
  # float noise of a different all-reduce order into full-size differences.
  trainer.optimizer = lambda name, stage, config: optax.sgd(1e-2)
  if args.stop_after:
    stop_after(args.stop_after)

  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.train.batch_size, mesh)
  try:
    trainer.run_stage(stages(config)[0], config, Workdir(args.workdir),
                      trainer.load_training_data(config), mesh)
  except Stopped:
    return STOPPED
  flat = exported_networks(args.workdir, config)  # every process reads them back
  os.makedirs(args.out, exist_ok=True)
  np.savez(os.path.join(args.out, f"params_{jax.process_index()}.npz"), **flat)
  return 0


if __name__ == "__main__":
  sys.exit(main())
