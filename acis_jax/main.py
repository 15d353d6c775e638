"""Entry point: `python -m acis_jax.main --config=experiments/NAME.py --workdir=DIR`.

Any config field can be overridden on the command line, e.g.
`--config.pseudomask.num_seeds=4096`. The config's `mode` picks the job.
"""

import importlib

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from acis_jax.train.parallel import maybe_initialize_distributed
from acis_jax.train.progress import show_progress_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])

# mode -> "module:function" taking (config, workdir). A comma-separated mode
# ("train,synthesize") runs several jobs in order.
JOBS = {
    "pseudomask": "acis_jax.jobs.pseudomask:run",
    "train": "acis_jax.train.trainer:train",
    "synthesize": "acis_jax.jobs.synthesize:run",
    "evaluate": "acis_jax.eval.protocol:run",
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  show_progress_logs()
  config = _CONFIG.value
  modes = config.mode.split(",")
  unknown = [m for m in modes if m not in JOBS]
  if unknown:
    raise app.UsageError(f"config.mode={config.mode!r}: unknown {unknown}; known modes: "
                         f"{sorted(JOBS)}")
  maybe_initialize_distributed(config)  # before anything asks JAX for devices
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  for mode in modes:
    module, function = JOBS[mode].split(":")
    getattr(importlib.import_module(module), function)(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
