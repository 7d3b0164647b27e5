"""Texture sampling, soft blending and ``render_mesh``."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lipflow_jax.geometry.camera import Camera
from lipflow_jax.render.rasterize import Fragments, _rasterize
from lipflow_jax.render.settings import RasterSettings


class Rendered(NamedTuple):
  """A rendered image. A pytree (vmap/jit friendly).

  Attributes:
    rgb: [H, W, C] colour, composited over ``settings.background``.
    alpha: [H, W, 1] coverage in [0, 1] (exactly 0 or 1 in hard mode).
    depth: [H, W] camera depth of the visible surface (soft: blended with the colour weights), 0 where no
      face is within the blur radius.
    face_id: [H, W] int32 nearest face covering the pixel centre, -1 for background.
    overflow: [] int32 number of tiles whose candidate list exceeded ``max_faces_per_tile``.
  """

  rgb: jax.Array
  alpha: jax.Array
  depth: jax.Array
  face_id: jax.Array
  overflow: jax.Array


def sample_texture(texture, uv):
  """Bilinear texture lookup with clamp-to-edge.

  Args:
    texture: [Th, Tw, C]; row 0 is the *top* of the image (v = 1).
    uv: [..., 2] texture coordinates; (0, 0) is the bottom-left corner of the image, (1, 1) the top-right
      (OBJ convention). Texel (row r, column c) has its centre at u = (c + 0.5) / Tw, v = 1 - (r + 0.5) / Th.
  Returns:
    [..., C] in the texture's dtype. Gradients flow to ``texture`` and ``uv``.
  """
  texture, uv = jnp.asarray(texture), jnp.asarray(uv)
  th, tw, c = texture.shape
  x = uv[..., 0] * tw - 0.5
  y = (1.0 - uv[..., 1]) * th - 0.5
  x0f, y0f = jnp.floor(x), jnp.floor(y)
  fx, fy = (x - x0f)[..., None], (y - y0f)[..., None]
  x0 = jnp.clip(x0f, 0, tw - 1).astype(jnp.int32)
  x1 = jnp.clip(x0f + 1, 0, tw - 1).astype(jnp.int32)
  y0 = jnp.clip(y0f, 0, th - 1).astype(jnp.int32)
  y1 = jnp.clip(y0f + 1, 0, th - 1).astype(jnp.int32)
  flat = texture.reshape(th * tw, c)
  t00, t01 = flat[y0 * tw + x0], flat[y0 * tw + x1]
  t10, t11 = flat[y1 * tw + x0], flat[y1 * tw + x1]
  top = t00 + (t01 - t00) * fx
  bottom = t10 + (t11 - t10) * fx
  return top + (bottom - top) * fy


def soft_coverage(dists, sigma):
  """Coverage probability of fragments: 2 * sigmoid(min(d, 0) / sigma); 1 inside, decaying outside.

  Being exactly 1 inside a face (rather than sigmoid(d / sigma)) keeps the interior of a mesh opaque across
  the shared edges of adjacent faces; silhouettes get an outward soft edge of width ~sigma.
  """
  return 2.0 * jax.nn.sigmoid(jnp.minimum(dists, 0.0) / sigma)


def blend(fragments: Fragments, colors, settings: RasterSettings) -> Rendered:
  """Blends per-fragment colours [H, W, K, C] into an image.

  Hard (sigma = 0): colour and depth of the nearest fragment, alpha 1 where one exists.
  Soft: p_k = ``soft_coverage``; alpha = 1 - prod_k (1 - p_k); the foreground colour is
  sum_k w_k c_k with w = softmax_k(log p_k - r_k / gamma), where r_k = z_k / z_min - 1 is the relative depth
  behind the pixel's nearest fragment; rgb = alpha * foreground + (1 - alpha) * background.
  """
  ids = fragments.face_ids
  valid = ids >= 0
  c = colors.shape[-1]
  bg = jnp.asarray(settings.background, colors.dtype)
  if bg.shape[0] not in (1, c):
    raise ValueError(f"background has {bg.shape[0]} channels, texture has {c}")
  bg = jnp.broadcast_to(bg, (c,))
  if settings.is_hard:
    v0 = valid[..., 0]
    rgb = jnp.where(v0[..., None], colors[..., 0, :], bg)
    alpha = v0[..., None].astype(colors.dtype)
    depth = jnp.where(v0, fragments.zbuf[..., 0], 0.0)
    return Rendered(rgb=rgb, alpha=alpha, depth=depth, face_id=ids[..., 0], overflow=fragments.overflow)
  d = fragments.dists
  sigma = settings.sigma
  prob = jnp.where(valid, soft_coverage(d, sigma), 0.0)
  alpha = 1.0 - jnp.prod(1.0 - prob, axis=-1, keepdims=True)
  z = fragments.zbuf
  # The nearest valid depth, through a gather (a min-reduction's gradient can be NaN under XLA).
  nearest = jnp.argmin(jax.lax.stop_gradient(jnp.where(valid, z, jnp.inf)), axis=-1)[..., None]
  zmin = jnp.take_along_axis(jnp.where(valid, z, 1.0), nearest, axis=-1)
  rel = z / zmin - 1.0
  logp = jnp.log(2.0) + jax.nn.log_sigmoid(jnp.minimum(d, 0.0) / sigma)
  logits = jnp.where(valid, logp - rel / settings.gamma, -1e30)
  w = jax.nn.softmax(logits, axis=-1)
  any_valid = jnp.any(valid, axis=-1)
  fg = jnp.einsum("hwk,hwkc->hwc", w, colors)
  rgb = alpha * fg + (1.0 - alpha) * bg
  depth = jnp.where(any_valid, jnp.sum(w * z, -1), 0.0)
  covered = valid & (d >= 0)
  first = jnp.argmax(covered, axis=-1)
  face_id = jnp.where(jnp.any(covered, -1), jnp.take_along_axis(ids, first[..., None], -1)[..., 0], -1)
  return Rendered(rgb=rgb, alpha=alpha, depth=depth, face_id=face_id, overflow=fragments.overflow)


def render_mesh(verts, faces, uvs, uv_faces, texture, camera: Camera, settings: RasterSettings) -> Rendered:
  """Renders a textured triangle mesh.

  Args:
    verts: [V, 3] float vertices in the camera's world frame.
    faces: [F, 3] int32 vertex indices.
    uvs: [U, 2] texture coordinates, (0, 0) = bottom-left of the texture image (OBJ convention).
    uv_faces: [F, 3] int32 indices into ``uvs``.
    texture: [Th, Tw, C] texture image, row 0 at the top.
    camera: a single ``Camera``.
    settings: ``RasterSettings`` (static under jit).
  Returns:
    ``Rendered``. Gradients flow to ``verts``, ``texture`` (and ``uvs``, ``camera``).
  """
  uvs, uv_faces, texture = jnp.asarray(uvs), jnp.asarray(uv_faces), jnp.asarray(texture)
  if texture.ndim != 3:
    raise ValueError(f"texture must be [Th, Tw, C], got {texture.shape}")
  if uv_faces.shape != jnp.shape(faces):
    raise ValueError(f"uv_faces {uv_faces.shape} must match faces {faces.shape}")
  face_uv = uvs[uv_faces]  # [F, 3, 2]
  frags, corner_uv = _rasterize(verts, faces, camera, settings, face_attrs=face_uv)
  if settings.is_hard:
    uv = jnp.einsum("hwc,hwcd->hwd", frags.bary[..., 0, :], corner_uv[..., 0, :, :])[..., None, :]
  else:
    uv = jnp.einsum("hwkc,hwkcd->hwkd", frags.bary, corner_uv)
  colors = sample_texture(texture, uv)
  return blend(frags, colors, settings)
