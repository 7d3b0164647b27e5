"""Texture sampling, soft blending and ``render_mesh``."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from lipflow_jax.geometry.camera import Camera
from lipflow_jax.render.rasterize import (
  evaluate_slots,
  expand,
  fragment_ladder,
  fragment_rung,
  materialize,
  reduce_leading,
  select_slots,
  to_image,
)
from lipflow_jax.render.settings import RasterSettings


class Rendered(NamedTuple):
  """A rendered image. A pytree (vmap/jit friendly).

  Attributes:
    rgb: [H, W, C] colour, composited over ``settings.background``.
    alpha: [H, W, 1] coverage in [0, 1] (exactly 0 or 1 in hard mode).
    depth: [H, W] camera depth of the visible surface (soft: blended with the colour weights), 0
      where no face is near the pixel.
    face_id: [H, W] int32 nearest face covering the pixel centre, -1 for background.
    overflow: [] int32, 0 when no face was dropped (see ``Fragments.overflow``).
  """

  rgb: jax.Array
  alpha: jax.Array
  depth: jax.Array
  face_id: jax.Array
  overflow: jax.Array


# --------------------------------------------------------------------------------------------------
# Bilinear texture sampling with a hand-written gradient: every sample reads one 2 x 2 texel block
# with a single gather, and the texture gradient is one scatter-add of blocks (autodiff of four
# corner lookups would scatter four times and add four texture-sized arrays). The texture is viewed
# as [Th, Tw * C], so that a block is 2 rows of 2 * C contiguous values (XLA:CPU scatters [2, 2 C]
# windows ~1.5x faster than [2, 2, C]).


def _block_coords(th, tw, u, v):
  """Top-left (row, col) of the 2 x 2 block, the weights of its second column / row, and whether the
  coordinate lies between the outermost texel centres (elsewhere the lookup is clamped, i.e.
  flat)."""
  x = u * tw - 0.5
  y = (1.0 - v) * th - 0.5
  col = jnp.clip(jnp.floor(x), 0, tw - 2)
  row = jnp.clip(jnp.floor(y), 0, th - 2)
  fx = jnp.clip(x - col, 0.0, 1.0)  # also maps NaN to a finite weight
  fy = jnp.clip(y - row, 0.0, 1.0)
  inx = (x >= 0) & (x <= tw - 1)
  iny = (y >= 0) & (y <= th - 1)
  return row.astype(jnp.int32), col.astype(jnp.int32), fx, fy, inx, iny


def _block_dnums(ndim):
  window = (ndim, ndim + 1)
  return (
    lax.GatherDimensionNumbers(offset_dims=window, collapsed_slice_dims=(), start_index_map=(0, 1)),
    lax.ScatterDimensionNumbers(
      update_window_dims=window, inserted_window_dims=(), scatter_dims_to_operand_dims=(0, 1)
    ),
  )


@jax.custom_vjp
def _bilinear(texture, u, v):
  """texture [Th, Tw, C] with Th, Tw >= 2; u, v [...] -> tuple of C arrays [...]."""
  return _bilinear_fwd(texture, u, v)[0]


def _bilinear_fwd(texture, u, v):
  th, tw, nc = texture.shape
  row, col, fx, fy, inx, iny = _block_coords(th, tw, u, v)
  idx = jnp.stack([row, col * nc], -1)
  t = lax.gather(
    texture.reshape(th, tw * nc),
    idx,
    _block_dnums(row.ndim)[0],
    slice_sizes=(2, 2 * nc),
    mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
  )  # [..., 2, 2 C]: rows, (column, channel)
  out = []
  for c in range(nc):
    t00, t01, t10, t11 = t[..., 0, c], t[..., 0, nc + c], t[..., 1, c], t[..., 1, nc + c]
    top = t00 + (t01 - t00) * fx
    bottom = t10 + (t11 - t10) * fx
    out.append(top + (bottom - top) * fy)
  return tuple(out), (texture.shape, t, idx, fx, fy, inx, iny)


def _bilinear_bwd(res, cts):
  (th, tw, nc), t, idx, fx, fy, inx, iny = res
  # Computed once: XLA would fuse them (and their producers) into each of the 4 C updates below.
  *cts, fx, fy = materialize(*cts, fx, fy)
  g = jnp.stack(cts, -1)  # [..., C]
  wy = jnp.stack([1.0 - fy, fy], -1)[..., :, None]  # [..., 2, 1]
  upd = (
    jnp.concatenate(
      [(1.0 - fx)[..., None, None] * g[..., None, :], fx[..., None, None] * g[..., None, :]], -1
    )
    * wy
  )  # [..., 2, 2 C]
  d_tex = lax.scatter_add(
    jnp.zeros((th, tw * nc), g.dtype),
    idx,
    upd,
    _block_dnums(fx.ndim)[1],
    mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
  )
  du = dv = 0.0
  for c in range(nc):
    t00, t01, t10, t11 = t[..., 0, c], t[..., 0, nc + c], t[..., 1, c], t[..., 1, nc + c]
    du = du + cts[c] * ((t01 - t00) * (1 - fy) + (t11 - t10) * fy)
    dv = dv + cts[c] * ((t10 - t00) * (1 - fx) + (t11 - t01) * fx)
  du, dv = materialize(
    jnp.where(inx, du * tw, 0.0), jnp.where(iny, dv * -th, 0.0)
  )  # read by 3 + 6 grads
  return d_tex.reshape(th, tw, nc), du, dv


_bilinear.defvjp(_bilinear_fwd, _bilinear_bwd)


def _sample_channels(texture, u, v):
  th, tw, _ = texture.shape
  if th < 2 or tw < 2:  # the 2 x 2 blocks need two texels per axis: repeat the edge
    # (both copies are equal, so the lookup is the same for any coordinate along that axis)
    texture = jnp.pad(texture, ((0, max(0, 2 - th)), (0, max(0, 2 - tw)), (0, 0)), mode="edge")
  return _bilinear(texture, u, v)


def sample_texture(texture, uv):
  """Bilinear texture lookup with clamp-to-edge.

  Args:
    texture: [Th, Tw, C]; row 0 is the *top* of the image (v = 1).
    uv: [..., 2] texture coordinates; (0, 0) is the bottom-left corner of the image, (1, 1) the
      top-right (OBJ convention). Texel (row r, column c) has its centre at u = (c + 0.5) / Tw, v =
      1 - (r + 0.5) / Th.
  Returns:
    [..., C] in the texture's dtype. Gradients flow to ``texture`` and ``uv``.
  """
  texture, uv = jnp.asarray(texture), jnp.asarray(uv)
  if texture.ndim != 3:
    raise ValueError(f"texture must be [Th, Tw, C], got {texture.shape}")
  return jnp.stack(_sample_channels(texture, uv[..., 0], uv[..., 1]), -1)


# --------------------------------------------------------------------------------------------------
# Blending.


def soft_coverage(dists, sigma):
  """Coverage probability of fragments: 2 * sigmoid(min(d, 0) / sigma); 1 inside, decaying outside.

  Being exactly 1 inside a face (rather than sigmoid(d / sigma)) keeps the interior of a mesh opaque
  across the shared edges of adjacent faces; silhouettes get an outward soft edge of width ~sigma.
  """
  return 2.0 * jax.nn.sigmoid(jnp.minimum(dists, 0.0) / sigma)


class _Layout(NamedTuple):
  """Where the fragments of ``soft_blend`` sit. Dense (``column`` None): arrays [K, ...], slot k of
  each pixel at index k. Compacted: flat arrays [N] with ``column [N]`` the pixel (``num_pixels``
  for unused entries,
  which are dropped) and ``first [N]`` whether the fragment is its pixel's slot 0."""

  column: jax.Array = None
  first: jax.Array = None
  num_pixels: int = 0

  def sum(self, x):  # per fragment -> per pixel
    if self.column is None:
      return _slot_sum(x)
    return jax.ops.segment_sum(
      x.astype(jnp.float32) if x.dtype == jnp.bool_ else x, self.column, self.num_pixels
    )

  def max(self, x):
    if self.column is None:
      return jnp.max(x, axis=0)
    return jax.ops.segment_max(x, self.column, self.num_pixels)

  def any(self, x):  # bool per fragment -> per pixel
    if self.column is None:
      return reduce_leading(x, jnp.logical_or)
    return self.sum(x) > 0

  def bcast(self, p):  # per pixel -> per fragment
    if self.column is None:
      return p[None]
    return p[jnp.minimum(self.column, self.num_pixels - 1)]

  def first_of(self, x):  # the slot-0 fragment's value per pixel (0 / False where none)
    if self.column is None:
      return x[0]
    return self.sum(jnp.where(self.first, x, jnp.zeros((), x.dtype))).astype(x.dtype)

  def add_to_first(self, g, v):  # g per fragment + v (per pixel) on each pixel's slot-0 fragment
    if self.column is None:
      return g.at[0].add(v)
    return g + jnp.where(self.first, self.bcast(v), 0.0)


