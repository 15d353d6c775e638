"""Reports of the evaluation protocol: results.csv, the paper's tables in markdown, and plots.

Rows. A result row is a dict with the keys `COLUMNS`: arm, n (real training cases), net, task,
seed, case (a held-out test case), metric and value; `acis_jax.eval.protocol` makes them.

Tables (`markdown_tables`), laid out like the paper's Tables 1 and 2: one table per task, one
line per (n, net), and for each arm the task's two headline metrics (`HEADLINES`:
segmentation DSC in % and MSD in mm, reconstruction PSNR in dB and SSIM), each the mean over
the test cases and seeds.
  * Bold: the best mean among the compared arms, i.e. every arm but the upper bound, which is a
    reference and not a competitor (the paper bolds "the synthesis method yielding the best
    performance"). Ties are all bold.
  * '*' (written `\\*`): on the ACIS cell when a one-sided Wilcoxon signed-rank test
    (`acis_jax.eval.statistics.wilcoxon_greater`) says ACIS is better than the next best
    compared arm (the best mean among the others) with p < alpha. Pairs are test cases matched
    by name; a case's value is its mean over seeds, because seeds repeat one training on the
    same cases rather than add cases. "Better" is larger, or smaller for distances (MSD).
  * The upper bound does not depend on n: its one value per net appears on every n line.
The p-values behind every '*' decision are written to significance.csv as well.

Plots (`plot_metric_vs_n`): per task and headline metric, one panel per net with the metric
against n, one line per arm (mean over cases and seeds; error bars: the standard deviation over
seeds of the per-seed means), and the upper bound as a dashed horizontal line.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from acis_jax.eval.statistics import wilcoxon_greater  # noqa: E402

COLUMNS = ("arm", "n", "net", "task", "seed", "case", "metric", "value")
# Every arm of the protocol, in the paper's column order.
ARM_TITLES = {"baseline": "Baseline", "joint_gan": "StyleGAN-like",
              "labels_first": "MedGen3D-like", "superpixel": "V2UM2I-like",
              "synthseg": "SynthSeg-style", "acis-": "ACIS-", "acis": "ACIS",
              "acis-real": "ACIS from real", "upper": "Upper bound"}
REFERENCE_ARM = "upper"   # shown, never bold, never tested against
TESTED_ARM = "acis"       # the arm that earns a '*'


@dataclasses.dataclass(frozen=True)
class Headline:
  """A metric shown in the table: its row key, title, direction, display scale and digits."""
  key: str
  title: str
  higher_is_better: bool
  scale: float = 1.0
  decimals: int = 2

  def format(self, value: float) -> str:
    return f"{value * self.scale:.{self.decimals}f}"


HEADLINES = {
    "segmentation": (Headline("dice/mean", "DSC (%)", True, 100.0, 2),
                     Headline("msd/mean", "MSD (mm)", False, 1.0, 2)),
    "reconstruction": (Headline("psnr", "PSNR (dB)", True, 1.0, 2),
                       Headline("ssim", "SSIM", True, 1.0, 3)),
}


def headlines(task: str) -> tuple[Headline, ...]:
  """The headline metrics of a task label ("segmentation", "denoise_0.1", ...)."""
  return HEADLINES["segmentation" if task == "segmentation" else "reconstruction"]


# ---------------------------------------------------------------------------------------------
# results.csv


def write_results_csv(path: str, rows: Iterable[Mapping]) -> None:
  """Writes rows (dicts with keys `COLUMNS`) as CSV with a header line."""
  rows = list(rows)
  for i, row in enumerate(rows):
    if set(row) != set(COLUMNS):
      raise ValueError(f"row {i} has keys {sorted(row)}, expected {list(COLUMNS)}")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def read_results_csv(path: str) -> list[dict]:
  """Rows of a results.csv, with n and seed as int and value as float."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    if tuple(reader.fieldnames or ()) != COLUMNS:
      raise ValueError(f"{path}: header {reader.fieldnames}, expected {list(COLUMNS)}")
    return [dict(row, n=int(row["n"]), seed=int(row["seed"]), value=float(row["value"]))
            for row in reader]


# ---------------------------------------------------------------------------------------------
# Aggregation and the significance rule


def _ordered(values: Iterable) -> list:
  """Distinct values in order of first appearance."""
  return list(dict.fromkeys(values))


