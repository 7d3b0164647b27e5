"""The decoded avatar rendered into cameras: one home for "normalised mesh + texture -> image", used
by the screen and headset losses (train), the headset objective (fit) and the evaluation's dome
views; and the headset cameras' rasterisation and grey conversion.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from lipflow_jax import geometry, render
from lipflow_jax.data import schema


def render_avatar(mesh: schema.MeshMeta, verts, texture, camera: geometry.Camera, settings):
  """One view of a decoded avatar.

  Args:
    mesh: the dataset's ``MeshMeta``.
    verts: [V, 3] normalised vertices (as the decoder outputs them).
    texture: [T, T, 3] colours in [0, 1].
    camera: ``geometry.Camera`` (head coordinates -> view).
    settings: ``render.RasterSettings`` (static).
  Returns:
    ``render.Rendered`` (rgb [H, W, 3], alpha [H, W, 1], ...).
  """
  return render.render_mesh(
    schema.denormalize_verts(verts, mesh),
    mesh.faces,
    mesh.uvs,
    mesh.uv_faces,
    texture,
    camera,
    settings,
  )


def render_batch(mesh: schema.MeshMeta, verts, texture, camera_K, camera_Rt, settings):
  """``render_avatar`` over a batch: verts [B, V, 3], texture [B, T, T, 3], K [B, 3, 3], Rt [B, 3,
  4] -> ``render.Rendered`` with a leading batch axis (rgb [B, H, W, 3])."""

  def one(v, tex, K, Rt):
    return render_avatar(mesh, v, tex, geometry.Camera(K=K, Rt=Rt), settings)

  return jax.vmap(one)(verts, texture, camera_K, camera_Rt)


def to_grey(rgb):
  """[..., 3] -> [..., 1] luminance (ITU-R BT.601 weights), as the HMC crops are made."""
  w = jnp.array([0.299, 0.587, 0.114], rgb.dtype)
  return jnp.sum(rgb * w, axis=-1, keepdims=True)


# Rasterisation into the headset cameras (fitting and the paired headset training loss). Hard
# (K = 1, sigma = 0) by default: the crops are filled by the face, so the photometric gradient
# through the texture and the barycentrics (which move with the vertices) is what matters, and it
# is the cheapest. sigma > 0 adds
# soft-silhouette gradients but blurs: on the default capture, sigma = 0.5 renders the crops at MSE
# 0.01 from the hard (ground-truth) rendering, more than the fit's whole residual (~0.003), and
# needs ~1024 candidates per 4 x 4 tile (the blur radius of 3.8 px in these close-ups covers many
# faces; 64 overflowed and dropped faces, 256 still did in the mouth crop). Small tiles with few
# candidates: the rasterizer's cost grows with tile pixels x candidates per tile; on the default
# synthetic mesh (4888 faces, 32 x 32 crops) hard 4 x 4 tiles with 64 candidates render 10x faster
# than 8 x 8 tiles with 256 and never overflowed.
HMC_SIGMA = 0.0
HMC_FACES_PER_PIXEL = 1


def hmc_raster_settings(
  hmc_size,
  sigma: float = HMC_SIGMA,
  faces_per_pixel: int = HMC_FACES_PER_PIXEL,
  max_faces_per_tile: Optional[int] = None,
  tile_size: int = 4,
  gamma: float = 1e-3,
):
  """``RasterSettings`` of the headset cameras at ``hmc_size`` (h, w), back faces culled (the face
  mesh is open); sigma = 0 is hard. ``max_faces_per_tile`` defaults to 32 (hard: it sizes the chunk
  budget of ``render.select_nearest``, 2,572 chunks per 32 x 32 crop of the 4,888-face mesh, twice
  the most a view of the synthetic capture needs, 1,146; 64 doubled every call's scratch memory
  past glibc's 32 MB mmap threshold, which maps and page-faults it in afresh per call: the crops'
  forward + backward ran ~2x slower) or 1024 (soft). Check ``overflow`` (or ``render.occupancy``)
  for larger crops or meshes."""
  if max_faces_per_tile is None:
    max_faces_per_tile = 32 if sigma == 0.0 else 1024
  if sigma == 0.0:
    return render.RasterSettings.hard(
      tuple(int(s) for s in hmc_size),
      tile_size=tile_size,
      max_faces_per_tile=max_faces_per_tile,
      cull_backfaces=True,
    )
  return render.RasterSettings(
    image_size=tuple(int(s) for s in hmc_size),
    faces_per_pixel=faces_per_pixel,
    sigma=sigma,
    gamma=gamma,
    tile_size=tile_size,
    max_faces_per_tile=max_faces_per_tile,
    cull_backfaces=True,
  )