def _soft_terms(dist, depth, valid, sigma, gamma, lay):
  """Per fragment s = sigmoid(min(d, 0) / sigma), 1 - p, logits; and the reference depth z0 per
  pixel."""
  z0 = jnp.where(lay.first_of(valid), lay.first_of(depth), 1.0)
  dn = jnp.minimum(jnp.where(valid, dist, -1.0), 0.0) / sigma
  s = jax.nn.sigmoid(dn)
  om = jnp.where(valid, 1.0 - 2.0 * s, 1.0)
  # log sigmoid(dn) for dn <= 0, written out: XLA:CPU emits jax.nn.log_sigmoid (logaddexp), and
  # log1p inside larger fusions, as scalar code (this fusion: ~7 ms -> ~1 ms at 512 x 512, K = 8
  # with budgets).
  log_s = dn - jnp.log(1.0 + jnp.exp(dn))
  logit = math.log(2.0) + log_s - (depth / lay.bcast(z0) - 1.0) / gamma
  return s, om, jnp.where(valid, logit, -1e30), z0


# Sums over the K slots are dot products with a vector of ones: XLA:CPU hands reduce ops over the
# slot axis to YNNPACK fusions that are several times slower (512 x 512, K = 8: the blend's forward
# + backward ~200 ms with reduce ops, ~70 ms with dots, measured alone). Unrolled sums or
# elementwise trees are worse still: XLA fuses the slot chains into each consumer and recomputes
# them per output element (seconds; optimization barriers do not survive on CPU). A dot materialises
# its operand and result.


