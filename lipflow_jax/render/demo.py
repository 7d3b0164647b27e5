"""A procedural textured head-like mesh, and a demo that renders it to a PNG.

python -m lipflow_jax.render.demo --out /tmp/render.png [--size 512] [--faces 15000] [--soft]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from lipflow_jax.geometry.mesh import Mesh


def head_mesh(num_faces: int = 15000, nose: float = 0.25) -> Mesh:
  """A UV-sphere deformed into a head-like shape (ellipsoid with a nose bump) facing +z, up = +y.

  ``2 * n_lat * n_lon ~= num_faces`` faces (the poles keep degenerate triangles, which the
  rasterizer culls). Vertices on the seam are duplicated, so ``uv_faces == faces``. u runs with
  longitude (u = 0.5 faces +z), v with latitude (v = 1 at the top, y = +1).
  """
  n_lat = max(2, int(round(math.sqrt(num_faces / 2 / 1.333))))
  n_lon = max(3, int(round(num_faces / 2 / n_lat)))
  v = np.linspace(1.0, 0.0, n_lat + 1)  # top to bottom
  u = np.linspace(0.0, 1.0, n_lon + 1)
  vv, uu = np.meshgrid(v, u, indexing="ij")
  theta = (1.0 - vv) * np.pi  # polar angle from +y
  phi = 2.0 * np.pi * (uu - 0.5)
  x = np.sin(theta) * np.sin(phi)
  y = np.cos(theta)
  z = np.sin(theta) * np.cos(phi)
  # Head-like: narrower sideways, a nose bump at the front centre.
  bump = nose * np.exp(-((phi / 0.25) ** 2 + ((theta - np.pi / 2) / 0.35) ** 2))
  r = 1.0 + bump
  verts = np.stack([0.8 * x * r, 1.05 * y * r, 0.9 * z * r], -1).reshape(-1, 3)
  idx = np.arange((n_lat + 1) * (n_lon + 1)).reshape(n_lat + 1, n_lon + 1)
  a, b = idx[:-1, :-1], idx[:-1, 1:]
  c, d = idx[1:, :-1], idx[1:, 1:]
  # Rows go top to bottom, columns with u: counter-clockwise seen from outside.
  f = np.concatenate(
    [np.stack([a, c, d], -1).reshape(-1, 3), np.stack([a, d, b], -1).reshape(-1, 3)]
  )
  uvs = np.stack([uu, vv], -1).reshape(-1, 2)
  return Mesh(
    verts.astype(np.float32), f.astype(np.int32), uvs.astype(np.float32), f.astype(np.int32)
  )


def demo_texture(size: int = 256) -> np.ndarray:
  """[size, size, 3] float32 in [0, 1]: red grows with u, green with v (row 0 = v = 1 is green), a
  checkerboard in blue, and a dark marker block in the top-left quadrant of the image (u < 0.5, v >
  0.5)."""
  r, c = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  u = (c + 0.5) / size
  v = 1.0 - (r + 0.5) / size
  checker = (((r * 16) // size + (c * 16) // size) % 2).astype(np.float32)
  tex = np.stack([u, v, 0.3 + 0.5 * checker], -1).astype(np.float32)
  marker = (u > 0.38) & (u < 0.47) & (v > 0.55) & (v < 0.65)
  tex[marker] = 0.05
  return tex


def main(argv=None):
  import jax
  import jax.numpy as jnp
  from PIL import Image

  from lipflow_jax.geometry import Camera, intrinsics, look_at
  from lipflow_jax.render import RasterSettings, fit_budgets, occupancy, render_mesh

  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--out", default="/tmp/render.png")
  ap.add_argument("--size", type=int, default=512)
  ap.add_argument("--faces", type=int, default=15000)
  ap.add_argument("--soft", action="store_true", help="soft mode (K = 8) instead of hard")
  ap.add_argument("--azimuth", type=float, default=20.0, help="camera azimuth in degrees")
  args = ap.parse_args(argv)
  mesh = head_mesh(args.faces)
  tex = demo_texture(256)
  a = math.radians(args.azimuth)
  eye = (4.0 * math.sin(a), 0.8, 4.0 * math.cos(a))
  cam = Camera(
    K=intrinsics(args.size * 1.6, (args.size, args.size)), Rt=look_at(eye, (0.0, 0.0, 0.0))
  )
  if args.soft:
    settings = RasterSettings((args.size, args.size), background=(1.0, 1.0, 1.0))
  else:
    settings = RasterSettings.hard((args.size, args.size), background=(1.0, 1.0, 1.0))
  verts, faces = jnp.asarray(mesh.verts), jnp.asarray(mesh.faces)
  for _ in range(
    2
  ):  # settings that fit this view (the default cap overflows where the sphere's faces meet)
    settings = fit_budgets(
      settings, jax.jit(occupancy, static_argnums=3)(verts, faces, cam, settings)
    )
  fn = jax.jit(render_mesh, static_argnums=6)
  out = fn(
    verts, faces, jnp.asarray(mesh.uvs), jnp.asarray(mesh.uv_faces), jnp.asarray(tex), cam, settings
  )
  img = np.clip(np.asarray(out.rgb) * 255.0 + 0.5, 0, 255).astype(np.uint8)
  Image.fromarray(img).save(args.out)
  print(
    f"wrote {args.out}: {len(mesh.faces)} faces, max_faces_per_tile {settings.max_faces_per_tile}, "
    f"overflow {int(out.overflow)}"
  )


if __name__ == "__main__":
  main()
