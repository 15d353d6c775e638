"""The report of the evaluation protocol: results.csv, the paper-style table, its '*' rule, plots."""
import csv
import re

import numpy as np
import pytest
from scipy import stats

from acis_jax.eval import report

CASES = [f"case{i:02d}" for i in range(10)]


def make_rows(values, *, task="segmentation", metric="dice/mean", net="unet", n=4, seed=0):
  """Rows of one metric: values = {arm: per-case values}; the upper arm gets n = 32."""
  return [{"arm": arm, "n": 32 if arm == "upper" else n, "net": net, "task": task,
           "seed": seed, "case": case, "metric": metric, "value": float(v)}
          for arm, per_case in values.items() for case, v in zip(CASES, per_case)]


def seg_rows(dice, msd, **kw):
  return make_rows(dice, metric="dice/mean", **kw) + make_rows(msd, metric="msd/mean", **kw)


def table_lines(markdown):
  """The table's data lines as lists of cells (header and separator dropped)."""
  lines = [line for line in markdown.splitlines() if line.startswith("|")]
  return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def header(markdown):
  line = next(line for line in markdown.splitlines() if line.startswith("| n"))
  return [c.strip() for c in line.strip("|").split("|")]


def test_results_csv_round_trip(tmp_path):
  rows = make_rows({"baseline": np.linspace(0.5, 0.9, 10), "acis": np.linspace(0.6, 1.0, 10)})
  path = str(tmp_path / "out" / "results.csv")
  report.write_results_csv(path, rows)
  with open(path, newline="") as f:
    assert next(csv.reader(f)) == list(report.COLUMNS)
  back = report.read_results_csv(path)
  assert back == rows


def test_rows_with_other_keys_are_refused(tmp_path):
  row = make_rows({"acis": [1.0] * 10})[0]
  del row["seed"]
  with pytest.raises(ValueError, match="row 0 has keys"):
    report.write_results_csv(str(tmp_path / "r.csv"), [row])


def test_one_sided_p_is_scipys_wilcoxon_in_the_metrics_direction():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=10), rng.normal(size=10)
  tested, other = dict(zip(CASES, a)), dict(zip(CASES, b))
  expected_greater = stats.wilcoxon(a, b, alternative="greater").pvalue
  expected_less = stats.wilcoxon(a, b, alternative="less").pvalue
  assert report.one_sided_p(tested, other, True) == pytest.approx(expected_greater)
  assert report.one_sided_p(tested, other, False) == pytest.approx(expected_less)
  # Cases pair by name, not by position.
  shuffled = dict(reversed(list(other.items())))
  assert report.one_sided_p(tested, shuffled, True) == pytest.approx(expected_greater)
  with pytest.raises(ValueError, match="different test cases"):
    report.one_sided_p(tested, dict(list(other.items())[:-1]), True)


def test_acis_better_on_every_case_is_significant():
  base = np.linspace(0.60, 0.80, 10)
  rows = seg_rows({"baseline": base, "acis-": base + 0.01, "acis": base + 0.03,
                   "upper": base + 0.1},
                  {"baseline": 10 - base, "acis-": 9 - base, "acis": 8 - base,
                   "upper": 7 - base})
  marks = report.comparisons(rows)
  dice, msd = marks["segmentation", 4, "unet", "dice/mean"], marks["segmentation", 4, "unet",
                                                                      "msd/mean"]
  # The next best is ACIS- (better than the baseline), and all 10 differences favour ACIS.
  assert dice.next_best == msd.next_best == "acis-"
  assert dice.p == pytest.approx(stats.wilcoxon(base + 0.03, base + 0.01,
                                                alternative="greater").pvalue)
  assert dice.p == pytest.approx(2.0 ** -10)
  assert dice.significant and msd.significant
  # The upper bound is better still, but it is a reference: it is neither bold nor compared.
  assert dice.best == ("acis",) and msd.best == ("acis",)

  cells = dict(zip(header(report.markdown_tables(rows)),
                   table_lines(report.markdown_tables(rows))[0]))
  assert cells["ACIS DSC (%)"] == f"**{np.mean(base + 0.03) * 100:.2f}**\\*"
  assert cells["ACIS MSD (mm)"] == f"**{np.mean(8 - base):.2f}**\\*"
  assert cells["Upper bound DSC (%)"] == f"{np.mean(base + 0.1) * 100:.2f}"
  assert cells["Baseline DSC (%)"] == f"{np.mean(base) * 100:.2f}"