def means_by(group: str, rows: Iterable[Mapping], *, arm: str, net: str, task: str,
             metric: str, n: int | None = None) -> dict:
  """`row[group] -> mean` of one metric of one arm (any n when `n` is None): per "case" the
  mean over seeds, per "seed" the mean over cases."""
  values = defaultdict(list)
  for row in rows:
    if (row["arm"], row["net"], row["task"], row["metric"]) == (arm, net, task, metric) and (
        n is None or row["n"] == n):
      values[row[group]].append(float(row["value"]))
  return {key: float(np.mean(v)) for key, v in values.items()}


def case_means(rows: Iterable[Mapping], **selection) -> dict[str, float]:
  """`case -> mean over seeds` of one metric of one arm (`means_by`'s selection)."""
  return means_by("case", rows, **selection)


def seed_spread(rows: Iterable[Mapping], **selection) -> float | None:
  """The standard deviation (ddof 1) over seeds of the per-seed means over the test cases;
  None with one seed."""
  per_seed = list(means_by("seed", rows, **selection).values())
  return float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None


def one_sided_p(tested: Mapping[str, float], other: Mapping[str, float],
                higher_is_better: bool) -> float:
  """p-value that `tested` is better than `other`, Wilcoxon signed-rank over paired cases.

  Args:
    tested, other: `case -> value` over the same test cases.
    higher_is_better: the metric's direction (False for distances).
  """
  if set(tested) != set(other):
    raise ValueError(f"the arms were scored on different test cases: only in one "
                     f"{sorted(set(tested) ^ set(other))}")
  cases = sorted(tested)
  a = np.array([tested[c] for c in cases])
  b = np.array([other[c] for c in cases])
  return wilcoxon_greater(a, b) if higher_is_better else wilcoxon_greater(b, a)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """The marks of one (n, net, metric) line.

  Attributes:
    means: `arm -> mean over cases` of every arm present.
    best: the compared arms (not the reference) with the best mean.
    next_best: the best compared arm other than `TESTED_ARM`, None if there is none.
    p: one-sided p-value of the tested arm against `next_best` (None without both).
    significant: p < alpha.
  """
  means: dict[str, float]
  best: tuple[str, ...]
  next_best: str | None
  p: float | None
  significant: bool


def compare_arms(per_arm: Mapping[str, Mapping[str, float]], headline: Headline,
                 alpha: float) -> Comparison:
  """Bold and '*' of one line (module docstring), from `arm -> case -> value` per-case means."""
  means = {arm: float(np.mean(list(cases.values()))) for arm, cases in per_arm.items() if cases}
  sign = 1.0 if headline.higher_is_better else -1.0
  compared = {arm: sign * m for arm, m in means.items() if arm != REFERENCE_ARM}
  top = max(compared.values(), default=None)
  best = tuple(arm for arm, m in compared.items() if m == top)
  others = {arm: m for arm, m in compared.items() if arm != TESTED_ARM}
  if TESTED_ARM not in compared or not others:
    return Comparison(means, best, None, None, False)
  next_best = max(others, key=others.get)
  p = one_sided_p(per_arm[TESTED_ARM], per_arm[next_best], headline.higher_is_better)
  return Comparison(means, best, next_best, p, p < alpha)


def _lines(rows: Sequence[Mapping], task: str) -> list[tuple[int, str]]:
  """The (n, net) lines of a task's table: few-shot sizes ascending, nets in order."""
  few_shot = [r for r in rows if r["task"] == task and r["arm"] != REFERENCE_ARM]
  nets = _ordered(r["net"] for r in rows if r["task"] == task)
  sizes = sorted({r["n"] for r in few_shot}) or sorted(
      {r["n"] for r in rows if r["task"] == task})
  return [(n, net) for n in sizes for net in nets]


def comparisons(rows: Sequence[Mapping], alpha: float = 0.05
                ) -> dict[tuple[str, int, str, str], Comparison]:
  """`(task, n, net, metric) -> Comparison` for every line and headline metric."""
  out = {}
  for task in _ordered(r["task"] for r in rows):
    arms = [arm for arm in ARM_TITLES if any(r["arm"] == arm and r["task"] == task
                                               for r in rows)]
    for n, net in _lines(rows, task):
      for headline in headlines(task):
        per_arm = {arm: case_means(rows, arm=arm, net=net, task=task, metric=headline.key,
                                   n=None if arm == REFERENCE_ARM else n) for arm in arms}
        out[task, n, net, headline.key] = compare_arms(per_arm, headline, alpha)
  return out


