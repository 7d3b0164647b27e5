"""Tests of lipflow_jax.evaluate.stats (bootstrap intervals, paired comparisons, verdicts) and of
the report's uncertainty fields."""

import itertools
import json
import math
import os

import numpy as np
import pytest

from lipflow_jax.evaluate import report as report_lib
from lipflow_jax.evaluate import stats


def _exact_bootstrap_quantiles(values, level=0.95):
  """Brute force: every one of the n^n equally likely resamples of n values, their means' quantiles
  (the limit of the percentile bootstrap as the number of resamples grows)."""
  v = np.asarray(values, np.float64)
  means = np.array([v[list(idx)].mean() for idx in itertools.product(range(len(v)), repeat=len(v))])
  q = 100.0 * (1.0 - level) / 2.0
  return np.percentile(means, [q, 100.0 - q]), means


def test_bootstrap_ci_matches_brute_force_enumeration():
  values = np.array([0.3, 1.1, 0.2, 2.0, 0.9])  # 5^5 = 3125 resamples
  (lo, hi), means = _exact_bootstrap_quantiles(values)
  got = stats.bootstrap_ci(values, num_samples=40000, seed=1)
  spread = means.std()
  # The means are discrete (steps of 0.02 here): quantiles agree to about one step.
  assert abs(got[0] - lo) < 0.1 * spread and abs(got[1] - hi) < 0.1 * spread
  assert got[0] < values.mean() < got[1]


def test_bootstrap_ci_matches_normal_theory():
  rng = np.random.default_rng(0)
  values = rng.normal(1.0, 2.0, 400)
  lo, hi = stats.bootstrap_ci(values, num_samples=20000)
  se = values.std() / math.sqrt(len(values))  # the bootstrap's standard error (ddof = 0)
  assert lo == pytest.approx(values.mean() - 1.96 * se, abs=0.1 * se)
  assert hi == pytest.approx(values.mean() + 1.96 * se, abs=0.1 * se)


def test_bootstrap_ci_averages_views_per_frame_and_is_deterministic():
  rng = np.random.default_rng(1)
  per_view = rng.uniform(0, 1, (30, 7))
  assert stats.bootstrap_ci(per_view) == stats.bootstrap_ci(per_view.mean(axis=1))
  assert stats.bootstrap_ci(per_view, seed=3) == stats.bootstrap_ci(per_view, seed=3)
  assert stats.bootstrap_ci(np.full(10, 0.25)) == (0.25, 0.25)


def test_bootstrap_ci_non_finite_and_empty():
  assert all(math.isnan(x) for x in stats.bootstrap_ci([1.0, np.nan, 2.0]))
  assert all(math.isnan(x) for x in stats.bootstrap_ci(np.zeros((0,))))


def test_paired_comparison_resamples_frames_jointly():
  # b = a + 0.1 + tiny noise: unpaired intervals of a and b overlap, the paired one is tight.
  rng = np.random.default_rng(2)
  a = rng.normal(0.0, 1.0, 200)
  b = a + 0.1 + rng.normal(0.0, 0.01, 200)
  c = stats.paired_comparison(a, b)
  assert c["mean_diff"] == pytest.approx(np.mean(a - b))
  assert c["ci"][1] < 0 and c["ci"][0] > -0.11 and c["win_rate"] == 1.0
  lo_a, hi_a = stats.bootstrap_ci(a)
  lo_b, hi_b = stats.bootstrap_ci(b)
  assert hi_a > lo_b  # the per-method intervals overlap; only the paired comparison decides
  assert stats.outcome(c) == "better"
  assert stats.outcome(stats.paired_comparison(b, a)) == "worse"


def test_win_rate_counts_strictly_lower_frames_and_ties_are_not_wins():
  a = np.array([1.0, 2.0, 3.0, 4.0])
  b = np.array([2.0, 2.0, 1.0, 5.0])
  c = stats.paired_comparison(a, b)
  assert c["win_rate"] == 0.5  # frames 0 and 3 lower, frame 1 a tie
  tie = stats.paired_comparison(a, a)
  assert tie["mean_diff"] == 0.0 and tie["ci"] == [0.0, 0.0] and tie["win_rate"] == 0.0
  assert stats.outcome(tie) == "tie"


def test_paired_comparison_nan_and_mismatched_frames():
  c = stats.paired_comparison([1.0, np.nan], [0.0, 0.0])
  assert math.isnan(c["mean_diff"]) and all(math.isnan(x) for x in c["ci"])
  assert stats.outcome(c) == "missing"
  with pytest.raises(ValueError):
    stats.paired_comparison([1.0, 2.0], [1.0, 2.0, 3.0])


