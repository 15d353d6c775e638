"""Entry point: `python -m acis_jax.main --config=experiments/NAME.py --workdir=DIR`, or the
`acis-jax` command with the same flags.

Any config field can be overridden on the command line, e.g.
`--config.pseudomask.num_seeds=4096`. The config's `mode` picks the job.
"""

import importlib
import os
import shutil
import subprocess
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from acis_jax.data.sample import cache_root
from acis_jax.defaults import check_config, resolve_config
from acis_jax.stops import Stopped, stops_raise
from acis_jax.train.parallel import maybe_initialize_distributed
from acis_jax.train.progress import show_progress_logs
from acis_jax.workdir import DISK_ERRORS

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs and checkpoints.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "auto",
    "JAX's persistent compilation cache, so that a second run does not compile again: "
    "'auto' (CACHE/jax_compilation, CACHE as for the sample data), a directory, or 'off'.")
flags.mark_flags_as_required(["config", "workdir"])

# mode -> "module:function" taking (config, workdir). A comma-separated mode
# ("train,synthesize") runs several jobs in order.
JOBS = {
    "pseudomask": "acis_jax.jobs.pseudomask:run",
    "train": "acis_jax.train.trainer:train",
    "synthesize": "acis_jax.jobs.synthesize:run",
    "quality": "acis_jax.eval.quality:run",
    "export": "acis_jax.jobs.export:run",
    "evaluate": "acis_jax.eval.protocol:run",
}


def enable_compilation_cache(setting: str) -> None:
  """Turns on JAX's persistent compilation cache (`--compilation_cache`)."""
  if setting == "off":
    return
  if setting != "auto":
    jax.config.update("jax_compilation_cache_dir", setting)
  elif not jax.config.jax_compilation_cache_dir:  # else JAX_COMPILATION_CACHE_DIR chose it
    jax.config.update("jax_compilation_cache_dir", str(cache_root() / "jax_compilation"))
  # Small programs too: the steps of a CPU run compile in a few seconds each.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def gpus_unused(backend: str | None = None, platforms: str | None = None) -> str | None:
  """A warning when JAX runs on the CPU while `nvidia-smi` lists GPUs (the CPU build of jax,
  which `pip install -e .` installs), unless the CPU was asked for (JAX_PLATFORMS=cpu).
  `backend`, `platforms`: JAX's, unless given."""
  backend = jax.default_backend() if backend is None else backend
  platforms = (jax.config.jax_platforms or "") if platforms is None else platforms
  if backend != "cpu" or "cpu" in platforms:
    return None
  smi = shutil.which("nvidia-smi")
  if smi is None:
    return None
  try:
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  gpus = [line for line in listed.splitlines() if line.startswith("GPU ")]
  if not gpus:
    return None
  return (f"JAX runs on the CPU, but nvidia-smi lists {len(gpus)} GPU(s) ({gpus[0]}): this is "
          "the CPU build of jax. Install the CUDA one: pip install -e \".[cuda12]\" (or "
          "\".[cuda13]\" for a CUDA 13 driver); JAX_PLATFORMS=cpu silences this warning")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  show_progress_logs()
  config = _CONFIG.value
  try:
    resolve_config(config)
    check_config(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  modes = config.mode.split(",")
  unknown = [m for m in modes if m not in JOBS]
  if unknown:
    raise app.UsageError(f"config.mode={config.mode!r}: unknown {unknown}; known modes: "
                         f"{sorted(JOBS)}")
  enable_compilation_cache(_COMPILATION_CACHE.value)
  maybe_initialize_distributed(config)  # before anything asks JAX for devices
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  unused = gpus_unused()
  if unused:
    logging.warning("%s", unused)
  with stops_raise():
    try:
      for mode in modes:
        module, function = JOBS[mode].split(":")
        getattr(importlib.import_module(module), function)(config, _WORKDIR.value)
    except Stopped as stop:
      logging.error("%s", stop)
      sys.exit(stop.exit_code)
    except OSError as error:
      if error.errno not in DISK_ERRORS:
        raise
      # Ours name the path and what was being written; others have the path in `filename`.
      logging.error("%s", f"{error.filename}: {error.strerror}" if error.filename
                    else error.strerror)
      # Without the interpreter's shutdown: orbax's threads may still hold callbacks of the
      # failed save, which print tracebacks ("Event loop is closed") while it shuts down.
      logging.flush()
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(1)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a config override that names no field said in one line (with
  ml_collections' suggestion) instead of a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    cause = e
    while cause.args and isinstance(cause.args[0], BaseException):  # AttributeError(KeyError)
      cause = cause.args[0]
    detail = str(cause.args[0] if cause.args else cause)
    name, _, suggestion = detail.partition("\n")
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    culprit = next((a for a in overrides if f".{name.strip(chr(39))}" in a.split("=")[0]),
                   " ".join(overrides))
    sys.exit(f"FATAL Flags parsing error: {culprit}: the config has no field {name}. "
             f"{suggestion}".rstrip())


def run() -> None:
  """The `acis-jax` command."""
  jax.config.config_with_absl()  # JAX's own flags: --jax_platforms=cpu, --jax_debug_nans, ...
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