BASELINE_ARM = "baseline"


def data_gaps(rows: Sequence[Mapping]) -> dict[tuple[str, int, str, str], tuple[float, float]]:
  """`(task, n, net, metric) -> (upper - baseline, one-sided p that the upper bound is
  better)` at the smallest few-shot n of each task: whether the task is short of real data at
  all, i.e. whether there is a gap for synthetic data to close."""
  out = {}
  for task in _ordered(r["task"] for r in rows):
    sizes = sorted({r["n"] for r in rows if r["task"] == task and r["arm"] == BASELINE_ARM})
    if not sizes or not any(r["task"] == task and r["arm"] == REFERENCE_ARM for r in rows):
      continue
    for net in _ordered(r["net"] for r in rows if r["task"] == task):
      for headline in headlines(task):
        upper = case_means(rows, arm=REFERENCE_ARM, net=net, task=task, metric=headline.key)
        base = case_means(rows, arm=BASELINE_ARM, net=net, task=task, metric=headline.key,
                          n=sizes[0])
        if upper and base:
          margin = float(np.mean(list(upper.values())) - np.mean(list(base.values())))
          out[task, sizes[0], net, headline.key] = (
              margin, one_sided_p(upper, base, headline.higher_is_better))
  return out


def _gap_note(all_gaps: Mapping, task: str) -> str:
  """The line under a task's table: `data_gaps` of that task."""
  gaps = {k: v for k, v in all_gaps.items() if k[0] == task}
  if not gaps:
    return ""
  titles = {h.key: h for h in headlines(task)}
  parts = [f"{net} {titles[metric].title} {margin * titles[metric].scale:+.2f} (p = {p:.2g})"
           for (_, _, net, metric), (margin, p) in gaps.items()]
  n = next(iter(gaps))[1]
  return (f"Upper bound minus baseline at n = {n} (is the task short of real data? one-sided "
          f"Wilcoxon p that the upper bound is better): {'; '.join(parts)}.")


# ---------------------------------------------------------------------------------------------
# Markdown


