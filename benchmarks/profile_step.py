"""Where one of `peers.py`'s training steps spends its time, operation by operation (ours only).

    python benchmarks/profile_step.py --net registration --shape 256x256:4
    python benchmarks/profile_step.py --net segmentation --shape 64x64x64:1 --top 40

Runs the step of `peers.py` under `jax.profiler` and sums XLA's per-operation events over
`--steps` steps; each row joins an event to its instruction in the optimized program (dumped
by XLA) for the output shape and the JAX operation it came from ("transpose(jvp())" marks the
backward pass). Fusions name their root operation only: read the dumped program (its folder is
printed) for the rest. Times under the profiler run a little longer than without it; compare
rows of one run, not runs (see README "Speed").
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile

WORK = pathlib.Path(tempfile.mkdtemp(prefix="profile_step_"))
# Before jax is imported: XLA reads its flags once.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    f"--xla_dump_to={WORK / 'hlo'}", "--xla_dump_hlo_as_text",
                                    "--xla_dump_hlo_pass_re=NONE"])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import peers  # noqa: E402

INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ")
OP_NAME = re.compile(r'op_name="([^"]*)"')
# Their events span the operations inside them, which have events of their own.
CONTAINER = re.compile(r" (while|conditional|call)\(")


def instructions(program: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (output shape, the JAX operation it came from), loops and calls
  left out."""
  out = {}
  for line in program.splitlines():
    match = INSTRUCTION.match(line)
    if match and not CONTAINER.search(line):
      op_name = OP_NAME.search(line)
      out[match.group(1)] = (match.group(2), op_name.group(1) if op_name else "")
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--net", choices=peers.NETS, default="registration")
  parser.add_argument("--shape", default="256x256:4", help="spatial shape:batch")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--top", type=int, default=30)
  args = parser.parse_args()
  (shape, batch_size), = peers.parse_shapes(args.shape)
  batch = {k: jnp.asarray(v) for k, v in peers.inputs(args.net, shape, batch_size).items()}
  train = peers.our_steps(args.net, len(shape), batch)[0]
  for _ in range(2):
    train()
  with jax.profiler.trace(str(WORK / "trace"), create_perfetto_trace=True):
    for _ in range(args.steps):
      train()
  trace, = (WORK / "trace").rglob("*.trace.json.gz")
  events = json.load(gzip.open(trace))
  events = events["traceEvents"] if isinstance(events, dict) else events
  program, = (WORK / "hlo").glob("*jit_train.cpu_after_optimizations.txt")
  known = instructions(program.read_text())
  total, count = collections.Counter(), collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event.get("name") in known:
      total[event["name"]] += event["dur"]
      count[event["name"]] += 1
  print(f"{args.net} {args.shape}: {sum(total.values()) / args.steps / 1e3:.1f} ms of XLA "
        f"operations per step (mean of {args.steps}); program and trace in {WORK}")
  print(f"{'ms':>8} {'calls':>5}  {'instruction':32} {'output':32} JAX operation")
  for name, micros in total.most_common(args.top):
    shape_text, op_name = known[name]
    print(f"{micros / args.steps / 1e3:8.2f} {count[name] // args.steps:5d}  {name[:32]:32} "
          f"{shape_text[:32]:32} {op_name[-70:]}")


if __name__ == "__main__":
  main()
