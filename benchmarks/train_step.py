"""Compile time, step time and memory of every training step: float32 vs bfloat16, remat off vs on.

    python benchmarks/train_step.py                      # reduced: 2-D 64x64, all 24 rows
    python benchmarks/train_step.py --shapes 32x32x32    # reduced 3-D
    python benchmarks/train_step.py --size full          # 2-D 256x256, 3-D 192x192x160 (GPU)
    python benchmarks/train_step.py --size full --trace-only     # memory estimate, any machine
    python benchmarks/train_step.py --stages registration,refine-backprop --dtypes bfloat16 \
        --remat on --shapes 192x192x160
    python benchmarks/train_step.py --size full --trace-only --patches none,96x96x80,128x128

On the project's shared 2-core CPU the default run takes ~11 minutes (compilation: 10-50 s a
row), `--shapes 32x32x32` about an hour (3-D convolutions: 2-60 s a step), and
`--size full --trace-only` ~3 minutes. Full size is a GPU job: compile and run every row there.

Each step is built as the trainer builds it (`stages`, `fresh_state`, `step_context`, the
stage's phase factory) from `acis_jax.defaults.base_config()` with batch size 1 and the given
image shape (2-D: 2048 seeds, DESIGN.md's 2-D default); only `config.model.dtype`,
`config.model.remat`, `config.refine.mode` and `config.data.patch_shape` (`--patches`) vary.
Networks the trainer would load from earlier stages (`init_from`, `frozen`) are freshly
initialised instead. The batch is the
procedural chest phantom (labels above `num_classes - 1` merged into the last class).

Stages: `masks` (mask GAN + annotation generator), `images` (pix2pix on real pseudo-masks),
`images-finetune` (on generated pseudo-masks and labels), `registration`,
`refine-policy_gradient` and `refine-backprop`.

Columns:
- compile s: lowering and compiling `jax.jit(step, donate_argnums=0)`;
- step s: median of `--runs` steps after one warm-up step, each fed the state the last returned;
- peak GiB: `peak_bytes_in_use` of `jax.devices()[0].memory_stats()` (GPU/TPU only), each row
  in a fresh process: everything the step held, state and batch included;
- xla GiB: XLA's buffer assignment of the compiled step, arguments + outputs - donated aliases
  + temporaries. On the CPU it is blind to both options: XLA:CPU merges the recomputation back
  into the forward pass (remat saves nothing there) and computes bfloat16 convolutions in
  float32;
- trace GiB: a backend-free estimate from the step's jaxpr: its equations run in order, each
  value held from its creation to its last use (donated state released after its last use,
  every other input held throughout), nested jaxprs adding their own peak while they run.
  No fusion is modelled (XLA fuses elementwise chains: fewer buffers) and no convolution
  workspace (more), so it is an estimate, but one that sees remat and bfloat16. With every
  checkpoint inlined (what XLA:CPU compiles) it came to 1.3-1.45x XLA:CPU's assignment for
  `registration` and `refine-backprop` at 64x64x64, float32;
- x ref: the row's step time and memory (peak where measured, else trace) over the
  float32 / remat-off row of the same stage and shape, measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time

# Rows run in fresh processes to measure peak memory: none may grab the whole device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.extend as jex  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from acis_jax.data.phantom import chest_phantom  # noqa: E402
from acis_jax.data.preprocess import window_hu  # noqa: E402
from acis_jax.defaults import base_config  # noqa: E402
from acis_jax.train.networks import NETWORKS, abstract_params, init_networks  # noqa: E402
from acis_jax.train.stages import stages  # noqa: E402
from acis_jax.train.trainer import fresh_state, step_context  # noqa: E402

SIZES = {"reduced": ("64x64",), "full": ("256x256", "192x192x160")}
# benchmark stage -> (trainer stage, phase index, refine mode)
STAGES = {
    "masks": ("masks", 0, "policy_gradient"),
    "images": ("images", 0, "policy_gradient"),
    "images-finetune": ("images", 1, "policy_gradient"),
    "registration": ("registration", 0, "policy_gradient"),
    "refine-policy_gradient": ("refine", 0, "policy_gradient"),
    "refine-backprop": ("refine", 0, "backprop"),
}
REMAT = {"off": (False,), "on": (True,), "both": (False, True)}
GIB = 2.0 ** 30


def make_config(shape: tuple[int, ...], dtype: str = "float32", remat: bool = False,
                refine_mode: str = "policy_gradient", patch: tuple[int, ...] = ()):
  """The default config at `shape`, batch 1, with the settings under test."""
  config = base_config()
  config.data.image_shape = shape
  config.data.patch_shape = patch
  if len(shape) == 2:
    config.pseudomask.num_seeds = 2048
  config.train.batch_size = 1
  config.model.dtype = dtype
  config.model.remat = remat
  config.refine.mode = refine_mode
  return config


def _trainer_stage(config, name: str):
  return next(s for s in stages(config) if s.name == name)


def initial_arrays(shape: tuple[int, ...], stage_name: str, abstract: bool):
  """State and frozen parameters of a stage (the same for every dtype and remat setting).

  `fresh_state` without start parameters initialises every trained network as a first run
  would, instead of loading earlier stages from a work directory. `abstract`: shapes only.
  """
  def make():
    config = make_config(shape)
    stage = _trainer_stage(config, stage_name)
    state = fresh_state(stage, config, step_context(config, stage))
    _, frozen = init_networks(tuple(stage.frozen), config, config.seed)
    return state, frozen
  return jax.eval_shape(make) if abstract else make()


# Rows of one process share their stage's initial arrays (initialising compiles per shape).
cached_initial_arrays = functools.cache(initial_arrays)


def phantom_batch(config) -> dict:
  """A batch of one phantom, with labels and a second phantom as the registration pair."""
  shape = tuple(config.data.image_shape)
  hu, labels = chest_phantom(shape, seed=0)
  pair_hu, _ = chest_phantom(shape, seed=1)
  last_class = config.data.num_classes - 1
  return {"image": jnp.asarray(window_hu(hu)[None, ..., None]),
          "labels": jnp.asarray(np.minimum(labels, last_class)[None].astype(np.int32)),
          "pair_image": jnp.asarray(window_hu(pair_hu)[None, ..., None])}


def parameter_counts(shape: tuple[int, ...]) -> dict[str, int]:
  """Parameters per network, and of the mask generator's linear map to its base grid."""
  config = make_config(shape)
  counts = {}
  for name in NETWORKS:
    _, abstract = abstract_params(name, config)
    counts[name] = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract))
    if name == "mask_generator":
      counts["mask_generator.project"] = sum(
          math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract["project"]))
  return counts