def _per_frame(shift_by_method, n=50, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.uniform(0.5, 1.0, n)
  return {
    (m, inp): {"geometry_error": base + d + rng.normal(0, 0.01, n), "image_mse": 0.01 * (base + d)}
    for (m, inp), d in shift_by_method.items()
  }


def test_compare_pairs_and_skips_missing_rows():
  methods = ("dam_fit", "dam_regressor", "lipflow_fit", "mean_mesh")
  pairs = stats.comparison_pairs(methods)
  assert pairs == [
    ("lipflow_fit", "dam_fit"),
    ("lipflow_fit", "dam_regressor"),
    ("lipflow_fit", "mean_mesh"),
    ("dam_regressor", "mean_mesh"),
  ]
  pf = _per_frame({("lipflow_fit", "hmc"): 0.0, ("dam_fit", "hmc"): 0.5})
  out = stats.compare(pf, pairs)
  assert [(c["method"], c["baseline"], c["metric"]) for c in out] == [
    ("lipflow_fit", "dam_fit", "geometry_error"),
    ("lipflow_fit", "dam_fit", "image_mse"),
  ]
  assert set(out[0]) == {"input", "method", "baseline", "metric", "mean_diff", "ci", "win_rate"}


@pytest.mark.parametrize(
  "dam_fit, dam_regressor, expected",
  [
    (0.5, 0.3, stats.HOLDS),  # both baselines clearly worse
    (0.5, -0.3, stats.FAILS),  # the regressor clearly better
    (0.5, 0.0, stats.UNDECIDED),  # identical to the regressor: a tie
  ],
)
def test_verdict(dam_fit, dam_regressor, expected):
  shifts = {
    ("lipflow_fit", "keypoints"): 0.0,
    ("dam_fit", "keypoints"): dam_fit,
    ("dam_regressor", "keypoints"): dam_regressor,
  }
  pf = _per_frame(shifts)
  if dam_regressor == 0.0:  # an exact tie
    pf[("dam_regressor", "keypoints")] = pf[("lipflow_fit", "keypoints")]
  comps = stats.compare(pf, stats.comparison_pairs(("lipflow_fit", "dam_fit", "dam_regressor")))
  v = stats.verdict(comps, "keypoints")
  assert v["verdict"] == expected
  assert set(v["outcomes"]) == {
    "dam_fit/geometry_error",
    "dam_fit/image_mse",
    "dam_regressor/geometry_error",
    "dam_regressor/image_mse",
  }


def test_verdict_missing_and_nan_rows_are_undecided_but_worse_still_fails():
  pf = _per_frame({("lipflow_fit", "hmc"): 0.0, ("dam_fit", "hmc"): 0.5})
  comps = stats.compare(pf, stats.comparison_pairs(("lipflow_fit", "dam_fit", "dam_regressor")))
  v = stats.verdict(comps, "hmc")  # no dam_regressor row
  assert v["verdict"] == stats.UNDECIDED
  assert v["outcomes"]["dam_regressor/geometry_error"] == "missing"
  assert stats.verdict([], "hmc")["verdict"] == stats.UNDECIDED
  pf[("dam_regressor", "hmc")] = {k: np.full(50, np.nan) for k in stats.METRICS}
  comps = stats.compare(pf, stats.comparison_pairs(("lipflow_fit", "dam_fit", "dam_regressor")))
  assert stats.verdict(comps, "hmc")["verdict"] == stats.UNDECIDED
  pf[("dam_fit", "hmc")] = _per_frame({("x", "hmc"): -0.5})[("x", "hmc")]
  comps = stats.compare(pf, stats.comparison_pairs(("lipflow_fit", "dam_fit", "dam_regressor")))
  assert stats.verdict(comps, "hmc")["verdict"] == stats.FAILS


def test_report_json_with_non_finite_metric_writes_null(tmp_path):
  rows = [
    report_lib.make_row("lipflow_fit", "hmc", 0.1, 0.01, 20.0, 0.9, 1.5, 4, (0.09, 0.11)),
    report_lib.make_row("dam_fit", "hmc", float("nan"), 0.02, float("inf"), 0.8, 1.0, 4),
  ]
  pf = {
    ("lipflow_fit", "hmc"): {"geometry_error": np.full(4, 0.1), "image_mse": np.full(4, 0.01)},
    ("dam_fit", "hmc"): {"geometry_error": np.full(4, np.nan), "image_mse": np.full(4, 0.02)},
  }
  comps = stats.compare(pf, stats.comparison_pairs(("lipflow_fit", "dam_fit")))
  rep = report_lib.write_report(str(tmp_path), rows, {"x": float("nan")}, comparisons=comps)
  text = open(os.path.join(tmp_path, "report.json")).read()
  assert "NaN" not in text and "Infinity" not in text
  loaded = json.loads(text)  # strict JSON
  assert loaded == rep and set(loaded) == {"rows", "comparisons", "verdicts", "config"}
  dam = [r for r in loaded["rows"] if r["method"] == "dam_fit"][0]
  assert dam["geometry_error"] is None and dam["psnr"] is None
  assert dam["geometry_error_ci"] == [None, None] and loaded["config"]["x"] is None
  geo = [c for c in loaded["comparisons"] if c["metric"] == "geometry_error"][0]
  assert geo["mean_diff"] is None and geo["ci"] == [None, None]
  img = [c for c in loaded["comparisons"] if c["metric"] == "image_mse"][0]
  assert img["mean_diff"] == pytest.approx(-0.01) and img["win_rate"] == 1.0
  assert loaded["verdicts"] == [
    {
      "input": "hmc",
      "verdict": stats.UNDECIDED,
      "outcomes": {
        "dam_fit/geometry_error": "missing",
        "dam_fit/image_mse": "better",
        "dam_regressor/geometry_error": "missing",
        "dam_regressor/image_mse": "missing",
      },
    }
  ]
  md = open(os.path.join(tmp_path, "report.md")).read()
  assert "[0.0900, 0.1100]" in md and "n/a" in md and "hmc: verdict UNDECIDED" in md
  assert "| hmc | lipflow_fit | dam_fit | image_mse |" in md


def test_per_frame_skips_views_without_a_metric():
  # frame 0: views 1, NaN, 3 -> 2; frame 1: no view has a metric -> NaN; frame 2: plain mean.
  v = np.array([[1.0, np.nan, 3.0], [np.nan, np.nan, np.nan], [2.0, 4.0, 6.0]])
  np.testing.assert_array_equal(stats.per_frame(v), [2.0, np.nan, 4.0])
  assert np.all(np.isnan(stats.bootstrap_ci(v)))  # a frame without any metric: no interval
  np.testing.assert_allclose(stats.bootstrap_ci(v[[0, 2]], num_samples=4000), (2.0, 4.0))
