"""``report.json`` and ``report.md``: one row per (method, input)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Mapping, Sequence

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
)
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
) -> Dict[str, Any]:
  """One report row with exactly the ``ROW_KEYS`` (plain Python numbers)."""
  return {
    "method": str(method),
    "input": str(input),
    "geometry_error": float(geometry_error),
    "image_mse": float(image_mse),
    "psnr": float(psnr),
    "ssim": float(ssim),
    "fit_ms_per_frame": float(fit_ms_per_frame),
    "frames": int(frames),
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


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A Markdown table of the rows, grouped by input."""
  lines = [
    "| input | method | geometry error | image MSE | PSNR (dB) | SSIM | fit ms/frame | frames |",
    "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  order = {m: i for i, m in enumerate(METHODS)}
  for r in sorted(rows, key=lambda r: (r["input"], order.get(r["method"], 99))):
    lines.append(
      f"| {r['input']} | {r['method']} | {_fmt(r['geometry_error'], 4)} | "
      f"{_fmt(r['image_mse'], 5)} | "
      f"{_fmt(r['psnr'], 2)} | {_fmt(r['ssim'], 4)} | {_fmt(r['fit_ms_per_frame'], 2)} | "
      f"{r['frames']} |"
    )
  return "\n".join(lines) + "\n"


def claim_summary(rows: Sequence[Mapping[str, Any]]) -> str:
  """Whether lipflow_fit beats dam_fit and dam_regressor on geometry error and image MSE, per
  input."""
  by = {(r["method"], r["input"]): r for r in rows}
  out = []
  for inp in INPUTS:
    lf = by.get(("lipflow_fit", inp))
    if lf is None:
      continue
    for other in ("dam_fit", "dam_regressor"):
      o = by.get((other, inp))
      if o is None:
        continue
      geo = lf["geometry_error"] < o["geometry_error"]
      img = lf["image_mse"] < o["image_mse"]
      out.append(
        f"- {inp}: lipflow_fit vs {other}: geometry error {lf['geometry_error']:.4f} vs "
        f"{o['geometry_error']:.4f} ({'lower' if geo else 'NOT lower'}), image MSE "
        f"{lf['image_mse']:.5f} vs {o['image_mse']:.5f} ({'lower' if img else 'NOT lower'})"
      )
  return "\n".join(out) + ("\n" if out else "")


def write_report(
  workdir: str,
  rows: Sequence[Mapping[str, Any]],
  config: Mapping[str, Any],
  figures: Sequence[str] = (),
  notes: str = "",
) -> Dict[str, Any]:
  """Writes ``report.json`` (exactly {"rows": [...], "config": {...}}) and ``report.md`` into
  ``workdir``.

  Args:
    rows: dicts with exactly ``ROW_KEYS``.
    config: the resolved configuration (made JSON-safe).
    figures: paths (relative to the workdir) of figures to link from report.md.
    notes: extra Markdown appended to report.md.
  Returns:
    The report dict.
  """
  for r in rows:
    if set(r) != set(ROW_KEYS):
      raise ValueError(f"report row keys {sorted(r)} != {sorted(ROW_KEYS)}")
  report = {"rows": [make_row(**r) for r in rows], "config": _jsonable(dict(config))}
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "report.json.tmp")
  with open(tmp, "w") as f:
    json.dump(report, f, indent=2, allow_nan=False, default=str) if _all_finite(
      report
    ) else json.dump(report, f, indent=2, default=str)
  os.replace(tmp, os.path.join(workdir, "report.json"))
  md = [
    "# LiP-Flow evaluation",
    "",
    "Held-out segments; geometry error = mean per-vertex distance to the ground-truth mesh "
    "(dataset units); "
    "image MSE, PSNR and SSIM over the foreground of all held-out dome views ([0, 1] images).",
    "",
    markdown_table(report["rows"]),
    "## Claim: lipflow_fit vs dam_fit and dam_regressor",
    "",
    claim_summary(report["rows"]),
  ]
  if notes:
    md += [notes, ""]
  if figures:
    md += ["## Figures", ""] + [f"![{os.path.basename(p)}]({p})" for p in figures] + [""]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(md))
  return report


def _all_finite(report) -> bool:
  return all(math.isfinite(r[k]) for r in report["rows"] for k in ROW_KEYS[2:7])


def read_report(workdir: str) -> Dict[str, Any]:
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)
