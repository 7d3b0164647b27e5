"""UV-space rasterisation: which surface point every texel of a UV texture shows (numpy, computed
once).

Texel (row r, column c) of a [T, T] texture has its centre at u = (c + 0.5) / T, v = 1 - (r + 0.5) /
T (row 0 at the top, v = 1), the convention of ``lipflow_jax.render.sample_texture``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class TexelMap(NamedTuple):
  """Texel -> surface. face_id [T, T] int32 (-1: no face), bary [T, T, 3] float32 (vertex
  weights)."""

  face_id: np.ndarray
  bary: np.ndarray


def rasterize_uv(uvs, uv_faces, size: int, eps: float = 1e-7) -> TexelMap:
  """Finds, for every texel centre, the UV triangle containing it and its barycentric coordinates.

  Args:
    uvs: [U, 2] texture coordinates; uv_faces: [F, 3] int indices into ``uvs``.
    size: T.
    eps: tolerance on the barycentrics (texel centres on a shared edge go to the first face).
  Returns:
    ``TexelMap``; barycentrics weight the face's three corners (``faces[face_id]`` for the
    vertices).
  """
  uvs = np.asarray(uvs, np.float64)
  uv_faces = np.asarray(uv_faces, np.int64)
  t = int(size)
  pix = np.stack(
    [uvs[:, 0] * t, (1.0 - uvs[:, 1]) * t], -1
  )  # texel-grid coordinates (x right, y down)
  tri = pix[uv_faces]  # [F, 3, 2]
  face_id = np.full((t, t), -1, np.int32)
  bary = np.zeros((t, t, 3), np.float64)
  lo = np.floor(tri.min(1) - 0.5).astype(np.int64) + 1
  hi = np.floor(tri.max(1) - 0.5).astype(np.int64)
  lo = np.clip(lo, 0, t - 1)
  hi = np.clip(hi, 0, t - 1)
  for f in np.nonzero(np.all(hi >= lo, axis=1))[0]:
    (x0, y0), (x1, y1), (x2, y2) = tri[f]
    det = (y1 - y2) * (x0 - x2) + (x2 - x1) * (y0 - y2)
    if abs(det) < 1e-14:
      continue
    cols = np.arange(lo[f, 0], hi[f, 0] + 1)
    rows = np.arange(lo[f, 1], hi[f, 1] + 1)
    cx, cy = np.meshgrid(cols + 0.5, rows + 0.5)
    b0 = ((y1 - y2) * (cx - x2) + (x2 - x1) * (cy - y2)) / det
    b1 = ((y2 - y0) * (cx - x2) + (x0 - x2) * (cy - y2)) / det
    b2 = 1.0 - b0 - b1
    inside = (b0 >= -eps) & (b1 >= -eps) & (b2 >= -eps)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    free = inside & (face_id[rr, cc] < 0)
    face_id[rr[free], cc[free]] = f
    bary[rr[free], cc[free]] = np.stack([b0, b1, b2], -1)[free]
  bary = np.clip(bary, 0.0, 1.0)
  bary /= np.maximum(bary.sum(-1, keepdims=True), 1e-12)
  return TexelMap(face_id, bary.astype(np.float32))


def texel_points(texel_map: TexelMap, faces, verts):
  """[T, T, 3] surface points of the texels (zeros where ``face_id < 0``). Works with numpy or
  jax arrays."""
  fid = np.maximum(texel_map.face_id, 0)
  corners = verts[np.asarray(faces)[fid]]  # [T, T, 3, 3]
  pts = (corners * texel_map.bary[..., None]).sum(-2)
  return pts * (texel_map.face_id >= 0)[..., None]
