"""Uncertainty of the report: bootstrap intervals over frames, paired comparisons, verdicts.

Frames are the unit of resampling (a frame's views are averaged first): the held-out frames are
the independent-ish draws of the evaluation; the views of one frame are not. Frames within a
segment are correlated, so the intervals are somewhat optimistic (see ``report.md``).
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

NUM_BOOTSTRAP = 2000
LEVEL = 0.95
METRICS = ("geometry_error", "image_mse")  # lower is better
REFERENCE = "lipflow_fit"
CLAIM_BASELINES = ("dam_fit", "dam_regressor")
HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "undecided"


def per_frame(values) -> np.ndarray:
  """[N, ...] per-frame (per-view) values -> [N] float64 means over everything but frames. Views
  without a value (NaN: an empty mask, see ``evaluate_codes``) do not count; a frame with none is
  NaN."""
  v = np.asarray(values, np.float64)
  if v.ndim == 1:
    return v
  v = v.reshape((v.shape[0], -1))
  has = ~np.isnan(v)
  count = has.sum(axis=1)
  return np.where(count > 0, np.where(has, v, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)


def bootstrap_means(values, num_samples: int = NUM_BOOTSTRAP, seed: int = 0) -> np.ndarray:
  """[B] means of ``values`` [N] over B resamples of the N frames with replacement."""
  v = per_frame(values)
  idx = np.random.default_rng(seed).integers(0, v.shape[0], size=(num_samples, v.shape[0]))
  return v[idx].mean(axis=1)


def bootstrap_ci(
  values, level: float = LEVEL, num_samples: int = NUM_BOOTSTRAP, seed: int = 0
) -> Tuple[float, float]:
  """Percentile bootstrap interval of the mean of ``values`` [N] (frames); (nan, nan) if any value
  is non-finite or there are no frames."""
  v = per_frame(values)
  if v.size == 0 or not np.all(np.isfinite(v)):
    return (math.nan, math.nan)
  q = 100.0 * (1.0 - level) / 2.0
  lo, hi = np.percentile(bootstrap_means(v, num_samples, seed), [q, 100.0 - q])
  return (float(lo), float(hi))


def paired_comparison(
  a, b, level: float = LEVEL, num_samples: int = NUM_BOOTSTRAP, seed: int = 0
) -> Dict[str, object]:
  """``a`` vs ``b`` over the same frames ([N] each, lower is better).

  Returns {"mean_diff": mean(a - b), "ci": [lo, hi] (paired percentile bootstrap of the mean
  difference), "win_rate": fraction of frames where a < b (ties are not wins)}; non-finite values
  give nan everywhere.
  """
  a, b = per_frame(a), per_frame(b)
  if a.shape != b.shape:
    raise ValueError(f"paired comparison needs the same frames: {a.shape} vs {b.shape}")
  d = a - b
  if d.size == 0 or not np.all(np.isfinite(d)):
    return {"mean_diff": math.nan, "ci": [math.nan, math.nan], "win_rate": math.nan}
  lo, hi = bootstrap_ci(d, level, num_samples, seed)
  return {"mean_diff": float(d.mean()), "ci": [lo, hi], "win_rate": float(np.mean(a < b))}


def comparison_pairs(methods: Sequence[str], reference: str = REFERENCE):
  """(reference, other) for every other method, then (dam_regressor, mean_mesh): does the
  run-time signal carry any information beyond the training mean?"""
  pairs = [(reference, m) for m in methods if m != reference]
  if "dam_regressor" in methods and "mean_mesh" in methods:
    pairs.append(("dam_regressor", "mean_mesh"))
  return pairs


def compare(
  per_frame_metrics: Mapping[Tuple[str, str], Mapping[str, np.ndarray]],
  pairs: Sequence[Tuple[str, str]],
  metrics: Sequence[str] = METRICS,
  **kwargs,
) -> List[Dict[str, object]]:
  """Paired comparisons ``method`` vs ``baseline`` per input and metric.

  Args:
    per_frame_metrics: {(method, input): {metric: [N] or [N, C]}} on the same frames per input.
    pairs: (method, baseline) pairs; pairs with a missing row are skipped.
  Returns:
    [{"input", "method", "baseline", "metric", "mean_diff", "ci", "win_rate"}] (mean_diff =
    method - baseline).
  """
  inputs = sorted({i for _, i in per_frame_metrics}, key=str)
  out = []
  for inp in inputs:
    for method, baseline in pairs:
      a, b = per_frame_metrics.get((method, inp)), per_frame_metrics.get((baseline, inp))
      if a is None or b is None:
        continue
      for metric in metrics:
        row = {"input": inp, "method": method, "baseline": baseline, "metric": metric}
        row.update(paired_comparison(a[metric], b[metric], **kwargs))
        out.append(row)
  return out


def outcome(comparison: Optional[Mapping[str, object]]) -> str:
  """'better' (interval below 0), 'worse' (above 0), 'tie' (contains 0) or 'missing' (no row or
  a non-finite interval)."""
  if comparison is None:
    return "missing"
  lo, hi = comparison["ci"]
  if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
    return "missing"  # non-finite (null once written to JSON)
  return "better" if hi < 0 else "worse" if lo > 0 else "tie"


def verdict(
  comparisons: Sequence[Mapping[str, object]],
  input: str,  # pylint: disable=redefined-builtin
  method: str = REFERENCE,
  baselines: Sequence[str] = CLAIM_BASELINES,
  metrics: Sequence[str] = METRICS,
) -> Dict[str, object]:
  """The claim for one input: ``method`` beats every baseline on every metric.

  'holds' when every paired interval lies below 0; 'does not hold' when any lies above 0;
  otherwise 'undecided' (an interval contains 0, or a comparison is missing or non-finite).
  Returns {"input", "verdict", "outcomes": {"<baseline>/<metric>": outcome}}.
  """
  by = {(c["input"], c["method"], c["baseline"], c["metric"]): c for c in comparisons}
  outcomes = {
    f"{b}/{m}": outcome(by.get((input, method, b, m))) for b in baselines for m in metrics
  }
  values = set(outcomes.values())
  if "worse" in values:
    v = FAILS
  elif values == {"better"}:
    v = HOLDS
  else:
    v = UNDECIDED
  return {"input": input, "verdict": v, "outcomes": outcomes}
