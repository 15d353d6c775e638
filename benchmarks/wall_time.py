"""Wall time of the README's two commands, cold and with a warm JAX compilation cache.

    python benchmarks/wall_time.py                  # the demo, cold then warm
    python benchmarks/wall_time.py --runs demo,suite   # also the test suite, cold then warm
    python benchmarks/wall_time.py --runs suite     # the test suite only
    python benchmarks/wall_time.py --out DIR        # keep the work directories in DIR

Cold: a new, empty compilation cache folder. Warm: the same folder, as the cold run left it,
and a new work directory (so every stage trains again: only compilation is saved). Both
runs use the same command and seed. The sample CT must already be in the user cache (it is
fetched once, outside the timing). Measure on an idle machine: on the project's 2-core CPU
the demo is dominated by the steps of the `masks` stage, not by compilation.

Prints the wall time of each run, the warm/cold ratio, and each demo stage's steps per
second (from its metrics.jsonl) with the target of issue 10 beside it.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = ["-m", "acis_jax.main", f"--config={REPO / 'experiments' / 'demo.py'}"]
TARGETS_S = {"demo cold": 360, "demo warm": 240, "suite warm": 480}


def timed(command: list[str], env: dict, log: pathlib.Path) -> float:
  start = time.perf_counter()
  with open(log, "w") as out:
    code = subprocess.call(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
  seconds = time.perf_counter() - start
  if code:
    sys.exit(f"{' '.join(command)} failed with exit code {code}; see {log}")
  return seconds


def stage_rates(workdir: pathlib.Path) -> dict[str, float]:
  """Steps per second of each stage, from the last logged row of each (the trainer's rate
  over the steps since the previous log line, compilation excluded)."""
  rates = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    rates.setdefault(row["stage"], []).append(row["steps_per_s"])
  return {stage: sorted(r)[len(r) // 2] for stage, r in rates.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="demo", help="comma-separated: demo, suite")
  parser.add_argument("--out", default="", help="folder for the work directories and logs")
  args = parser.parse_args()
  out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="wall_time_"))
  out.mkdir(parents=True, exist_ok=True)
  cache = out / "jax_compilation_cache"
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache))

  runs = args.runs.split(",")
  results = {}
  for run in ("cold", "warm") if "demo" in runs else ():
    workdir = out / f"demo_{run}"
    results[f"demo {run}"] = timed([sys.executable, *DEMO, f"--workdir={workdir}"], env,
                                   out / f"demo_{run}.log")
    print(f"demo {run}: {results[f'demo {run}']:.0f} s", flush=True)
  if "suite" in runs:
    for run in ("cold", "warm"):
      results[f"suite {run}"] = timed([sys.executable, "-m", "pytest", "-q", "-p",
                                       "no:cacheprovider"], env, out / f"suite_{run}.log")
      print(f"suite {run}: {results[f'suite {run}']:.0f} s", flush=True)

  print("\n| run | wall s | min | target s |\n|---|---|---|---|")
  for name, seconds in results.items():
    print(f"| {name} | {seconds:.0f} | {seconds / 60:.1f} | {TARGETS_S.get(name, '')} |")
  for what in ("demo", "suite"):
    if f"{what} warm" in results:
      print(f"{what} warm/cold: {results[f'{what} warm'] / results[f'{what} cold']:.2f}")
  if "demo" in runs:
    print("\n| demo stage | steps/s (median of log lines) |\n|---|---|")
    for stage, rate in stage_rates(out / "demo_warm").items():
      print(f"| {stage} | {rate:.2f} |")
  print(f"\nlogs and work directories: {out}")


if __name__ == "__main__":
  main()
