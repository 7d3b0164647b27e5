"""``report.json`` and ``report.md``: one row per (method, input) with 95% bootstrap intervals over
frames, the paired comparisons of ``lipflow_fit`` against every other method, and a verdict on the
paper's claim per input (``lipflow_jax.evaluate.stats``).

``report.json`` = {"rows": [...], "comparisons": [...], "verdicts": [...], "config": {...}};
non-finite numbers (NaN is not valid JSON) are written as null.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Mapping, Sequence

from lipflow_jax.evaluate import stats
from lipflow_jax.fit import methods as methods_lib

ROW_KEYS = (
  "method",
  "input",
  "geometry_error",
  "image_mse",
  "psnr",
  "ssim",
  "fit_ms_per_frame",
  "frames",
  "geometry_error_ci",
  "image_mse_ci",
)
NAN_CI = (math.nan, math.nan)
METHODS = tuple(methods_lib.METHODS)  # the table's order
INPUTS = methods_lib.INPUTS


def make_row(
  method: str,
  input: str,
  geometry_error: float,
  image_mse: float,
  psnr: float,
  ssim: float,  # pylint: disable=redefined-builtin
  fit_ms_per_frame: float,
  frames: int,
  geometry_error_ci: Sequence[float] = NAN_CI,
  image_mse_ci: Sequence[float] = NAN_CI,
) -> Dict[str, Any]:
  """One report row with exactly the ``ROW_KEYS`` (plain Python numbers; intervals [lo, hi])."""
  return {
    "method": str(method),
    "input": str(input),
    "geometry_error": float(geometry_error),
    "image_mse": float(image_mse),
    "psnr": float(psnr),
    "ssim": float(ssim),
    "fit_ms_per_frame": float(fit_ms_per_frame),
    "frames": int(frames),
    "geometry_error_ci": [float(x) for x in geometry_error_ci],
    "image_mse_ci": [float(x) for x in image_mse_ci],
  }


def _jsonable(x):
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (str, bool, int)) or x is None:
    return x
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if hasattr(x, "tolist"):
    return _jsonable(x.tolist())
  return str(x)


def _fmt(x, digits):
  return (
    "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"
  )


def _ci(ci, digits):
  ci = ci if ci is not None else NAN_CI
  return f"[{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]"


def _order(rows):
  order = {m: i for i, m in enumerate(METHODS)}
  return sorted(rows, key=lambda r: (r["input"], order.get(r["method"], 99), r["method"]))


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A Markdown table of the rows (means and 95% bootstrap intervals), grouped by input."""
  lines = [
    "| input | method | geometry error | 95% CI | image MSE | 95% CI | PSNR (dB) | SSIM | "
    "fit ms/frame | frames |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in _order(rows):
    lines.append(
      f"| {r['input']} | {r['method']} | {_fmt(r['geometry_error'], 4)} | "
      f"{_ci(r.get('geometry_error_ci'), 4)} | {_fmt(r['image_mse'], 5)} | "
      f"{_ci(r.get('image_mse_ci'), 5)} | {_fmt(r['psnr'], 2)} | {_fmt(r['ssim'], 4)} | "
      f"{_fmt(r['fit_ms_per_frame'], 2)} | {r['frames']} |"
    )
  return "\n".join(lines) + "\n"


def comparisons_table(comparisons: Sequence[Mapping[str, Any]]) -> str:
  """A Markdown table of paired comparisons (mean difference method - baseline, its 95% paired
  bootstrap interval, the fraction of frames the method wins, and the outcome)."""
  lines = [
    "| input | method | baseline | metric | mean diff | 95% CI | win rate | outcome |",
    "|---|---|---|---|---:|---:|---:|---|",
  ]
  for c in comparisons:
    digits = 4 if c["metric"] == "geometry_error" else 6
    lines.append(
      f"| {c['input']} | {c['method']} | {c['baseline']} | {c['metric']} | "
      f"{_fmt(c['mean_diff'], digits)} | {_ci(c['ci'], digits)} | {_fmt(c['win_rate'], 2)} | "
      f"{stats.outcome(c)} |"
    )
  return "\n".join(lines) + "\n"


def verdicts(comparisons: Sequence[Mapping[str, Any]], inputs: Sequence[str] = INPUTS):
  """``stats.verdict`` of the claim for every input."""
  return [stats.verdict(comparisons, inp) for inp in inputs]


def claim_summary(
  rows: Sequence[Mapping[str, Any]], comparisons: Sequence[Mapping[str, Any]] = ()
) -> str:
  """Per input: the verdict on "lipflow_fit beats dam_fit and dam_regressor on geometry error and
  image MSE" from the paired intervals, with the outcome of each of the four comparisons."""
  present = {r["input"] for r in rows}
  out = []
  for v in verdicts(comparisons, [i for i in INPUTS if i in present]):
    detail = ", ".join(f"{k}: {o}" for k, o in v["outcomes"].items())
    out.append(f"- {v['input']}: verdict {v['verdict'].upper()} ({detail})")
  for inp in [i for i in INPUTS if i in present]:  # does the run-time signal carry information?
    ref = stats.verdict(comparisons, inp, "dam_regressor", ("mean_mesh",))
    if set(ref["outcomes"].values()) != {"missing"}:
      detail = ", ".join(f"{k}: {o}" for k, o in ref["outcomes"].items())
      out.append(f"- {inp}: dam_regressor beats the mean mesh: {ref['verdict']} ({detail})")
  return "\n".join(out) + ("\n" if out else "")


def write_report(
  workdir: str,
  rows: Sequence[Mapping[str, Any]],
  config: Mapping[str, Any],
  figures: Sequence[str] = (),
  notes: str = "",
  comparisons: Sequence[Mapping[str, Any]] = (),
) -> Dict[str, Any]:
  """Writes ``report.json`` (exactly {"rows", "comparisons", "verdicts", "config"}) and
  ``report.md`` into ``workdir``; non-finite numbers become null in the JSON.

  Args:
    rows: dicts with exactly ``ROW_KEYS``.
    config: the resolved configuration (made JSON-safe).
    comparisons: ``stats.compare`` entries (the verdicts are derived from them).
    figures: paths (relative to the workdir) of figures to link from report.md.
    notes: extra Markdown appended to report.md.
  Returns:
    The report dict.
  """
  for r in rows:
    if set(r) != set(ROW_KEYS):
      raise ValueError(f"report row keys {sorted(r)} != {sorted(ROW_KEYS)}")
  rows = [make_row(**r) for r in rows]
  comparisons = [dict(c) for c in comparisons]
  present = [i for i in INPUTS if any(r["input"] == i for r in rows)]
  report = {
    "rows": rows,
    "comparisons": comparisons,
    "verdicts": verdicts(comparisons, present),
    "config": dict(config),
  }
  report = _jsonable(report)
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "report.json.tmp")
  with open(tmp, "w") as f:
    json.dump(report, f, indent=2, allow_nan=False)
  os.replace(tmp, os.path.join(workdir, "report.json"))
  md = [
    "# LiP-Flow evaluation",
    "",
    "Held-out segments; geometry error = mean per-vertex distance to the ground-truth mesh "
    "(dataset units); "
    "image MSE, PSNR and SSIM over the foreground of all held-out dome views ([0, 1] images).",
    "",
    markdown_table(rows),
    "95% CI: percentile bootstrap over frames (views of a frame averaged first; "
    f"{stats.NUM_BOOTSTRAP} resamples). Frames of one segment are correlated, so the intervals are "
    "somewhat narrower than intervals over independent captures would be. n/a (null in "
    "report.json): a non-finite value.",
    "",
    "## Claim: lipflow_fit beats dam_fit and dam_regressor (geometry error and image MSE)",
    "",
    "holds: every paired 95% interval of lipflow_fit - baseline lies below 0; does not hold: "
    "any lies above 0; undecided: an interval contains 0 (or a comparison is missing).",
    "",
    claim_summary(rows, comparisons),
    "## Paired comparisons",
    "",
    "mean diff = method - baseline over the same frames (negative: the method is better); "
    "win rate = fraction of frames where the method is lower.",
    "",
    comparisons_table(comparisons),
  ]
  if notes:
    md += [notes, ""]
  if figures:
    md += ["## Figures", ""] + [f"![{os.path.basename(p)}]({p})" for p in figures] + [""]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(md))
  return report


def read_report(workdir: str) -> Dict[str, Any]:
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)
