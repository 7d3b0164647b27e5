"""The decoded avatar rendered into cameras: one home for "normalised mesh + texture -> image", used
by the screen loss (train), the headset objective (fit) and the evaluation's dome views.
"""

from __future__ import annotations

import jax

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
  4] ->
  ``render.Rendered`` with a leading batch axis (rgb [B, H, W, 3])."""

  def one(v, tex, K, Rt):
    return render_avatar(mesh, v, tex, geometry.Camera(K=K, Rt=Rt), settings)

  return jax.vmap(one)(verts, texture, camera_K, camera_Rt)