def test_mixed_differences_are_not_significant_even_when_acis_is_best():
  base = np.linspace(0.60, 0.80, 10)
  # ACIS wins 5 cases by 0.02 and loses 5 by 0.015: the best mean, but no clear evidence.
  acis = base + np.where(np.arange(10) < 5, 0.02, -0.015)
  rows = seg_rows({"baseline": base, "acis": acis}, {"baseline": 10 - base, "acis": 10 - acis})
  mark = report.comparisons(rows)["segmentation", 4, "unet", "dice/mean"]
  expected = stats.wilcoxon(acis, base, alternative="greater").pvalue
  assert expected > 0.05
  assert mark.p == pytest.approx(expected) and not mark.significant
  cells = dict(zip(header(report.markdown_tables(rows)),
                   table_lines(report.markdown_tables(rows))[0]))
  assert cells["ACIS DSC (%)"] == f"**{np.mean(acis) * 100:.2f}**"


def test_the_test_is_against_the_next_best_arm_not_the_baseline():
  base = np.linspace(0.60, 0.80, 10)
  # ACIS beats the baseline on every case, but ACIS- is as good as ACIS on average.
  flip = np.where(np.arange(10) % 2 == 0, 0.01, -0.01)
  rows = make_rows({"baseline": base, "acis-": base + 0.05 + flip, "acis": base + 0.05})
  mark = report.comparisons(rows)["segmentation", 4, "unet", "dice/mean"]
  assert mark.next_best == "acis-"
  assert not mark.significant
  assert report.one_sided_p(dict(zip(CASES, base + 0.05)), dict(zip(CASES, base)), True) < 0.05


def test_best_is_bold_per_metric_and_ties_are_all_bold():
  base = np.full(10, 30.0) + np.arange(10)
  rows = (make_rows({"baseline": base, "acis-": base + 1, "acis": base + 1},
                    task="denoise_0.1", metric="psnr", net="redcnn")
          + make_rows({"baseline": np.full(10, 0.9), "acis-": np.full(10, 0.8),
                       "acis": np.full(10, 0.7)},
                      task="denoise_0.1", metric="ssim", net="redcnn"))
  markdown = report.markdown_tables(rows)
  assert "### denoise_0.1" in markdown
  cells = dict(zip(header(markdown), table_lines(markdown)[0]))
  assert cells["n"] == "4" and cells["net"] == "redcnn"
  assert cells["ACIS- PSNR (dB)"] == cells["ACIS PSNR (dB)"] == f"**{np.mean(base + 1):.2f}**"
  assert cells["Baseline PSNR (dB)"] == f"{np.mean(base):.2f}"
  assert cells["Baseline SSIM"] == "**0.900**"
  assert "**" not in cells["ACIS SSIM"] and not cells["ACIS SSIM"].endswith("\\*")


def test_table_lines_per_n_and_net_with_the_upper_bound_on_each():
  base = np.linspace(0.6, 0.8, 10)
  rows = []
  for n in (4, 8):
    for net in ("unet", "mednext"):
      for seed in (0, 1):
        rows += seg_rows({"baseline": base + n / 100, "acis": base + n / 100 + seed / 100},
                         {"baseline": 5 - base, "acis": 4 - base}, net=net, n=n, seed=seed)
  for net in ("unet", "mednext"):
    for seed in (0, 1):
      rows += seg_rows({"upper": base + 0.2}, {"upper": 1 - base}, net=net, seed=seed)
  markdown = report.markdown_tables(rows)
  lines = table_lines(markdown)
  assert [line[:2] for line in lines] == [["4", "unet"], ["4", "mednext"], ["8", "unet"],
                                          ["8", "mednext"]]
  columns = header(markdown)
  assert columns[2:] == [f"{arm} {metric}" for arm in ("Baseline", "ACIS", "Upper bound")
                         for metric in ("DSC (%)", "MSD (mm)")]
  upper = f"{np.mean(base + 0.2) * 100:.2f} ± 0.00"  # the same at both seeds
  assert all(line[columns.index("Upper bound DSC (%)")] == upper for line in lines)
  # Seeds average per case: ACIS at n = 8 is base + 0.08 + 0.005 on average; its two seeds'
  # means differ by 0.01, a standard deviation of 0.01 / sqrt(2).
  acis = lines[2][columns.index("ACIS DSC (%)")]
  spread = np.std([np.mean(base + 0.08), np.mean(base + 0.09)], ddof=1) * 100
  assert re.fullmatch(rf"\*\*{np.mean(base + 0.085) * 100:.2f}\*\* ± {spread:.2f}(\\\*)?",
                      acis)
  assert "2 seed(s) ± the standard deviation" in markdown
  assert "10 held-out test case(s)" in markdown
  assert "all 32 real training cases" in markdown


