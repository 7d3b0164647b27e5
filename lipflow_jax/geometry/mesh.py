"""Triangle meshes with UVs: OBJ I/O (separate vertex and UV indices) and vertex normals."""

from __future__ import annotations

import os
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Mesh(NamedTuple):
  """A textured mesh. verts [V, 3] f32, faces [F, 3] int32, uvs [U, 2] f32, uv_faces [F, 3] int32.

  UV (0, 0) is the bottom-left of the texture image, as in OBJ.
  """

  verts: np.ndarray
  faces: np.ndarray
  uvs: np.ndarray
  uv_faces: np.ndarray


class OBJFormatError(ValueError):
  """An OBJ file this reader cannot use."""


def read_obj(path) -> Mesh:
  """Reads ``v``, ``vt`` and triangular ``f v/vt[/vn]`` lines; other lines are ignored.

  Faces with more than 3 corners are fan-triangulated. Indices are converted to 0-based.
  Raises ``OBJFormatError`` naming the file and line for an unparsable line, a vertex or UV with
  fewer or non-finite numbers, and out-of-range face indices.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"OBJ file not found: {path}")
  verts, uvs, faces, uv_faces = [], [], [], []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      try:
        if parts[0] in ("v", "vt"):
          n = 3 if parts[0] == "v" else 2
          values = [float(x) for x in parts[1 : n + 1]]
          if len(values) != n or not all(np.isfinite(values)):
            raise OBJFormatError(
              f"{path}:{lineno}: '{parts[0]}' needs {n} finite numbers, got {line.strip()!r}"
            )
          (verts if parts[0] == "v" else uvs).append(values)
        elif parts[0] == "f":
          corners = [c.split("/") for c in parts[1:]]
          if len(corners) < 3:
            raise OBJFormatError(f"{path}:{lineno}: face with fewer than 3 corners")
          vi = [int(c[0]) for c in corners]
          ti = [int(c[1]) if len(c) > 1 and c[1] else 0 for c in corners]
          for k in range(1, len(corners) - 1):
            faces.append([vi[0], vi[k], vi[k + 1]])
            uv_faces.append([ti[0], ti[k], ti[k + 1]])
      except (ValueError, IndexError) as e:
        if isinstance(e, OBJFormatError):
          raise
        raise OBJFormatError(f"{path}:{lineno}: cannot parse {line.strip()!r}") from e
  if not verts or not faces:
    raise OBJFormatError(f"{path}: no vertices or no faces")
  faces = np.asarray(faces, np.int64)
  uv_faces = np.asarray(uv_faces, np.int64)
  # OBJ indices are 1-based; negative ones count from the end.
  faces = np.where(faces < 0, faces + len(verts), faces - 1)
  uv_faces = np.where(uv_faces < 0, uv_faces + len(uvs), uv_faces - 1)
  if faces.min() < 0 or faces.max() >= len(verts):
    raise OBJFormatError(f"{path}: face vertex index out of range [1, {len(verts)}]")
  if uvs and (uv_faces.min() < 0 or uv_faces.max() >= len(uvs)):
    raise OBJFormatError(f"{path}: face UV index out of range [1, {len(uvs)}]")
  return Mesh(
    np.asarray(verts, np.float32),
    faces.astype(np.int32),
    np.asarray(uvs, np.float32).reshape(-1, 2),
    uv_faces.astype(np.int32),
  )


def write_obj(path, mesh: Mesh):
  """Writes ``v``, ``vt`` and ``f v/vt`` lines (1-based)."""
  verts, uvs = np.asarray(mesh.verts), np.asarray(mesh.uvs)
  lines = [f"v {x:.7g} {y:.7g} {z:.7g}" for x, y, z in verts]
  lines += [f"vt {u:.7g} {v:.7g}" for u, v in uvs]
  for fv, ft in zip(np.asarray(mesh.faces) + 1, np.asarray(mesh.uv_faces) + 1):
    lines.append(f"f {fv[0]}/{ft[0]} {fv[1]}/{ft[1]} {fv[2]}/{ft[2]}")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def face_normals(verts, faces, normalize=True):
  """[F, 3] face normals (counter-clockwise winding seen from outside points outwards)."""
  v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
  n = jnp.cross(v1 - v0, v2 - v0)
  if normalize:
    n = n / jnp.sqrt(jnp.maximum(jnp.sum(n * n, -1, keepdims=True), 1e-20))
  return n


def vertex_normals(verts, faces):
  """[V, 3] unit vertex normals: area-weighted sum of adjacent face normals. Pure JAX, jit/vmap
  friendly."""
  n = face_normals(verts, faces, normalize=False)  # length = 2 * area: area weighting
  acc = jnp.zeros_like(verts)
  for k in range(3):
    acc = acc.at[faces[:, k]].add(n)
  return acc / jnp.sqrt(jnp.maximum(jnp.sum(acc * acc, -1, keepdims=True), 1e-20))