def _nbytes(var) -> int:
  aval = var.aval
  return math.prod(aval.shape) * aval.dtype.itemsize if hasattr(aval, "dtype") else 0


def liveness_peak(jaxpr, released_inputs=()) -> int:
  """Peak bytes created while `jaxpr` runs, less the `released_inputs` freed by then.

  Inputs belong to the caller and stay held, except `released_inputs` (donated buffers),
  freed after their last use. Nested jaxprs (jit, remat, cond, loops) add their own peak
  while their equation runs.
  """
  last_use = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for var in eqn.invars:
      if isinstance(var, jex.core.Var):
        last_use[var] = i
  for var in jaxpr.outvars:
    if isinstance(var, jex.core.Var):
      last_use[var] = len(jaxpr.eqns)
  released = set(released_inputs)
  held = {}  # values created here and still alive -> bytes
  live = peak = 0
  for i, eqn in enumerate(jaxpr.eqns):
    created = {v: _nbytes(v) for v in eqn.outvars if not isinstance(v, jex.core.DropVar)}
    inner = max((liveness_peak(sub) for sub in jex.core.jaxprs_in_params(eqn.params)),
                default=0)
    peak = max(peak, live + max(inner, sum(created.values())))
    live += sum(created.values())
    held.update(created)
    for var in [*eqn.invars, *created]:  # values whose last use was this equation
      if not isinstance(var, jex.core.Var) or last_use.get(var, i) > i:
        continue
      if var in held:
        live -= held.pop(var)
      elif var in released:
        released.discard(var)
        live -= _nbytes(var)
  return peak