def markdown_tables(rows: Sequence[Mapping], alpha: float = 0.05, preamble: str = "") -> str:
  """The paper-style tables of every task in `rows` as one markdown document, after the
  paragraph `preamble` (e.g. where the test cases come from) when one is given."""
  rows = list(rows)
  marks = comparisons(rows, alpha)
  gaps = data_gaps(rows)
  parts = [preamble] if preamble else []
  for task in _ordered(r["task"] for r in rows):
    task_rows = [r for r in rows if r["task"] == task]
    arms = [arm for arm in ARM_TITLES if any(r["arm"] == arm for r in task_rows)]
    heads = headlines(task)
    cases = len({r["case"] for r in task_rows})
    seeds = len({r["seed"] for r in task_rows})
    upper_n = sorted({r["n"] for r in task_rows if r["arm"] == REFERENCE_ARM})
    note = (f"Mean over {cases} held-out test case(s) and {seeds} seed(s)"
            f"{' ± the standard deviation of the per-seed means' if seeds > 1 else ''}. "
            f"**Bold**: best "
            f"arm{' (the upper bound excluded)' if upper_n else ''}; \\*: ACIS better than the "
            f"next best arm, one-sided Wilcoxon signed-rank test over the test cases, "
            f"p < {alpha:g}.")
    if upper_n:
      note += f" Upper bound: all {', '.join(map(str, upper_n))} real training cases."
    header = ["n", "net"] + [f"{ARM_TITLES[arm]} {h.title}" for arm in arms for h in heads]
    lines = [f"### {task}", "", note, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for n, net in _lines(rows, task):
      cells = [str(n), net]
      for arm in arms:
        for h in heads:
          mark = marks[task, n, net, h.key]
          if arm not in mark.means:
            cells.append("-")
            continue
          text = h.format(mark.means[arm])
          if arm in mark.best:
            text = f"**{text}**"
          spread = seed_spread(task_rows, arm=arm, net=net, task=task, metric=h.key,
                               n=None if arm == REFERENCE_ARM else n)
          if spread is not None:
            text += f" ± {h.format(spread)}"
          if arm == TESTED_ARM and mark.significant:
            text += "\\*"
          cells.append(text)
      lines.append("| " + " | ".join(cells) + " |")
    gap = _gap_note(gaps, task)
    if gap:
      lines += ["", gap]
    parts.append("\n".join(lines))
  return "\n\n".join(parts) + "\n"


def write_significance_csv(path: str, rows: Sequence[Mapping], alpha: float = 0.05) -> None:
  """One line per (task, n, net, metric): ACIS's mean, the next best arm, its mean, p."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["task", "n", "net", "metric", "acis_mean", "next_best", "next_best_mean",
                     "p_one_sided", "significant"])
    for (task, n, net, metric), mark in comparisons(rows, alpha).items():
      if mark.next_best is None:
        continue
      writer.writerow([task, n, net, metric, mark.means[TESTED_ARM], mark.next_best,
                       mark.means[mark.next_best], mark.p, mark.significant])


# ---------------------------------------------------------------------------------------------
# Plots


def _seed_means(rows: Sequence[Mapping], arm: str, n: int, net: str, task: str,
                metric: str) -> list[float]:
  """Per seed, the mean over test cases."""
  per_seed = defaultdict(list)
  for r in rows:
    if (r["arm"], r["n"], r["net"], r["task"], r["metric"]) == (arm, n, net, task, metric):
      per_seed[r["seed"]].append(float(r["value"]))
  return [float(np.mean(v)) for v in per_seed.values()]


def plot_metric_vs_n(rows: Sequence[Mapping], out_dir: str) -> list[str]:
  """One PNG per (task, headline metric) under `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for task in _ordered(r["task"] for r in rows):
    task_rows = [r for r in rows if r["task"] == task]
    nets = _ordered(r["net"] for r in task_rows)
    arms = [arm for arm in ARM_TITLES if any(r["arm"] == arm for r in task_rows)]
    for h in headlines(task):
      fig, axes = plt.subplots(1, len(nets), figsize=(4.0 * len(nets), 3.2), squeeze=False)
      for ax, net in zip(axes[0], nets):
        for arm in arms:
          sizes = sorted({r["n"] for r in task_rows if r["arm"] == arm and r["net"] == net})
          stats = [_seed_means(task_rows, arm, n, net, task, h.key) for n in sizes]
          mean = [np.mean(s) * h.scale for s in stats]
          spread = [np.std(s, ddof=1) * h.scale if len(s) > 1 else 0.0 for s in stats]
          if not sizes:
            continue
          if arm == REFERENCE_ARM:
            ax.axhline(mean[-1], color="k", linestyle="--",
                       label=f"{ARM_TITLES[arm]} (n={sizes[-1]})")
          else:
            ax.errorbar(sizes, mean, yerr=spread, marker="o", capsize=3, label=ARM_TITLES[arm])
        few_shot = sorted({r["n"] for r in task_rows
                           if r["net"] == net and r["arm"] != REFERENCE_ARM})
        if few_shot:
          ax.set_xticks(few_shot)
        ax.set_xlabel("n (real training cases)")
        ax.set_ylabel(h.title)
        ax.set_title(f"{task}, {net}")
        ax.legend(fontsize=7)
      fig.tight_layout()
      path = os.path.join(out_dir, f"{task}_{h.key.replace('/', '_')}.png")
      fig.savefig(path, dpi=100)
      plt.close(fig)
      paths.append(path)
  return paths


def write_report(rows: Sequence[Mapping], out_dir: str, alpha: float = 0.05,
                 preamble: str = "") -> list[str]:
  """results.csv, table.md (opening with `preamble`), significance.csv and plots/*.png under
  `out_dir`; returns their paths."""
  rows = list(rows)
  if not rows:
    raise ValueError("no results to report")
  csv_path = os.path.join(out_dir, "results.csv")
  write_results_csv(csv_path, rows)
  bad = [r for r in rows if not math.isfinite(float(r["value"]))]
  if bad:
    raise ValueError(f"{csv_path}: {len(bad)} non-finite metric value(s), e.g. {bad[0]}; "
                     "the table and plots need finite values")
  table_path = os.path.join(out_dir, "table.md")
  with open(table_path, "w") as f:
    f.write(markdown_tables(rows, alpha, preamble))
  significance_path = os.path.join(out_dir, "significance.csv")
  write_significance_csv(significance_path, rows, alpha)
  return [csv_path, table_path, significance_path] + plot_metric_vs_n(
      rows, os.path.join(out_dir, "plots"))