def test_write_report_makes_every_file(tmp_path):
  base = np.linspace(0.6, 0.8, 10)
  rows = []
  for n in (4, 8):
    for seed in (0, 1):
      rows += seg_rows({"baseline": base, "acis-": base + 0.01, "acis": base + 0.02},
                       {"baseline": 5 - base, "acis-": 4 - base, "acis": 3 - base},
                       n=n, seed=seed)
      rows += make_rows({"baseline": base * 30, "acis": base * 31}, task="superres_2",
                        metric="psnr", net="esrt", n=n, seed=seed)
      rows += make_rows({"baseline": base, "acis": base}, task="superres_2", metric="ssim",
                        net="esrt", n=n, seed=seed)
  rows += seg_rows({"upper": base + 0.1}, {"upper": 2 - base})
  paths = report.write_report(rows, str(tmp_path))
  names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
  assert names == ["plots/segmentation_dice_mean.png", "plots/segmentation_msd_mean.png",
                   "plots/superres_2_psnr.png", "plots/superres_2_ssim.png", "results.csv",
                   "significance.csv", "table.md"]
  assert sorted(paths) == sorted(str(tmp_path / name) for name in names)
  for name in names:
    if name.endswith(".png"):
      assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert report.read_results_csv(str(tmp_path / "results.csv")) == rows
  with open(tmp_path / "significance.csv", newline="") as f:
    significance = list(csv.DictReader(f))
  ssim = [r for r in significance if r["metric"] == "ssim"]
  assert ssim and all(float(r["p_one_sided"]) == 1.0 for r in ssim)  # identical: p = 1


def test_non_finite_values_are_refused_after_the_csv_is_saved(tmp_path):
  rows = make_rows({"baseline": [1.0] * 9 + [np.inf], "acis": [1.0] * 10}, metric="psnr",
                   task="denoise_0.1")
  with pytest.raises(ValueError, match="non-finite"):
    report.write_report(rows, str(tmp_path))
  assert (tmp_path / "results.csv").exists()


def test_the_data_gap_is_the_upper_bound_against_the_baseline_at_the_smallest_n():
  base = np.linspace(0.60, 0.80, 10)
  upper = base + np.linspace(0.05, 0.14, 10)  # better on every case, by distinct margins
  rows = (seg_rows({"baseline": base, "acis": base, "upper": upper},
                   {"baseline": 10 - base, "acis": 10 - base, "upper": 12 - base})
          + seg_rows({"baseline": base + 0.5, "acis": base, "upper": upper},
                     {"baseline": 10 - base, "acis": 10 - base, "upper": 12 - base}, n=8))
  gaps = report.data_gaps(rows)
  assert set(gaps) == {("segmentation", 4, "unet", "dice/mean"),
                       ("segmentation", 4, "unet", "msd/mean")}  # n = 4 only
  margin, p = gaps["segmentation", 4, "unet", "dice/mean"]
  assert margin == pytest.approx(np.mean(upper - base))
  assert p == pytest.approx(stats.wilcoxon(upper, base, alternative="greater").pvalue)
  assert p == pytest.approx(2.0 ** -10)
  # Distances: the upper bound is 2 mm worse on every case, so nothing says it is better.
  margin, p = gaps["segmentation", 4, "unet", "msd/mean"]
  assert margin == pytest.approx(2.0) and p == pytest.approx(1.0)
  assert (f"unet DSC (%) {np.mean(upper - base) * 100:+.2f} (p = 0.00098)"
          in report.markdown_tables(rows))