def trace_estimate(traced, num_donated: int) -> int:
  """Bytes of the step's inputs plus the liveness peak of its jaxpr (donated state released)."""
  jaxpr = traced.jaxpr.jaxpr
  inputs = sum(_nbytes(v) for v in jaxpr.invars)
  return inputs + liveness_peak(jaxpr, released_inputs=tuple(jaxpr.invars[:num_donated]))


def measure(stage_key: str, shape: tuple[int, ...], dtype: str, remat: bool, runs: int,
            trace_only: bool = False, fresh_process: bool = False,
            patch: tuple[int, ...] = ()) -> dict:
  """One row of the table (see the module docstring); `trace_only` skips compiling and running.

  In a `fresh_process` the initial arrays are made for this row alone (and donated), so
  that the peak memory holds no second copy of them.
  """
  stage_name, phase, refine_mode = STAGES[stage_key]
  config = make_config(shape, dtype, remat, refine_mode, patch)
  stage = _trainer_stage(config, stage_name)
  step = stage.phases[phase][1](step_context(config, stage))
  state, frozen = (initial_arrays if fresh_process else cached_initial_arrays)(
      shape, stage_name, trace_only)
  batch = phantom_batch(config)
  run_key = jax.random.key(config.seed)
  row = {"stage": stage_key, "shape": "x".join(map(str, shape)), "dtype": dtype,
         "remat": remat, "patch": "x".join(map(str, patch))}

  jitted = jax.jit(step, donate_argnums=0)
  traced = jitted.trace(state, frozen, batch, jax.random.fold_in(run_key, 0))
  row["trace_bytes"] = trace_estimate(traced, len(jax.tree.leaves(state)))
  if trace_only:
    return row
  start = time.perf_counter()
  compiled = traced.lower().compile()
  row["compile_s"] = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  row["xla_bytes"] = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                      - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)

  if not fresh_process:
    state = jax.tree.map(jnp.copy, state)  # the step donates it; the cached one stays
  times = []
  for i in range(runs + 1):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(
        compiled(state, frozen, batch, jax.random.fold_in(run_key, i)))
    times.append(time.perf_counter() - start)
  row["step_s"] = float(np.median(times[1:]))
  row["finite"] = all(bool(np.isfinite(v)) for v in jax.device_get(metrics).values())
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    row["peak_bytes"] = stats["peak_bytes_in_use"]
  return row