def _slot_sum(x):
  """Sum of ``x [K, ...]`` over the slots (float)."""
  x = x.astype(jnp.float32) if x.dtype == jnp.bool_ else x
  return jnp.tensordot(
    jnp.ones((x.shape[0],), x.dtype), x, axes=(0, 0), precision=lax.Precision.HIGHEST
  )


def soft_blend(
  dist, depth, valid, colors, sigma, gamma, background, column=None, first=None, num_pixels=0
):
  """SoftRas-style aggregation of the fragments of each pixel.

  p_k = ``soft_coverage(d_k)``; alpha = 1 - prod_k (1 - p_k); foreground = sum_k w_k c_k with
  w = softmax_k(log p_k - r_k / gamma), r_k = z_k / z_0 - 1 the depth relative to slot 0 (the
  nearest); rgb = alpha * foreground + (1 - alpha) * background; depth = sum_k w_k z_k (0 where no
  slot is valid). The gradient is written by hand (autodiff of the product divides by 1 - p_k, which
  is 0 inside a face).

  Args:
    dist, depth: [K, ...] float (slot-major; any pixel shape) or, compacted, [N]; valid: bool, same
      shape;
    colors: [C, K, ...] or [C, N]; sigma, gamma: floats; background: tuple of C floats.
    column, first, num_pixels: for compacted fragments, the pixel [N] int32 of each fragment
      (``num_pixels`` for unused entries), whether it is its pixel's slot 0 [N] bool, and the pixel
      count.
  Returns:
    (rgb [..., C], alpha [...], depth [...]) per pixel ([num_pixels, C], ... when compacted).
  """
  return _soft_blend(
    dist, depth, valid, colors, column, first, sigma, gamma, background, num_pixels
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _soft_blend(dist, depth, valid, colors, column, first, sigma, gamma, background, num_pixels):
  return _soft_blend_fwd(
    dist, depth, valid, colors, column, first, sigma, gamma, background, num_pixels
  )[0]


def _soft_blend_fwd(
  dist, depth, valid, colors, column, first, sigma, gamma, background, num_pixels
):
  lay = _Layout(column, first, num_pixels)
  _, om, logit, _ = _soft_terms(dist, depth, valid, sigma, gamma, lay)
  zeros = lay.sum((om == 0).astype(om.dtype))
  log_nz = lay.sum(jnp.log(jnp.where(om == 0, 1.0, jnp.abs(om))))
  alpha = 1.0 - jnp.where(zeros > 0, 0.0, jnp.exp(log_nz))
  e = jnp.exp(logit - lay.bcast(lay.max(logit)))
  w = jnp.where(valid, e / lay.bcast(lay.sum(e)), 0.0)  # (unused compacted entries: e / 0)
  # Per channel: XLA:CPU's library reduction mis-broadcasts w[None] * colors over channels (jit
  # only).
  fg = jnp.stack([lay.sum(w * colors[c]) for c in range(colors.shape[0])])  # [C, ...]
  bg = jnp.asarray(background, fg.dtype).reshape((-1,) + (1,) * (fg.ndim - 1))
  rgb = jnp.moveaxis(alpha * fg + (1.0 - alpha) * bg, 0, -1)
  any_valid = lay.any(valid)
  dep = jnp.where(any_valid, lay.sum(w * depth), 0.0)
  res = (dist, depth, valid, colors, column, first, w, alpha, fg, any_valid, zeros, log_nz)
  return (rgb, alpha, dep), res


def _soft_blend_bwd(sigma, gamma, background, num_pixels, res, cts):
  dist, depth, valid, colors, column, first, w, alpha, fg, any_valid, zeros, log_nz = res
  lay = _Layout(column, first, num_pixels)
  g_rgb, g_alpha, g_dep = cts
  s, om, _, z0 = _soft_terms(dist, depth, valid, sigma, gamma, lay)
  g_rgb = jnp.moveaxis(g_rgb, -1, 0)  # [C, ...]
  bg = jnp.asarray(background, fg.dtype).reshape((-1,) + (1,) * (fg.ndim - 1))
  nc = colors.shape[0]
  g_a = g_alpha
  for c in range(nc):  # channel sums unrolled: C is small
    g_a = g_a + g_rgb[c] * (fg[c] - bg[c])
  g_fg = [lay.bcast(alpha * g_rgb[c]) for c in range(nc)]  # per fragment
  g_colors = [w * g_fg[c] for c in range(nc)]
  g_dep = lay.bcast(jnp.where(any_valid, g_dep, 0.0))
  g_w = g_dep * depth
  for c in range(nc):
    g_w = g_w + g_fg[c] * colors[c]
  g_logit = w * (g_w - lay.bcast(lay.sum(w * g_w)))
  # prod_{j != k} (1 - p_j) without dividing by a zero (1 - p_k = 0 inside a face).
  nz, zeros = lay.bcast(jnp.exp(log_nz)), lay.bcast(zeros)
  others = jnp.where(
    om == 0,
    jnp.where(zeros == 1, nz, 0.0),
    jnp.where(zeros == 0, nz / jnp.where(om == 0, 1.0, om), 0.0),
  )
  g_p = lay.bcast(g_a) * others
  g_dn = 2.0 * g_p * s * (1.0 - s) + g_logit * (1.0 - s)
  g_dist = jnp.where(valid & (dist < 0), g_dn / sigma, 0.0)
  gl = jnp.where(valid, g_logit, 0.0)
  g_depth = g_dep * w - gl / (gamma * lay.bcast(z0))
  z0_term = lay.sum(gl * depth) / (gamma * z0 * z0)
  g_depth = lay.add_to_first(g_depth, jnp.where(lay.first_of(valid), z0_term, 0.0))
  if column is not None:
    # Each read by several consumers; materialised in the compacted layout only (dense: measured
    # slower).
    g_dist, g_depth, *g_colors = materialize(g_dist, g_depth, *g_colors)
  return g_dist, g_depth, None, jnp.stack(g_colors), None, None


_soft_blend.defvjp(_soft_blend_fwd, _soft_blend_bwd)


def _face_id(slots, dist):
  """The nearest slot covering the pixel centre (``dist [S, Q]`` >= 0), -1 if none: [Q]."""
  face_id = jnp.full(slots.ids.shape[1:], -1, jnp.int32)
  for i in reversed(range(slots.ids.shape[0])):
    face_id = jnp.where(slots.valid[i] & (dist[i] >= 0), slots.ids[i], face_id)
  return face_id


def render_mesh(
  verts, faces, uvs, uv_faces, texture, camera: Camera, settings: RasterSettings
) -> Rendered:
  """Renders a textured triangle mesh.

  Hard mode (sigma = 0): colour and depth of the nearest face, alpha 1 where one covers the pixel
  centre. Soft mode: ``soft_blend`` of the K fragments per pixel.

  Args:
    verts: [V, 3] float vertices in the camera's world frame.
    faces: [F, 3] int32 vertex indices.
    uvs: [U, 2] texture coordinates, (0, 0) = bottom-left of the texture image (OBJ convention).
    uv_faces: [F, 3] int32 indices into ``uvs``.
    texture: [Th, Tw, C] texture image, row 0 at the top.
    camera: a single ``Camera``.
    settings: ``RasterSettings`` (static under jit).
  Returns:
    ``Rendered``; gradients flow to ``verts``, ``texture`` (and ``uvs``, ``camera``).
  """
  uvs, uv_faces, texture = jnp.asarray(uvs), jnp.asarray(uv_faces), jnp.asarray(texture)
  if texture.ndim != 3:
    raise ValueError(f"texture must be [Th, Tw, C], got {texture.shape}")
  if uv_faces.shape != jnp.shape(faces):
    raise ValueError(f"uv_faces {uv_faces.shape} must match faces {jnp.shape(faces)}")
  nc = texture.shape[-1]
  bg = tuple(settings.background)
  if len(bg) not in (1, nc):
    raise ValueError(f"settings.background has {len(bg)} channels, the texture has {nc}")
  bg = bg * nc if len(bg) == 1 else bg
  face_uv = uvs[uv_faces].reshape(-1, 6)  # [F, 6]: u0 v0 u1 v1 u2 v2
  sel = select_slots(verts, faces, camera, settings, num_slots=1 if settings.is_hard else None)
  if settings.fragment_budget is not None:
    slots, overflow = evaluate_slots(sel, settings, face_uv)
    rgb, alpha, depth, face_id = _shade(slots, texture, settings, bg)
    return Rendered(rgb, alpha, depth, face_id, overflow)
  # Automatic fragment budget: the smallest rung of the ladder that holds the non-empty slots (no
  # slot is dropped), one compiled branch per rung; the backward recomputes the branch's forward.
  rungs = fragment_ladder(sel.ids.size, settings)

  def branch(budget):
    def run(diff, const):
      proj, face_uv, texture = diff
      ids, pixel_column, column_pixel = const
      s = sel._replace(proj=proj, ids=ids, pixel_column=pixel_column, column_pixel=column_pixel)
      slots, _ = evaluate_slots(s, settings, face_uv, budget)
      rgb, alpha, depth, face_id = _shade(slots, texture, settings, bg)
      return rgb, alpha, depth, face_id.astype(rgb.dtype)  # (switch_remat: float outputs)

    return run

  diff = (sel.proj, face_uv, texture)
  const = (sel.ids, sel.pixel_column, sel.column_pixel)
  if len(rungs) == 1:
    rgb, alpha, depth, face_id = branch(None)(diff, const)
  else:
    rung = fragment_rung(sel.ids, rungs)
    rgb, alpha, depth, face_id = switch_remat(rung, [branch(b) for b in rungs], diff, const)
  return Rendered(rgb, alpha, depth, face_id.astype(jnp.int32), sel.overflow)


def _shade(slots, texture, settings: RasterSettings, bg):
  """Texturing and blending of evaluated ``slots`` ([S, *Q] or compacted). Returns (rgb [H, W, C],
  alpha [H, W, 1], depth [H, W], face_id [H, W] int32)."""
  nc = texture.shape[-1]
  b, a = slots.bary, slots.attrs  # per evaluated fragment
  u = b[0] * a[0] + b[1] * a[2] + b[2] * a[4]
  v = b[0] * a[1] + b[1] * a[3] + b[2] * a[5]
  colors = _sample_channels(texture.astype(u.dtype), u, v)
  if settings.is_hard:
    colors, depth = [expand(slots, c) for c in colors], expand(slots, slots.depth)  # [1, *Q]
    v0 = slots.valid[0]
    rgb = jnp.stack([jnp.where(v0, colors[c][0], bg[c]) for c in range(nc)])  # [C, *Q]
    alpha, depth, face_id = (
      v0.astype(u.dtype),
      jnp.where(v0, depth[0], 0.0),
      jnp.where(v0, slots.ids[0], -1),
    )
  elif slots.pos is None:  # every slot evaluated: blend [K, *Q]
    dist = slots.dist
    rgb, alpha, depth = soft_blend(
      dist, slots.depth, slots.valid, jnp.stack(colors), settings.sigma, settings.gamma, bg
    )
    rgb, face_id = jnp.moveaxis(rgb, -1, 0), _face_id(slots, dist)
  else:  # compacted fragments: blend them in place, with per-pixel sums as segment sums
    col_shape = slots.ids.shape[1:]
    num_pixels, total = math.prod(col_shape), slots.ids.size
    used = slots.pos < total
    column = jnp.where(used, slots.pos % num_pixels, num_pixels)
    rgb, alpha, depth = soft_blend(
      slots.dist,
      slots.depth,
      used,
      jnp.stack(colors),
      settings.sigma,
      settings.gamma,
      bg,
      column=column,
      first=slots.pos < num_pixels,
      num_pixels=num_pixels,
    )
    # The nearest slot covering the pixel centre.
    slot = jnp.where(used & (slots.dist >= 0), slots.pos // num_pixels, slots.ids.shape[0])
    best = jax.ops.segment_min(slot, column, num_pixels)  # [Q]; > S - 1 where none
    ids = slots.ids.reshape(slots.ids.shape[0], num_pixels)
    face_id = jnp.where(
      best < ids.shape[0],
      jnp.take_along_axis(ids, jnp.minimum(best, ids.shape[0] - 1)[None], axis=0)[0],
      -1,
    )
    unflat = lambda x: x.reshape(x.shape[:-1] + col_shape)
    rgb, alpha, depth, face_id = (
      unflat(jnp.moveaxis(rgb, -1, 0)),
      unflat(alpha),
      unflat(depth),
      unflat(face_id),
    )
  return (
    jnp.moveaxis(to_image(slots, rgb, bg), 0, -1),
    to_image(slots, alpha)[..., None],
    to_image(slots, depth),
    to_image(slots, face_id, -1),
  )


def switch_remat(index, branches, diff, const):
  """``lax.switch(index, branches, diff, const)``, differentiable with respect to ``diff`` (float
  pytree); ``const`` holds integer arrays (no gradient). Only the inputs are kept for the backward,
  which recomputes the taken branch's forward: reverse-mode ``lax.switch`` would make every branch
  output (zero-filled) residuals of every other branch, as large as the largest. The backward
  differentiates only the leaves of ``diff`` that the caller differentiates (e.g. not constant
  texture coordinates) and only the outputs that it uses (JAX's symbolic zeros), so that it does no
  work whose result would be dropped.

  Args:
    index: [] int32, unbatched (see ``rasterize._batch_max``).
    branches: callables (diff, const) -> pytree of float arrays, one output structure.
  """
  primal = lambda x: isinstance(x, jax.custom_derivatives.CustomVJPPrimal)
  zero = lambda x: isinstance(x, jax.custom_derivatives.SymbolicZero)

  @jax.custom_vjp
  def run(diff, const, index):
    return lax.switch(index, branches, diff, const)

  def fwd(diff, const, index):  # symbolic zeros: leaves are CustomVJPPrimal
    value = lambda tree: jax.tree.map(lambda p: p.value, tree, is_leaf=primal)
    # which leaves of diff are differentiated, as pytree structure: () yes, None no
    perturbed = tuple(() if p.perturbed else None for p in jax.tree.leaves(diff, is_leaf=primal))
    diff, const, index = value(diff), value(const), value(index)
    return run(diff, const, index), (diff, const, index, perturbed)

  def bwd(res, ct):
    diff, const, index, perturbed = res
    leaves, treedef = jax.tree.flatten(diff)
    wrt = [p is not None for p in perturbed]
    cts = jax.tree.leaves(ct, is_leaf=zero)
    used = [not zero(g) for g in cts]
    if not any(used):
      return jax.tree.map(jnp.zeros_like, diff), None, None

    def pullback(branch, live, const, g):
      """The vjp of ``branch``'s used outputs with respect to the differentiated leaves."""

      def fn(live):
        it = iter(live)
        out = branch(treedef.unflatten([next(it) if w else x for w, x in zip(wrt, leaves)]), const)
        return [o for o, u in zip(jax.tree.leaves(out), used) if u]

      return jax.vjp(fn, live)[1](g)[0]

    live = [x for w, x in zip(wrt, leaves) if w]
    g = [c for c, u in zip(cts, used) if u]
    grads = iter(
      lax.switch(index, [lambda *a, br=br: pullback(br, *a) for br in branches], live, const, g)
    )
    out = [next(grads) if w else jnp.zeros_like(x) for w, x in zip(wrt, leaves)]
    return treedef.unflatten(out), None, None

  run.defvjp(fwd, bwd, symbolic_zeros=True)
  return run(diff, const, index)
