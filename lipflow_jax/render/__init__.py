"""Differentiable tile-binned soft rasterizer and texture sampling (SoftRas / PyTorch3D style)."""

from lipflow_jax.render.rasterize import (
  EMPTY_DIST,
  Fragments,
  Occupancy,
  bin_faces,
  eval_fragment,
  fit_budgets,
  interpolate,
  occupancy,
  project_faces,
  rasterize,
  safe_div,
  safe_sqrt,
  select_faces,
)
from lipflow_jax.render.settings import RasterSettings
from lipflow_jax.render.shade import (
  Rendered,
  render_mesh,
  sample_texture,
  soft_blend,
  soft_coverage,
)

__all__ = [
  "EMPTY_DIST",
  "Fragments",
  "Occupancy",
  "RasterSettings",
  "Rendered",
  "bin_faces",
  "eval_fragment",
  "fit_budgets",
  "interpolate",
  "occupancy",
  "project_faces",
  "rasterize",
  "render_mesh",
  "safe_div",
  "safe_sqrt",
  "sample_texture",
  "select_faces",
  "soft_blend",
  "soft_coverage",
]