def measure_in_fresh_process(stage_key: str, shape: tuple[int, ...], dtype: str, remat: bool,
                             runs: int, patch: tuple[int, ...] = ()) -> dict:
  """`measure` in a child process, so that the peak memory is this row's alone."""
  args = [sys.executable, os.path.abspath(__file__), "--one",
          json.dumps([stage_key, list(shape), dtype, remat, runs, list(patch)])]
  done = subprocess.run(args, capture_output=True, text=True)
  if done.returncode:
    last = (done.stderr.strip().splitlines() or ["?"])[-1]
    return {"stage": stage_key, "shape": "x".join(map(str, shape)), "dtype": dtype,
            "remat": remat, "patch": "x".join(map(str, patch)), "error": last[:150]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def _gib(row: dict, field: str) -> str:
  return f"{row[field] / GIB:.3f}" if field in row else "-"


def _ratio(row: dict, ref: dict | None, field: str) -> str:
  if ref is None or field not in row or field not in ref:
    return "-"
  return f"{row[field] / ref[field]:.2f}"


def print_table(rows: list[dict]) -> None:
  refs = {(r["stage"], r["shape"]): r for r in rows
          if r["dtype"] == "float32" and not r["remat"] and not r["patch"] and "error" not in r}
  header = (f"{'stage':<23}{'shape':<12}{'patch':<10}{'dtype':<9}{'remat':<6}{'compile s':>10}"
            f"{'step s':>9}{'x ref':>7}{'peak GiB':>10}{'xla GiB':>9}{'trace GiB':>10}"
            f"{'x ref':>7}")
  print(header)
  print("-" * len(header))
  for row in rows:
    line = (f"{row['stage']:<23}{row['shape']:<12}{row['patch'] or '-':<10}{row['dtype']:<9}"
            f"{'on' if row['remat'] else 'off':<6}")
    if "error" in row:
      print(f"{line}failed: {row['error']}")
      continue
    ref = refs.get((row["stage"], row["shape"]))
    memory = "peak_bytes" if "peak_bytes" in row else "trace_bytes"
    compile_s = f"{row['compile_s']:.1f}" if "compile_s" in row else "-"
    step_s = f"{row['step_s']:.3f}" if "step_s" in row else "-"
    line += (f"{compile_s:>10}{step_s:>9}{_ratio(row, ref, 'step_s'):>7}"
             f"{_gib(row, 'peak_bytes'):>10}{_gib(row, 'xla_bytes'):>9}"
             f"{_gib(row, 'trace_bytes'):>10}{_ratio(row, ref, memory):>7}")
    print(line + ("  NON-FINITE METRICS" if row.get("finite") is False else ""))


def _shape(text: str) -> tuple[int, ...]:
  return tuple(int(n) for n in text.split("x"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="reduced")
  parser.add_argument("--shapes", help="comma-separated, e.g. 64x64,32x32x32 (overrides --size)")
  parser.add_argument("--stages", default=",".join(STAGES))
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--remat", choices=sorted(REMAT), default="both")
  parser.add_argument("--patches", default="none",
                      help="comma-separated training patch shapes (config.data.patch_shape), "
                           "e.g. none,96x96x80; each applies to the shapes of its rank")
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--trace-only", action="store_true",
                      help="only the trace estimate: no compiling, no running")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one row, printed as JSON
  args = parser.parse_args()
  if args.one:
    stage_key, shape, dtype, remat, runs, patch = json.loads(args.one)
    print(json.dumps(measure(stage_key, tuple(shape), dtype, remat, runs,
                             fresh_process=True, patch=tuple(patch))))
    return

  shapes = [_shape(s) for s in (args.shapes.split(",") if args.shapes else SIZES[args.size])]
  stage_keys = args.stages.split(",")
  unknown = sorted(set(stage_keys) - set(STAGES))
  if unknown:
    raise ValueError(f"unknown stages {unknown}; known: {list(STAGES)}")
  dtypes = args.dtypes.split(",")
  patches = [() if p == "none" else _shape(p) for p in args.patches.split(",")]
  fresh_process = not args.trace_only and jax.devices()[0].memory_stats() is not None
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch 1, "
        f"{'trace only' if args.trace_only else f'median of {args.runs} steps'}")
  for shape in shapes:
    print(f"parameters (M) at {'x'.join(map(str, shape))}: " + ", ".join(
        f"{name} {n / 1e6:.2f}" for name, n in parameter_counts(shape).items()))
  rows = []
  for shape in shapes:
    for stage_key in stage_keys:
      for patch in [p for p in patches if len(p) in (0, len(shape))]:
        for dtype in dtypes:
          for remat in REMAT[args.remat]:
            if fresh_process:
              rows.append(measure_in_fresh_process(stage_key, shape, dtype, remat, args.runs,
                                                   patch))
            else:
              rows.append(measure(stage_key, shape, dtype, remat, args.runs, args.trace_only,
                                  patch=patch))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  print_table(rows)


if __name__ == "__main__":
  main()
