"""Tile-binned, differentiable rasterization of triangle meshes (SoftRas / PyTorch3D style).

Pipeline of ``rasterize`` (H x W image, F faces, tiles / chunks of T x T pixels, cap M, K faces per
pixel):

1. Project the vertices with the camera (pixels, x right, y down, origin at the top-left pixel's
corner).
2. Selection, without gradient. A face is *near* a pixel centre if the centre is within
``blur_radius`` of
   each of its three edge lines (inner side) and of its bounding box (blur 0: inside the closed
   triangle). Within a tile / chunk these tests and the face's inverse depth are affine in the pixel
   coordinates. Slot 0 is the nearest face *covering* the pixel centre (inside the closed triangle)
   or, where none does, the near face with the largest signed distance (highest coverage); slots 1
   .. K - 1 take the other near faces in order of minimum vertex depth; the K are then sorted
   nearest first (see ``select_faces``).
   - K > 1 (``bin_faces`` + ``select_faces``): (face, tile) pairs from the faces' bounding boxes, in
   order
     of minimum vertex depth, sorted by tile; each tile keeps M candidates ``[n_tiles, M]`` (more:
     the M with the smallest minimum depth, counted in ``overflow``). All (candidate, pixel) tests
     of all tiles run in one fused pass ``[M, n_tiles, T*T]`` reduced to an integer max (slot 0) and
     candidate bit masks. With ``heavy_tile_budget`` < 1 it runs in two passes: every tile among its
     first M / 4 candidates, then only the tiles with more (compacted) among all M.
   - K > 1 without a cap (``max_faces_per_tile=None``, the default; ``select_blocks``): the same
     sorted pairs, tested 32 candidates at a time in ``lax.while_loop``s over blocks of tiles
     (first chunks of all tiles that hold faces, then the second chunks of the crowded ones, ...),
     merging a running best key and the first K near candidates per pixel: no cap, no overflow,
     and the work is what the view holds.
   - K = 1 (``select_nearest``): each face's bounding box is covered by T x T chunks; all chunks are
   tested at once and a scatter-max of the same key picks slot 0 per pixel (no sort, no per-tile
     padding).
3. Evaluation, with gradient: only the K selected faces per pixel are evaluated from the projected
   vertices (one gather of 9 numbers per fragment, one scatter-add back, a hand-written backward):
   perspective-correct barycentrics, signed distance and depth. Memory is O(K * H * W).
   With budgets below 1 (``RasterSettings.tile_budget``, ``fragment_budget``), selection runs over
   the tiles that hold faces only, and evaluation, texturing and blending over the non-empty slots
   only, compacted (``Slots``; ``render.occupancy`` measures what a view needs, ``fit_budgets``
   turns that into settings).
   ``fragment_budget=None`` (the default) sizes the compacted buffer per call from a short static
   ladder (``fragment_ladder``; ``render_mesh`` switches between the rungs, ``shade.switch_remat``).

Numerics: divisions go through ``safe_div`` / ``safe_sqrt``; empty slots evaluate a harmless dummy
triangle, degenerate and behind-the-camera faces are never selected, minima are pairwise (a
min-reduction's gradient can divide by a zero tie count under XLA), and no quantity is clamped as
1 / max(x, eps) with a tiny eps (its derivative overflows to inf, and inf times a zero cotangent is
NaN), so gradients are finite everywhere, eagerly and under jit.
Small reductions are written elementwise because XLA:CPU routes reductions to a slow library kernel.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from lipflow_jax.geometry.camera import Camera, project_with_depth
from lipflow_jax.numerics import safe_div, safe_sqrt
from lipflow_jax.render.settings import RasterSettings

# Faces whose projected doubled area is below this (pixels^2) are culled as degenerate.
AREA_EPS = 1e-6
# ``dists`` of empty fragment slots.
EMPTY_DIST = -1e6
# Safety margin (pixels) added to the blur radius when binning, so that binning never misses a face
# that the exact per-pixel test keeps.
_BIN_MARGIN = 1e-3


class Fragments(NamedTuple):
  """Per-pixel fragments, nearest first. A pytree (vmap/jit friendly).

  Attributes:
    face_ids: [H, W, K] int32 face index, -1 for an empty slot.
    bary: [H, W, K, 3] perspective-correct barycentrics. For pixels outside the face (within the
      blur radius) the screen-space barycentrics are clipped to the face first, so they lie in [0,
      1] and sum to 1 everywhere; 0 for empty slots.
    dists: [H, W, K] signed distance in pixels from the pixel centre to the face's boundary,
      positive inside; ``EMPTY_DIST`` (-1e6) for empty slots.
    zbuf: [H, W, K] camera depth of the fragment (at the clipped barycentrics), 0 for empty slots.
    overflow: [] int32, 0 when no face was dropped: K > 1, the number of tiles that did not keep all
      their candidates (``max_faces_per_tile``); K = 1, the number of pixel chunks beyond the chunk
      budget.
  """

  face_ids: jax.Array
  bary: jax.Array
  dists: jax.Array
  zbuf: jax.Array
  overflow: jax.Array


# --------------------------------------------------------------------------------------------------
# Numerically safe helpers.


def _cross2(a, b):
  return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


# Small reductions (over 2 or 3 values) are written elementwise: XLA:CPU hands reductions to a
# library kernel that materialises its (large) fused operands, which costs far more than the
# arithmetic.
def _min3(a, b, c):
  return jnp.minimum(jnp.minimum(a, b), c)


def _max3(a, b, c):
  return jnp.maximum(jnp.maximum(a, b), c)


def materialize(*xs):
  """The arrays ``xs`` (one shape and dtype) computed once, through an identity dot product.

  XLA:CPU has no multi-output fusion: arrays that several consumers read are fused into each of them
  and recomputed per output element, and it removes optimization barriers. A dot's operand and
  result are materialised, so the consumers read them from memory instead.
  """
  x = jnp.stack(xs)
  x = jnp.tensordot(
    jnp.eye(len(xs), dtype=x.dtype), x, axes=(1, 0), precision=lax.Precision.HIGHEST
  )
  return tuple(x[i] for i in range(len(xs)))


# Reductions over a short leading axis as halving trees of elementwise ops rather than reduce ops:
# XLA:CPU hands such reduce ops to YNNPACK fusions that are several times slower, while the tree
# fuses with its operand's producers, so the [N, ...] operand is never materialised (selection at
# 512 x 512, K = 8: the [M, n_tiles, T*T] pass ~200 -> ~110 ms). XLA also fuses the tree into each
# consumer, recomputing it per output element: use it only where the consumers are few and cheap
# (see ``shade._slot_sum`` otherwise).
def reduce_leading(x, op):
  """``op``-reduction of ``x [N, ...]`` over its leading axis (``op`` elementwise, associative)."""
  while x.shape[0] > 1:
    half = x.shape[0] // 2
    y = op(x[:half], x[half : 2 * half])
    x = jnp.concatenate([y, x[2 * half :]]) if x.shape[0] % 2 else y
  return x[0]


def cumsum(x, axis=0):
  """Inclusive prefix sum of ``x`` along ``axis``, as a parallel scan (``lax.associative_scan``).
  XLA:CPU runs ``jnp.cumsum`` as a reduce-window, ~4x slower on large arrays (the 1M fragment slots
  of 512 x 512 at K = 8: 5.1 -> 1.3 ms; the view's forward + backward ~15 ms faster) and no faster
  on small ones."""
  return lax.associative_scan(jnp.add, x, axis=axis % x.ndim)


# --------------------------------------------------------------------------------------------------
# Projection.


def project_faces(verts, faces, camera: Camera):
  """Projects a mesh's faces. Returns (xy [F, 3, 2] pixels, z [F, 3] camera depth)."""
  xy, z = project_with_depth(camera, verts)
  return xy[faces], z[faces]


def _grid(settings: RasterSettings):
  h, w = settings.image_size
  t = settings.tile_size
  return -(-h // t), -(-w // t)


def _face_validity(xy, z, settings: RasterSettings):
  """[F] bool: in front of znear, non-degenerate, finite (and front-facing if culling back
  faces)."""
  area2 = _cross2(xy[:, 1] - xy[:, 0], xy[:, 2] - xy[:, 0])
  ok = (z[:, 0] > settings.znear) & (z[:, 1] > settings.znear) & (z[:, 2] > settings.znear)
  ok &= jnp.abs(area2) > AREA_EPS  # also False for NaN
  ok &= jnp.isfinite(area2) & jnp.isfinite(z[:, 0] + z[:, 1] + z[:, 2])
  if settings.cull_backfaces:
    ok &= area2 < 0  # counter-clockwise from outside = clockwise on screen (y down)
  return ok


# --------------------------------------------------------------------------------------------------
# 2. Binning (no gradient).


def _pair_budget(num_faces, settings: RasterSettings):
  """Static number of (face, tile) pairs generated by binning."""
  nty, ntx = _grid(settings)
  n_tiles, m = nty * ntx, settings.max_faces_per_tile or 64
  per_face = math.ceil((16.0 / settings.tile_size + 1.0) ** 2)  # faces up to ~16 px across
  return int(min(n_tiles * m, (per_face * num_faces + 2 * n_tiles) * max(1, m // 64)))


def _face_boxes(xy, z, settings: RasterSettings):
  """Per face: validity [F], pixel column/row ranges c0, c1 [F, 2] int32 (inclusive, clipped to the
  image) of the pixel centres within the blur radius of its bounding box, and the order of
  increasing minimum vertex depth [F] int32 (invalid faces last)."""
  valid, c0, c1 = _face_rects(xy, z, settings)
  zmin = jnp.where(valid, _min3(z[:, 0], z[:, 1], z[:, 2]), jnp.inf)
  order = jnp.argsort(zmin).astype(jnp.int32)
  return valid, c0, c1, order


def _face_rects(xy, z, settings: RasterSettings):
  """``_face_boxes`` without the depth order: (valid [F] (also False for faces whose grown box
  misses the image), c0, c1 [F, 2] int32)."""
  h, w = settings.image_size
  r = settings.blur_radius + _BIN_MARGIN
  valid = _face_validity(xy, z, settings)
  lo, hi = _min3(xy[:, 0], xy[:, 1], xy[:, 2]), _max3(xy[:, 0], xy[:, 1], xy[:, 2])  # [F, 2]
  size = jnp.array([w, h], xy.dtype)
  c0 = jnp.ceil(jnp.clip(lo - r - 0.5, -1.0, size))
  c1 = jnp.floor(jnp.clip(hi + r - 0.5, -1.0, size))
  ok = (c0 <= c1) & (c1 >= 0) & (c0 <= size - 1)
  valid &= ok[:, 0] & ok[:, 1]
  c0 = jnp.maximum(c0, 0).astype(jnp.int32)
  c1 = jnp.minimum(c1, size - 1).astype(jnp.int32)
  return valid, c0, c1


def _enumerate(counts, budget):
  """Enumerates ``counts [F]`` items per entry: for j < budget, (entry s, index within entry, in
  range)."""
  incl = cumsum(counts)
  j = jnp.arange(budget, dtype=jnp.int32)
  s = jnp.minimum(jnp.searchsorted(incl, j, side="right"), counts.shape[0] - 1).astype(jnp.int32)
  return s, j - (incl - counts)[s], j < incl[-1], incl[-1]


def bin_faces(xy, z, settings: RasterSettings):
  """Candidate faces per screen tile (used when K > 1).

  A face is a candidate of every tile that its screen bounding box, grown by the blur radius,
  touches. (face, tile) pairs are generated face by face in order of the face's minimum vertex depth
  (at most ``_pair_budget`` of them; the farthest faces are dropped first) and sorted by tile; each
  tile keeps its first ``max_faces_per_tile``.

  Args:
    xy: [F, 3, 2] projected vertices (pixels); z: [F, 3] depths. Treated as constants.
    settings: raster settings.
  Returns:
    (cand [n_tiles, M] int32 face ids in order of minimum depth, -1 padded; overflow [] int32 = the
    number of tiles that did not keep all their candidate faces). Tiles are numbered row-major over
    the (ceil(H / T), ceil(W / T)) tile grid.
  """
  return _bin_faces(xy, z, settings)[:2]


def _bin_faces(xy, z, settings: RasterSettings, budget=None):
  """``bin_faces``, and the number of candidate faces of each tile [n_tiles] int32 (also beyond the
  cap). ``budget``: static number of (face, tile) pairs (default ``_pair_budget``). With
  ``max_faces_per_tile=None`` the candidates are (face [budget] int32 sorted by tile, then depth
  order; starts [n_tiles + 1] int32: tile i's are face[starts[i]:starts[i + 1]]) instead."""
  xy, z = lax.stop_gradient(xy), lax.stop_gradient(z)
  t, m = settings.tile_size, settings.max_faces_per_tile
  nty, ntx = _grid(settings)
  n_tiles = nty * ntx
  f = xy.shape[0]
  valid, c0, c1, order = _face_boxes(xy, z, settings)
  t0, t1 = c0 // t, c1 // t  # [F, 2] tile ranges (x, y)
  tw = t1[:, 0] - t0[:, 0] + 1
  n_pairs = jnp.where(valid, tw * (t1[:, 1] - t0[:, 1] + 1), 0)

  # Exact per-tile demand from a 2D prefix sum of the boxes' corners.
  ones = valid.astype(jnp.int32)
  hist = jnp.zeros((nty + 1, ntx + 1), jnp.int32)
  hist = hist.at[t0[:, 1], t0[:, 0]].add(ones)
  hist = hist.at[t0[:, 1], t1[:, 0] + 1].add(-ones)
  hist = hist.at[t1[:, 1] + 1, t0[:, 0]].add(-ones)
  hist = hist.at[t1[:, 1] + 1, t1[:, 0] + 1].add(ones)
  demand = cumsum(cumsum(hist, axis=0), axis=1)[:nty, :ntx].reshape(-1)

  # (face, tile) pairs in order of the face's minimum depth.
  budget = _pair_budget(f, settings) if budget is None else budget
  s, local, live, _ = _enumerate(n_pairs[order], budget)
  face = order[s]
  wt = jnp.maximum(tw[face], 1)
  tile = (t0[face, 1] + local // wt) * ntx + (t0[face, 0] + local % wt)
  tile = jnp.where(live, tile, n_tiles)
  if (n_tiles + 1) * f < 2**31:  # one packed int32 key: much faster than a stable two-operand sort
    packed = lax.sort(tile * f + s)
    tile, face = packed // f, order[packed % f]
  else:
    tile, face = lax.sort((tile, face), num_keys=1, is_stable=True)
  starts = jnp.searchsorted(tile, jnp.arange(n_tiles + 1, dtype=jnp.int32), side="left").astype(
    jnp.int32
  )
  if m is None:  # the sorted pairs (``select_blocks``): every tile keeps all its candidates
    overflow = jnp.sum(starts[1:] - starts[:-1] < demand).astype(jnp.int32)
    return (face, starts), overflow, demand
  slot = jnp.arange(m, dtype=jnp.int32)
  idx = starts[:-1, None] + slot
  cand = jnp.where(idx < starts[1:, None], face[jnp.minimum(idx, budget - 1)], -1)
  kept = jnp.minimum(starts[1:] - starts[:-1], m)
  overflow = jnp.sum(kept < demand).astype(jnp.int32)
  return cand, overflow, demand


# --------------------------------------------------------------------------------------------------
# 3. Selection (no gradient).


def _planes(xy, z, ids, origin, settings: RasterSettings):
  """Constants of faces ``ids [...]`` (-1 = empty) in pixel coordinates relative to ``origin [...,
  2]``.

  Returns (abc, zlo, zhi, box), arrays of the shape of ``ids``: abc[i] = (a, b, c) with value a*x +
  b*y + c for the signed edge distances i = 0, 1, 2 (pixels, positive inside) and the inverse depth
  i = 3; [zlo, zhi] the face's inverse-depth range; box = (xlo, xhi, ylo, yhi) its bounding box
  grown by the blur radius. Empty slots get an edge that excludes every pixel.
  """
  c = jnp.maximum(ids, 0)
  return _planes_of(xy[c] - origin[..., None, :], z[c], ids >= 0, settings)


def _planes_of(a, zc, valid, settings: RasterSettings):
  """``_planes`` from the gathered corners: ``a [..., 3, 2]`` relative to the origin, ``zc [...,
  3]`` their depths, ``valid [...]`` (False = empty)."""
  inv_z = 1.0 / jnp.maximum(zc, settings.znear)  # [..., 3]
  area2 = _cross2(a[..., 1, :] - a[..., 0, :], a[..., 2, :] - a[..., 0, :])
  sgn = jnp.where(area2 < 0, -1.0, 1.0).astype(a.dtype)
  inv_area2 = safe_div(1.0, area2)
  abc, w = [], [0.0, 0.0, 0.0]
  for i in range(3):
    p, q = a[..., (i + 1) % 3, :], a[..., (i + 2) % 3, :]
    e = q - p
    # E_i(x, y) = e_x (y - p_y) - e_y (x - p_x) = -e_y x + e_x y + (e_y p_x - e_x p_y)
    coefs = (-e[..., 1], e[..., 0], e[..., 1] * p[..., 0] - e[..., 0] * p[..., 1])
    scale = sgn / jnp.maximum(jnp.sqrt(e[..., 0] * e[..., 0] + e[..., 1] * e[..., 1]), 1e-12)
    abc.append(tuple(k * scale for k in coefs))
    wi = inv_area2 * inv_z[..., i]
    w = [acc + k * wi for acc, k in zip(w, coefs)]
  abc.append(tuple(w))
  abc[0] = (abc[0][0], abc[0][1], jnp.where(valid, abc[0][2], -1e30))
  r = settings.blur_radius
  lo = _min3(a[..., 0, :], a[..., 1, :], a[..., 2, :]) - r
  hi = _max3(a[..., 0, :], a[..., 1, :], a[..., 2, :]) + r
  box = (lo[..., 0], hi[..., 0], lo[..., 1], hi[..., 1])
  iz = (inv_z[..., 0], inv_z[..., 1], inv_z[..., 2])
  return abc, _min3(*iz), _max3(*iz), box


# Selection keys (int32, > 0 for a near face; larger = preferred): a face covering the pixel centre
# beats every face that only comes within the blur radius; among covering faces the nearer (larger
# inverse depth) wins, among the others the one closer to the pixel (larger signed distance). Bit
# layout: covering = 2^30 + (float bits of the inverse depth >> 1), which orders like the inverse
# depth; not covering = 2^20 + the signed distance quantised to 2^29 steps over [-blur_radius, 0].
# The low 20 bits are free for ``select_faces`` to pack a candidate index into (ties then go to the
# candidate with the smaller minimum depth).
_COVER_BIT = 1 << 30
_DIST_BASE = 1 << 20
_DIST_STEPS = 1 << 29


def _near_and_key(abc, zlo, zhi, box, x, y, settings: RasterSettings):
  """The selection test and key at pixels (x, y) (broadcast against the constants' shape + a last
  axis).

  Returns (near bool, key int32: the selection key above where near, undefined elsewhere).
  """
  e = lambda v: v[..., None]
  r = settings.blur_radius

  def ev(i):
    a, b, c = abc[i]
    return e(a) * x + e(b) * y + e(c)

  dist = _min3(ev(0), ev(1), ev(2))  # signed distance to the nearest edge line, positive inside
  covers = dist >= 0
  near = covers
  if r > 0:
    near = (dist >= -r) & (x >= e(box[0])) & (x <= e(box[1])) & (y >= e(box[2])) & (y <= e(box[3]))
  inv_depth = jnp.clip(ev(3), e(zlo), e(zhi)).astype(jnp.float32)
  key = _COVER_BIT | (lax.bitcast_convert_type(jnp.maximum(inv_depth, 1e-30), jnp.int32) >> 1)
  if r > 0:
    frac = jnp.clip((dist + r) * (1.0 / r), 0.0, 1.0).astype(jnp.float32)
    key = jnp.where(covers, key, _DIST_BASE + (frac * _DIST_STEPS).astype(jnp.int32))
  return near, key


# Integer scatters and gathers into per-pixel buffers, batched by hand: under vmap, XLA scatters /
# gathers with batch coordinates build [N, 1 + batch dims] index arrays (concatenations and copies
# that cost ~5x the scatter itself on XLA:CPU); these flatten the batch into the index instead
# (custom_vmap, recursively for nested vmaps). No gradient (integer selection data).
def _flat_batched(base, scatter):
  """``base(table [S], idx [...], *upd)`` as a custom_vmap whose batching rule flattens the batch
  axis into ``table`` and ``idx`` (so that the base always sees a 1-D table)."""
  fn = jax.custom_batching.custom_vmap(base)

  @fn.def_vmap
  def rule(axis_size, in_batched, *args):
    table, idx, *upd = _batch_all(axis_size, in_batched, args)
    size = table.shape[-1]  # table: [B, S]
    off = (jnp.arange(axis_size, dtype=idx.dtype) * size).reshape((-1,) + (1,) * (idx.ndim - 1))
    if scatter:  # out of range stays out of range (dropped)
      idx = jnp.where((idx >= 0) & (idx < size), idx + off, axis_size * size)
      return fn(table.reshape(-1), idx, *upd).reshape(table.shape), True
    return fn(table.reshape(-1), jnp.clip(idx, 0, size - 1) + off), True

  return fn


def _batch_all(axis_size, in_batched, args):
  """A custom_vmap rule's arguments, each with the batch axis in front (unbatched ones
  broadcast)."""
  return [x if b else jnp.broadcast_to(x, (axis_size,) + x.shape) for x, b in zip(args, in_batched)]


def _scatter_max(table, idx, upd):
  """``table [S]`` with ``upd`` (shape of ``idx``) max-combined at ``idx`` (outside [0, S):
  dropped)."""
  return table.at[idx].max(upd, mode="drop")


def _scatter_min(table, idx, upd):
  """``_scatter_max`` with min."""
  return table.at[idx].min(upd, mode="drop")


def _take(table, idx):
  """``table [S]`` at ``idx`` clipped into [0, S) (no gradient)."""
  return table[jnp.clip(idx, 0, table.shape[-1] - 1)]


_scatter_max = _flat_batched(_scatter_max, True)
_scatter_min = _flat_batched(_scatter_min, True)
_take = _flat_batched(_take, False)


# Windowed versions for T x T pixel chunks: a [R, C] table, chunk corners ``starts [B, 2]`` (row,
# column; the windows must lie inside the table) and [B, T, T] windows, one index per chunk rather
# than per pixel (cheaper scatters, no [B, T*T] index arrays). Batched by stacking the batch along
# the rows (windows never cross into the next entry's rows).
def _window_dnums(ndim):
  window = tuple(range(ndim - 1, ndim + 1))
  return (
    lax.GatherDimensionNumbers(offset_dims=window, collapsed_slice_dims=(), start_index_map=(0, 1)),
    lax.ScatterDimensionNumbers(
      update_window_dims=window, inserted_window_dims=(), scatter_dims_to_operand_dims=(0, 1)
    ),
  )


def _window_batched(base, scatter):
  """``base(table [R, C], starts [..., 2], *upd)`` as a custom_vmap that stacks the batch along the
  table's rows (a scatter returns the stacked table, unstacked here; a gather's windows already
  carry the batch axis of ``starts``)."""
  fn = jax.custom_batching.custom_vmap(base)

  @fn.def_vmap
  def rule(axis_size, in_batched, *args):
    table, starts, *upd = _batch_all(axis_size, in_batched, args)
    rows = table.shape[1]
    off = jnp.arange(axis_size, dtype=starts.dtype) * rows
    starts = starts.at[..., 0].add(off.reshape((-1,) + (1,) * (starts.ndim - 2)))
    out = fn(table.reshape((-1,) + table.shape[2:]), starts, *upd)
    return (out.reshape(table.shape) if scatter else out), True

  return fn


def _wscatter(op):
  def base(table, starts, upd):
    return op(
      table,
      starts,
      upd,
      _window_dnums(starts.ndim)[1],
      mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )

  return _window_batched(base, scatter=True)


_wscatter_max = _wscatter(lax.scatter_max)
_wscatter_min = _wscatter(lax.scatter_min)


def _wtake(table, starts, size):
  """[B, size, size] windows of ``table`` at ``starts``."""
  return _window_batched(
    lambda table, starts: lax.gather(
      table,
      starts,
      _window_dnums(starts.ndim)[0],
      slice_sizes=(size, size),
      mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    ),
    scatter=False,
  )(table, starts)


def _chunk_budget(num_faces, settings: RasterSettings):
  """Static number of T x T pixel chunks evaluated by ``select_nearest``."""
  nty, ntx = _grid(settings)
  # One chunk per small face plus bounding boxes covering the image about four times over.
  m = settings.max_faces_per_tile or 64
  return max(1, int(math.ceil((num_faces + 4 * nty * ntx) * m / 64.0)))


def select_nearest(xy, z, settings: RasterSettings, budget=None, fits=False):
  """Slot 0 of ``select_faces`` per pixel (K = 1), face by face: a z-buffer built with scatter-max.

  Each face covers its bounding box (grown by the blur radius) with T x T pixel chunks anchored at
  the box's corner; the chunks of all faces (at most ``_chunk_budget``; faces in order of minimum
  depth, the farthest dropped first) are tested at once and the per-pixel maximum of the selection
  key (``_near_and_key``: nearest covering face, else the closest near face) is found with an
  integer scatter-max; a second scatter picks, among the faces reaching it, the one first in
  minimum-depth order. Same rule as slot 0 of ``select_faces``; much cheaper than the tile path for
  one face per pixel.

  ``budget``: static number of chunks (default ``_chunk_budget``). ``fits``: the caller knows that
  the budget holds every chunk; then the faces are not sorted by depth (the sort costs more than the
  rest for small views), and ties go to the smaller (minimum depth, face index) through two more
  scatters instead: the same result.

  Returns:
    (ids [H, W] int32, -1 where no face is near; overflow [] int32 = the number of chunks dropped;
    chunks [] int32 = the number of chunks of all faces, what the chunk budget must hold).
  """
  xy, z = lax.stop_gradient(xy), lax.stop_gradient(z)
  t = settings.tile_size
  f = xy.shape[0]
  if fits:
    valid, c0, c1 = _face_rects(xy, z, settings)
    order = jnp.arange(f, dtype=jnp.int32)
  else:
    valid, c0, c1, order = _face_boxes(xy, z, settings)
  nx = (c1[:, 0] - c0[:, 0]) // t + 1
  ny = (c1[:, 1] - c0[:, 1]) // t + 1
  n_chunks = jnp.where(valid, nx * ny, 0)
  budget = _chunk_budget(f, settings) if budget is None else budget
  s, local, live, total = _enumerate(n_chunks[order], budget)
  face = jnp.where(live, order[s], -1)
  fc = jnp.maximum(face, 0)
  corners = (xy[fc, 0, 0], xy[fc, 0, 1], xy[fc, 1, 0], xy[fc, 1, 1], xy[fc, 2, 0], xy[fc, 2, 1])
  corners += (z[fc, 0], z[fc, 1], z[fc, 2])
  nxc = nx[fc]
  ids = _nearest_of_chunks(corners, face >= 0, s, local, nxc, c0[fc], c1[fc], f, settings, fits)
  ids = jnp.where(ids >= 0, order[jnp.maximum(ids, 0)], -1)
  return ids, jnp.maximum(total - budget, 0).astype(jnp.int32), total


def _nearest_of_chunks(corners, live, s, local, nx, c0, c1, f, settings: RasterSettings, fits):
  """The tests and scatters of ``select_nearest`` over B chunks: per chunk its face's corners
  (9 x [B]: x0, y0, x1, y1, x2, y2, z0, z1, z2), ``live [B]``, the face's rank ``s [B]`` (ties go
  to the smaller; with ``fits``, to the smaller minimum depth first), the chunk's index ``local``
  within the face's ``nx [B]`` x ny chunks anchored at ``c0 [B, 2]``, the face's last pixel ``c1 [B,
  2]``; ``f`` > every rank. Returns [H, W] int32 the winning rank per pixel, -1 where none.

  The per-pixel buffers are [H + T, W + T] (a chunk's window always fits) and every scatter /
  gather moves one T x T window per chunk; pixels that are not near carry the operation's
  identity."""
  h, w = settings.image_size
  t = settings.tile_size
  key, start, zmin = _chunk_tests((*corners, live, s, local, nx, c0, c1), settings, fits)
  table = lambda v: jnp.full((h + t, w + t), v, jnp.int32)
  zbuf = _wscatter_max(table(0), start, key)
  win = (key > 0) & (key == _wtake(zbuf, start, t))
  if fits:  # s is the face index: among the winners, the smallest minimum depth first
    big = jnp.iinfo(jnp.int32).max
    zmin = jnp.broadcast_to(zmin[:, None, None], key.shape)
    best = _wscatter_min(table(big), start, jnp.where(win, zmin, big))
    win &= zmin == _wtake(best, start, t)
  rank = _wscatter_min(table(f), start, jnp.where(win, s[:, None, None], f))[:h, :w]
  return jnp.where(rank < f, rank, -1)


def _chunk_tests(chunks, settings: RasterSettings, fits):
  """The per-pixel tests of chunks (``_nearest_of_chunks``' arguments, as a list). Returns (key
  [B, T, T] int32, 0 where not near; start [B, 2] int32 the chunk's first pixel (row, column);
  zmin [B] int32 the face's minimum depth (float bits), None unless ``fits``)."""
  t = settings.tile_size
  *corners, live, s, local, nx, c0, c1 = chunks
  cx, cy = local % jnp.maximum(nx, 1), local // jnp.maximum(nx, 1)
  origin = jnp.stack([c0[:, 0] + cx * t, c0[:, 1] + cy * t], -1)  # [B, 2] chunk's first pixel
  dtype = corners[0].dtype
  o = origin.astype(dtype)
  a = jnp.stack(
    [jnp.stack([corners[2 * k] - o[:, 0], corners[2 * k + 1] - o[:, 1]], -1) for k in range(3)], 1
  )  # [B, 3, 2]
  zc = jnp.stack(corners[6:], -1)
  abc, zlo, zhi, box = _planes_of(a, zc, live, settings)
  jj, ii = _tile_pixels(settings, jnp.float32)  # [P] pixel centres within a chunk
  dj, di = (jj - 0.5).astype(jnp.int32), (ii - 0.5).astype(jnp.int32)
  col = origin[:, 0:1] + dj  # [B, P]
  row = origin[:, 1:2] + di
  near, key = _near_and_key(abc, zlo, zhi, box, jj.astype(dtype), ii.astype(dtype), settings)
  near &= (col <= c1[:, 0:1]) & (row <= c1[:, 1:2])
  key = jnp.where(near, key, 0).reshape(-1, t, t)
  zmin = lax.bitcast_convert_type(_min3(*corners[6:]), jnp.int32) if fits else None  # > 0: ordered
  return key, origin[:, ::-1], zmin


def _select(xy, z, cand, settings: RasterSettings, tiles=None):
  """``select_faces`` in one pass, or in two when ``settings.heavy_tile_budget`` < 1: all rows of
  ``cand`` among their first ``light_faces_per_tile`` candidates, then the rows with more (compacted
  to the heavy budget) among all. Returns ([K, n, T*T] int32, dropped [] int32 heavy rows beyond the
  budget)."""
  n, m = cand.shape
  m1 = settings.light_faces_per_tile
  if settings.heavy_tile_budget >= 1 or m1 >= m:
    return select_faces(xy, z, cand, settings, tiles), jnp.int32(0)
  if tiles is None:
    tiles = jnp.arange(n, dtype=jnp.int32)
  sel = select_faces(xy, z, cand[:, :m1], settings, tiles)
  budget = min(n, max(1, math.ceil(settings.heavy_tile_budget * math.prod(_grid(settings)))))
  _, _, rows, dropped = _compact(cand[:, m1] >= 0, budget)  # rows [budget]: n where unused
  safe = jnp.minimum(rows, n - 1)
  heavy = select_faces(xy, z, jnp.where((rows < n)[:, None], cand[safe], -1), settings, tiles[safe])
  return sel.at[:, rows].set(heavy, mode="drop"), dropped


def _tile_pixels(settings: RasterSettings, dtype):
  t = settings.tile_size
  ii, jj = jnp.meshgrid(jnp.arange(t), jnp.arange(t), indexing="ij")
  return (jj.reshape(-1) + 0.5).astype(dtype), (ii.reshape(-1) + 0.5).astype(dtype)


def select_faces(xy, z, cand, settings: RasterSettings, tiles=None):
  """Per pixel, up to K of the candidate faces near the pixel centre.

  A face is *near* a pixel centre if the centre lies within ``blur_radius`` of each of the face's
  three edge lines (on their inner side) and of its bounding box; with blur 0, if it lies in the
  closed triangle. It *covers* the centre if the centre lies in the closed triangle. Rule:

  - slot 0: if some near face covers the centre, the nearest covering face (largest inverse depth of
  the face plane at the centre, clamped to the face's vertex range); otherwise the near face with
    the largest signed distance min_i(edge line distance_i) (the highest coverage; quantised to
    blur_radius / 2^29); remaining ties to the smaller minimum vertex depth;
  - slots 1 .. K - 1: the other near faces in order of minimum vertex depth (the candidate order);
  - then all K are sorted by inverse depth, nearest first; empty slots (-1) last.

  This is exact (all near faces) whenever at most K faces are near the pixel; with more, the
  covering face (or, for pixels no face covers, the closest one) is always kept.

  The (candidate, tile, pixel) tests run in one fused pass over [M, n_tiles, T*T] whose reductions
  over the candidates are an integer max (the selection key of ``_near_and_key`` with the candidate
  index in its low bits) and bit masks.

  Args:
    xy: [F, 3, 2], z: [F, 3] projected faces (constants); cand: [n, M] from ``bin_faces`` (all
      tiles, or the rows of ``tiles``); tiles: optional [n] int32 tile index of each row of ``cand``
      (default all).
  Returns:
    [K, n, T*T] int32 face ids (slot-major), nearest first, -1 for empty slots (last).
  """
  xy, z = lax.stop_gradient(xy), lax.stop_gradient(z)
  n, m = cand.shape
  nty, ntx = _grid(settings)
  t = settings.tile_size
  if tiles is None:
    tiles = jnp.arange(n, dtype=jnp.int32)
  origin = jnp.stack([(tiles % ntx) * t, (tiles // ntx) * t], -1).astype(xy.dtype)  # [n, 2]
  abc, zlo, zhi, box = _planes(
    xy, z, cand.T, jnp.broadcast_to(origin, (m, n, 2)), settings
  )  # [M, n]
  px, py = _tile_pixels(settings, xy.dtype)
  k = settings.faces_per_pixel
  valid, keys = _near_and_key(abc, zlo, zhi, box, px, py, settings)  # [M, n, P]
  # Pack the candidate index into the key's low bits, so that one integer max gives slot 0 (ties to
  # the lower index, i.e. the smaller minimum depth).
  nbits = max(1, (m - 1).bit_length())
  if (1 << nbits) > _DIST_BASE:
    raise ValueError(f"select_faces: max_faces_per_tile must be <= {_DIST_BASE}, got {m}")
  low = (1 << nbits) - 1
  slot = lax.broadcasted_iota(jnp.int32, (m, 1, 1), 0)
  best = reduce_leading(jnp.where(valid, (keys & ~low) | (low - slot), 0), jnp.maximum)  # [n, P]
  has = best > 0
  m0 = low - (best & low)
  slots = [jnp.where(has, m0, -1)]
  if k > 1:
    # Bit masks of the near slots, 32 per word, then the first K - 1 set bits other than the
    # nearest.
    words = []
    for g in range(-(-m // 32)):
      bit = jnp.left_shift(
        jnp.uint32(1), lax.broadcasted_iota(jnp.uint32, (min(32, m - 32 * g), 1, 1), 0)
      )
      wg = reduce_leading(
        jnp.where(valid[32 * g : 32 * (g + 1)], bit, jnp.uint32(0)), jnp.bitwise_or
      )
      own = has & (m0 // 32 == g)
      words.append(
        jnp.where(own, wg & ~jnp.left_shift(jnp.uint32(1), (m0 % 32).astype(jnp.uint32)), wg)
      )
    if len(words) <= _UNROLLED_WORDS:
      slots.extend(_next_bits_unrolled(words, k - 1))
    else:
      slots.extend(_next_bits_scan(jnp.stack(words), k - 1))
  sel = jnp.stack(slots)  # [K, n, P]
  safe_sel = jnp.maximum(sel, 0)
  tile = jnp.arange(n)[None, :, None]
  ids = jnp.where(sel >= 0, cand[tile, safe_sel], -1).astype(jnp.int32)
  if k > 1:
    # Sort the slots by the selection key (nearest first).
    planes = jnp.stack([abc[3][0], abc[3][1], abc[3][2], zlo, zhi], -1)  # [M, n, 5]
    g = planes[safe_sel, tile]  # [K, n, P, 5]
    key = jnp.clip(g[..., 0] * px + g[..., 1] * py + g[..., 2], g[..., 3], g[..., 4])
    key = jnp.where(sel >= 0, key, -1.0)
    ids = _sort_by_key(key, ids)
  return ids


# The first set bits of the candidate bit masks, two ways. Unrolled, XLA fuses the steps into one
# another: fastest for a few words (max_faces_per_tile <= 128: 512 x 512, K = 8 ~10 ms faster than
# the scan), but the fused expressions grow exponentially with the words (compile: 2 s at 256
# candidates, 17 s at 384, minutes and 15 GB at 664; slower to run, too). The scan materialises the
# words between steps.
_UNROLLED_WORDS = 4


def _next_bits_unrolled(words, count):
  """``count`` times: the position of the lowest set bit of the first non-zero word of ``words`` (a
  list of G uint32 [n, P]; bit b of word g is candidate 32 g + b), then clear it. Returns ``count``
  [n, P] int32 (-1 when no bit is left)."""
  words, out = list(words), []
  for _ in range(count):
    found = jnp.zeros(words[0].shape, bool)
    idx = jnp.full(words[0].shape, -1, jnp.int32)
    for g, wg in enumerate(words):
      lsb = wg & (~wg + jnp.uint32(1))
      pos = lax.population_count(lsb - jnp.uint32(1)).astype(jnp.int32) + 32 * g
      take = ~found & (wg != 0)
      idx = jnp.where(take, pos, idx)
      words[g] = jnp.where(take, wg ^ lsb, wg)
      found |= wg != 0
    out.append(idx)
  return out


def _next_bits_scan(words, count):
  """``_next_bits_unrolled`` for stacked words [G, n, P], as a scan. Returns [count, n, P] int32."""
  group = lax.broadcasted_iota(jnp.int32, (words.shape[0], 1, 1), 0)

  def step(words, _):
    first = reduce_leading(jnp.where(words != 0, group, words.shape[0]), jnp.minimum)  # [n, P]
    hit = group == first
    w = reduce_leading(jnp.where(hit, words, jnp.uint32(0)), jnp.bitwise_or)
    lsb = w & (~w + jnp.uint32(1))
    idx = jnp.where(
      w != 0, lax.population_count(lsb - jnp.uint32(1)).astype(jnp.int32) + 32 * first, -1
    )
    return jnp.where(hit, words ^ lsb, words), idx

  return lax.scan(step, words, None, length=count)[1]


def _sort_by_key(key, ids):
  """Sorts ``ids [K, ...]`` by ``key [K, ...]`` in descending order (odd-even transposition
  network)."""
  k = key.shape[0]
  key, ids = list(key), list(ids)
  for rnd in range(k):
    for i in range(rnd % 2, k - 1, 2):
      swap = key[i + 1] > key[i]
      key[i], key[i + 1] = jnp.where(swap, key[i + 1], key[i]), jnp.where(swap, key[i], key[i + 1])
      ids[i], ids[i + 1] = jnp.where(swap, ids[i + 1], ids[i]), jnp.where(swap, ids[i], ids[i + 1])
  return jnp.stack(ids)


def _untile(x, settings: RasterSettings):
  """[..., n_tiles, T*T] -> [..., H, W]."""
  h, w = settings.image_size
  t = settings.tile_size
  nty, ntx = _grid(settings)
  lead = x.shape[:-2]
  x = x.reshape(lead + (nty, ntx, t, t))
  x = jnp.swapaxes(x, -3, -2).reshape(lead + (nty * t, ntx * t))
  return x[..., :h, :w]


# Selection without a per-tile cap (``max_faces_per_tile=None``): every tile tests all of its
# candidates, 32 at a time. Work items (tile, chunk j) hold candidates 32 j .. 32 j + 31 of a tile;
# they are grouped by j (all tiles' first chunks, then the second chunks of the tiles with more than
# 32 candidates, ...), each group padded to whole blocks of ``_BLOCK_ROWS`` tiles, and two
# ``lax.while_loop``s run the blocks (dynamic trip counts: the work is what the view holds, no
# budget, nothing dropped), the first group's (no tile has a state to gather yet; most blocks at
# 512 x 512, K = 8: selection ~4 ms faster), then the others'. Per (tile, pixel) the loops keep the
# best selection key so far and the first K near candidates in candidate order, which give the same
# slots as ``select_faces`` with every candidate (slot 0 the best; then the first K - 1 others;
# sorted nearest first).
_CHUNK = 32
_BLOCK_ROWS = 128


def select_blocks(xy, z, face, starts, settings: RasterSettings):
  """``select_faces`` over all candidates of every tile, without a cap (see the section comment).

  Args:
    xy: [F, 3, 2], z: [F, 3] projected faces (constants); face, starts: ``_bin_faces``' sorted
      pairs with ``max_faces_per_tile=None`` (tile i's candidates face[starts[i]:starts[i + 1]]).
  Returns:
    [K, H, W] int32 face ids, nearest first, -1 for empty slots (last).
  """
  xy, z = lax.stop_gradient(xy), lax.stop_gradient(z)
  k = settings.faces_per_pixel
  nty, ntx = _grid(settings)
  n_tiles = nty * ntx
  t = settings.tile_size
  p = t * t
  rows = min(n_tiles, _BLOCK_ROWS)
  px, py = _tile_pixels(settings, xy.dtype)
  count = starts[1:] - starts[:-1]  # [n_tiles]
  chunks = -(-count // _CHUNK)
  max_j = -(-face.shape[0] // _CHUNK) + 1  # static bound on the chunks of one tile
  # Tiles per group j (chunks > j), blocks per group, and the first block of each group.
  hist = jnp.zeros((max_j + 1,), jnp.int32).at[jnp.minimum(chunks, max_j)].add(1)
  tiles_in = n_tiles - cumsum(hist)[:-1]  # [max_j]: tiles with chunks > j
  blocks = -(-tiles_in // rows)
  first_block = cumsum(blocks) - blocks
  n_blocks = jnp.sum(blocks)
  low = _CHUNK - 1
  cpos = lax.broadcasted_iota(jnp.int32, (_CHUNK, 1), 0)  # [32, 1]
  tile_ids = jnp.arange(n_tiles, dtype=jnp.int32)

  def empty(n):
    """The state of ``n`` tiles that no block has met: best, best_face, best_z [n, P], lst, lst_z
    [K, n, P], and the listed count [n, P]."""
    i, f = jnp.int32, jnp.float32
    return (
      jnp.zeros((n, p), i),
      jnp.full((n, p), -1, i),
      jnp.zeros((n, p), f),
      jnp.full((k, n, p), -1, i),
      jnp.zeros((k, n, p), f),
      jnp.zeros((n, p), i),
    )

  def body(state, fresh):
    b, best, best_face, best_z, lst, lst_z, n = state
    # this block's group (fresh: the first, whose tiles have no state yet)
    j = 0 if fresh else jnp.sum((first_block <= b).astype(jnp.int32)) - 1
    r0 = (b - first_block[j]) * rows
    member = chunks > j
    rank = cumsum(member.astype(jnp.int32)) - 1
    slot = jnp.where(member & (rank >= r0) & (rank < r0 + rows), rank - r0, rows)
    tiles = jnp.full((rows,), n_tiles, jnp.int32).at[slot].set(tile_ids, mode="drop")
    used = tiles < n_tiles
    ts = jnp.minimum(tiles, n_tiles - 1)
    idx = starts[ts][None, :] + j * _CHUNK + cpos  # [32, rows]
    live = used[None, :] & (idx < starts[ts + 1][None, :])
    cand = jnp.where(live, face[jnp.minimum(idx, face.shape[0] - 1)], -1)
    origin = jnp.stack([(ts % ntx) * t, (ts // ntx) * t], -1).astype(xy.dtype)  # [rows, 2]
    abc, zlo, zhi, box = _planes(xy, z, cand, jnp.broadcast_to(origin, (_CHUNK, rows, 2)), settings)
    near, keys = _near_and_key(abc, zlo, zhi, box, px, py, settings)  # [32, rows, P]
    kn = jnp.where(near, (keys & ~low) | (low - cpos[..., None]), 0)  # > 0 where near
    # The tests computed once: materialised as two exact 16-bit halves (``materialize`` takes
    # floats); else the max and the bit-or below would each fuse (and run) all of them.
    hi, lo = materialize((kn >> 16).astype(jnp.float32), (kn & 0xFFFF).astype(jnp.float32))
    kn = (hi.astype(jnp.int32) << 16) | lo.astype(jnp.int32)
    c_best = reduce_leading(kn, jnp.maximum)
    bit = jnp.left_shift(jnp.uint32(1), cpos.astype(jnp.uint32))[..., None]
    word = reduce_leading(jnp.where(kn > 0, bit, jnp.uint32(0)), jnp.bitwise_or)  # [rows, P]

    # Per (candidate, row) lookups, flat: one gather of a row of ``planes`` per pixel.
    planes = jnp.stack([*abc[3], zlo, zhi], -1).reshape(_CHUNK * rows, 5)
    flat = lambda c: c * rows + lax.broadcasted_iota(jnp.int32, c.shape, 0)  # c [rows, P]
    take_face = lambda c: cand.reshape(-1)[flat(c)]

    def inv_depth(c):  # [rows, P] clipped inverse depth of chunk candidates c
      g = planes[flat(c)]  # [rows, P, 5]
      return jnp.clip(g[..., 0] * px + g[..., 1] * py + g[..., 2], g[..., 3], g[..., 4])

    # Merge with the state of these tiles.
    if fresh:  # the empty state, as constants (no gathers)
      o_best, o_face, o_z, o_lst, o_lz, o_n = empty(rows)
    else:
      o_best, o_face, o_z, o_n = best[ts], best_face[ts], best_z[ts], n[ts]
      o_lst, o_lz = lst[:, ts], lst_z[:, ts]
    c0 = low - (c_best & low)
    better = (c_best > 0) & ((c_best & ~low) > (o_best & ~low))
    n_best = jnp.where(better, c_best, o_best)
    n_face = jnp.where(better, take_face(c0), o_face)
    n_z = jnp.where(better, inv_depth(c0), o_z)
    # List entry i >= n takes the (i - n)-th near candidate of this chunk: independent per entry
    # (a sequential extraction would be recomputed by every entry's fusion).
    found = lax.population_count(word).astype(jnp.int32)
    new_l, new_lz = [], []
    # Materialised: the face and the inverse-depth lookups below would each recompute them.
    nth = materialize(
      *[_nth_bit(word, jnp.maximum(i - o_n, 0)).astype(jnp.float32) for i in range(k)]
    )
    nth = [x.astype(jnp.int32) for x in nth]
    for i, c in enumerate(nth):
      take = (i >= o_n) & (i - o_n < found)
      new_l.append(jnp.where(take, take_face(c), o_lst[i]))
      new_lz.append(jnp.where(take, inv_depth(c), o_lz[i]))
    o_n = jnp.minimum(o_n + found, k)
    put = lambda arr, v: arr.at[tiles].set(v, mode="drop")
    lst = lst.at[:, tiles].set(jnp.stack(new_l), mode="drop")
    lst_z = lst_z.at[:, tiles].set(jnp.stack(new_lz), mode="drop")
    return (
      b + 1,
      put(best, n_best),
      put(best_face, n_face),
      put(best_z, n_z),
      lst,
      lst_z,
      put(n, o_n),
    )

  init = (jnp.int32(0), *empty(n_tiles))
  # The first group's blocks (every non-empty tile's first chunk) meet each tile for the first time:
  # a loop of their own merges them with the initial state as constants, without gathering it.
  state = lax.while_loop(lambda s: s[0] < blocks[0], functools.partial(body, fresh=True), init)
  state = lax.while_loop(lambda s: s[0] < n_blocks, functools.partial(body, fresh=False), state)
  _, best, best_face, best_z, lst, lst_z, _ = state
  # Slot 0 the best; then the first K - 1 listed faces other than it (q: the best's position in the
  # list, K if absent), each slot independently.
  q = jnp.full(best.shape, k, jnp.int32)
  for i in reversed(range(k)):
    q = jnp.where((lst[i] == best_face) & (best_face >= 0), i, q)
  ids = [best_face]
  keys = [jnp.where(best_face >= 0, best_z, -1.0)]
  for i in range(1, k):
    f_i = jnp.where(i - 1 < q, lst[i - 1], lst[i])
    ids.append(f_i)
    keys.append(jnp.where(f_i >= 0, jnp.where(i - 1 < q, lst_z[i - 1], lst_z[i]), -1.0))
  # Sorted nearest first (stable; ``_sort_by_key``), materialised once (its consumers would each
  # recompute the network), then moved to image layout and materialised again: a plain transpose
  # let XLA carry the ids across the fragment ladder's switch in two layouts, copied to and from
  # (~8 ms at 512 x 512, K = 8); untiling inside the sort's fusion was slower still.
  out = _sort_by_key(jnp.stack(keys), jnp.stack(ids))
  out = materialize(*[x.astype(jnp.float32) for x in out])
  out = materialize(*[_untile(x, settings) for x in out])
  return jnp.stack(out).astype(jnp.int32)


def _nth_bit(word, r):
  """Position of the ``r``-th (0-based) set bit of uint32 ``word`` (meaningful where ``r`` <
  popcount(word)), by halving (no sequential extraction)."""
  pos = jnp.zeros(word.shape, jnp.int32)
  for width in (16, 8, 4, 2, 1):
    c = lax.population_count(word & jnp.uint32((1 << width) - 1)).astype(jnp.int32)
    go = r >= c
    r = jnp.where(go, r - c, r)
    word = jnp.where(go, word >> width, word)
    pos = jnp.where(go, pos + width, pos)
  return pos


# --------------------------------------------------------------------------------------------------
# 4. Differentiable evaluation of the selected faces.
#
# Everything below works on lists of [S, H, W] arrays (one per fragment slot and component) so that
# the forward and backward passes are elementwise fusions plus one gather / scatter-add per column.
# The backward of ``eval_fragment`` is written by hand: JAX's autodiff of it is ~10x slower than its
# forward on XLA:CPU (many unfused intermediates), and the chain rule simplifies a lot (see
# ``_eval_fragment_bwd``).


def _fragment_terms(x0, y0, x1, y1, x2, y2, z0, z1, z2, px, py):
  """Forward quantities of ``eval_fragment`` shared with its backward (a dict of arrays / lists)."""
  v = [(x0, y0), (x1, y1), (x2, y2)]
  r = [(px - x0, py - y0), (px - x1, py - y1), (px - x2, py - y2)]
  cross = lambda a, b: a[0] * b[1] - a[1] * b[0]
  e_area = [cross(r[1], r[2]), cross(r[2], r[0]), cross(r[0], r[1])]  # doubled signed sub-areas
  # The face's own doubled area, as culling computes it (not the sum of the sub-areas, which cancels
  # badly for thin faces and distant pixels and can even change sign).
  area2 = cross((x1 - x0, y1 - y0), (x2 - x0, y2 - y0))
  sgn = jnp.where(area2 < 0, -1.0, 1.0).astype(area2.dtype)
  edge, length, d, along, seg = [], [], [], [], []
  for i in range(3):  # edge i runs from vertex i + 1 to vertex i + 2 (opposite vertex i)
    a, b = v[(i + 1) % 3], v[(i + 2) % 3]
    ex, ey = b[0] - a[0], b[1] - a[1]
    li = safe_sqrt(ex * ex + ey * ey, 1e-24)
    di = sgn * e_area[i] / li  # distance to the edge's line, positive inside
    rel = r[(i + 1) % 3]
    al = (rel[0] * ex + rel[1] * ey) / li
    beyond = jnp.maximum(jnp.maximum(-al, al - li), 0.0)
    edge.append((ex, ey)), length.append(li), d.append(di), along.append(al)
    seg.append(di * di + beyond * beyond)
  inside = (d[0] >= 0) & (d[1] >= 0) & (d[2] >= 0)
  # Pairwise minima: the gradient of a min-reduction divides by the number of ties, which XLA can
  # make 0 when it recomputes the operands with different rounding (fused multiply-adds) -> NaN.
  seg_min = _min3(*seg)
  dist = jnp.where(inside, _min3(*d), -safe_sqrt(seg_min))
  # Clip the screen-space barycentrics to the face, then correct for perspective. Rounding can clip
  # all three to 0 (thin faces): those fragments take the centroid instead, so that the normalised
  # weights sum to 1 and the perspective denominator is >= 1 / max(z). (Clamping the sums instead, 1
  # / max(s, eps), has an overflowing derivative -1 / eps^2 that turns even a zero cotangent into
  # NaN.)
  inv_area2 = safe_div(1.0, area2)
  lam = [e * inv_area2 for e in e_area]  # screen-space barycentrics
  lam_c = [jnp.maximum(b, 0.0) for b in lam]
  total = lam_c[0] + lam_c[1] + lam_c[2]
  ok = total > 1e-6  # mathematically >= 1
  inv_total = 1.0 / jnp.where(ok, total, 1.0)
  nrm = [jnp.where(ok, b * inv_total, 1.0 / 3.0) for b in lam_c]
  z = (z0, z1, z2)
  q = [nrm[i] / z[i] for i in range(3)]
  depth = 1.0 / (q[0] + q[1] + q[2])
  return dict(
    v=v,
    r=r,
    sgn=sgn,
    edge=edge,
    length=length,
    d=d,
    along=along,
    seg=seg,
    seg_min=seg_min,
    inside=inside,
    dist=dist,
    inv_area2=inv_area2,
    lam=lam,
    ok=ok,
    inv_total=inv_total,
    nrm=nrm,
    z=z,
    q=q,
    depth=depth,
    bary=tuple(qi * depth for qi in q),
  )


@jax.custom_vjp
def eval_fragment(x0, y0, x1, y1, x2, y2, z0, z1, z2, px, py):
  """Barycentrics, signed distance and depth of one face per pixel; all arguments are arrays of one
  shape.

  Args:
    x0 .. y2: projected vertices (pixels); z0 .. z2: camera depths (> 0); px, py: pixel coordinates.
  Returns:
    ((b0, b1, b2) perspective-correct barycentrics, clipped to the face first in screen space; dist:
    signed distance to the face's boundary, positive inside; depth). Gradients flow to the vertices
    and depths (hand-written; ties between edges go to the first), not to ``px``, ``py``.
  """
  t = _fragment_terms(x0, y0, x1, y1, x2, y2, z0, z1, z2, px, py)
  return t["bary"], t["dist"], t["depth"]


def _eval_fragment_fwd(*args):  # symbolic zeros: args are CustomVJPPrimal
  values = tuple(a.value for a in args)
  return eval_fragment(*values), values


def _first_min3(a, b, c):
  """One-hot (bool) of the first minimum of three arrays."""
  s0 = (a <= b) & (a <= c)
  s1 = ~s0 & (b <= c)
  return s0, s1, ~s0 & ~s1


def _materialize_given(*cts):
  """Cotangents materialised once (``materialize``; not recomputed per consumer), JAX's symbolic
  zeros (outputs that nobody differentiates) as None."""
  given = [g for g in cts if not isinstance(g, jax.custom_derivatives.SymbolicZero)]
  given = iter(materialize(*given) if given else ())
  return [
    next(given) if not isinstance(g, jax.custom_derivatives.SymbolicZero) else None for g in cts
  ]


def _eval_fragment_bwd(args, cts):
  """Chain rule in closed form. With lam_i the screen barycentrics of p (the pixel), d lam_i / d v_k
  = -lam_k grad_p lam_i. The distance to a segment (or line) from p, at closest point c = a + t (b -
  a), has gradient n, -(1 - t) n, -t n with respect to p, a, b (n the unit normal / direction from c
  to p). Outputs that nobody differentiates (symbolic zeros: the distance in hard mode, often the
  depth) cost nothing: their terms are skipped."""
  (gb0, gb1, gb2), g_dist, g_depth = cts
  gb0, gb1, gb2, g_dist, g_depth = _materialize_given(gb0, gb1, gb2, g_dist, g_depth)
  through_bary = any(g is not None for g in (gb0, gb1, gb2, g_depth))
  if not through_bary and g_dist is None:
    return (None,) * len(args)
  x = _fragment_terms(*args)
  z, q, nrm, lam, depth = x["z"], x["q"], x["nrm"], x["lam"], x["depth"]
  basis = []  # per fragment: (gx, gy) of the barycentrics; (wnx, wny, tt_act, edge) of the distance
  g_z = [None] * 3
  if through_bary:
    gb = [0.0 if g is None else g for g in (gb0, gb1, gb2)]
    # Perspective: b_i = q_i * depth, depth = 1 / sum(q), q_i = nrm_i / z_i.
    sb = gb[0] * x["bary"][0] + gb[1] * x["bary"][1] + gb[2] * x["bary"][2]
    gq = [(gb[i] - sb) * depth for i in range(3)]
    if g_depth is not None:
      gq = [g - g_depth * depth * depth for g in gq]
    g_z = [-gq[i] * q[i] / z[i] for i in range(3)]
    gn = [gq[i] / z[i] for i in range(3)]
    # Clip and normalise: nrm_i = max(lam_i, 0) / total (or 1/3 where not ok).
    sn = gn[0] * nrm[0] + gn[1] * nrm[1] + gn[2] * nrm[2]
    g_lam = [
      jnp.where(x["ok"] & (lam[i] > 0), (gn[i] - sn) * x["inv_total"], 0.0) for i in range(3)
    ]
    # G = sum_i g_lam_i grad_p lam_i; grad_p lam_i = (-e_y, e_x) / area2 for edge i.
    gx = sum(g_lam[i] * -x["edge"][i][1] for i in range(3)) * x["inv_area2"]
    gy = sum(g_lam[i] * x["edge"][i][0] for i in range(3)) * x["inv_area2"]
    basis += [gx, gy]
  if g_dist is not None:  # the edge that attains the distance (first on ties)
    inside = x["inside"]
    sel_in = _first_min3(*x["d"])
    sel_out = _first_min3(*x["seg"])
    dist_len = safe_sqrt(x["seg_min"])
    live = inside | (x["seg_min"] > 1e-20)  # below, safe_sqrt is flat
    wnx = wny = tt_act = edge = 0.0
    for i in range(3):
      ex, ey = x["edge"][i]
      inv_l = 1.0 / x["length"][i]
      t = x["along"][i] * inv_l
      rel = x["r"][(i + 1) % 3]
      tc = jnp.clip(t, 0.0, 1.0)
      # Inside: d_i = n_in . (p - a), n_in = sgn (-e_y, e_x) / L. Outside: dist = -|p - c| (the
      # direction from c to p, divided by the distance).
      sgn_l = x["sgn"] * inv_l
      inv_dl = 1.0 / dist_len
      nx = jnp.where(inside, -ey * sgn_l, -(rel[0] - tc * ex) * inv_dl)
      ny = jnp.where(inside, ex * sgn_l, -(rel[1] - tc * ey) * inv_dl)
      act = jnp.where(inside, sel_in[i], sel_out[i])
      w = jnp.where(live & act, g_dist, 0.0)
      wnx, wny = wnx + w * nx, wny + w * ny
      tt_act = tt_act + jnp.where(act, jnp.where(inside, t, tc), 0.0)
      edge = edge + jnp.where(act, float(i), 0.0)
    basis += [wnx, wny, tt_act, edge]
  # The per-fragment basis computed once; each output below reads only it.
  basis = materialize(*basis)
  g_v = [[0.0, 0.0] for _ in range(3)]
  if through_bary:
    gx, gy = basis[:2]
    g_v = [[-lam[k] * gx, -lam[k] * gy] for k in range(3)]
  if g_dist is not None:
    wnx, wny, tt_act, edge = basis[-4:]
    for k in range(3):  # vertex k is the start of edge k + 2 and the end of edge k + 1 (mod 3)
      c = jnp.where(edge == (k + 2) % 3, 1.0 - tt_act, 0.0) + jnp.where(
        edge == (k + 1) % 3, tt_act, 0.0
      )
      g_v[k] = [g_v[k][0] - c * wnx, g_v[k][1] - c * wny]
  return (*[g for v in g_v for g in v], *g_z, None, None)


eval_fragment.defvjp(_eval_fragment_fwd, _eval_fragment_bwd, symbolic_zeros=True)


@jax.custom_vjp
def gather_rows(table, ids):
  """``tuple(table[j][ids] for j in range(D))`` for a column-major ``table [D, F]`` and integer
  ``ids``.

  Column-major so that neither the gather nor its gradient (one scatter-add of D-vectors)
  interleaves the columns (XLA:CPU's transposes to and from [..., D] cost more than the gather
  itself).
  """
  return tuple(table[j][ids] for j in range(table.shape[0]))


def _gather_rows_fwd(table, ids):
  return gather_rows(table, ids), (ids, table.shape[1])


def _gather_rows_bwd(res, cts):
  ids, f = res
  g = jnp.stack(cts)  # [D, ...]
  dn = lax.ScatterDimensionNumbers(
    update_window_dims=(0,), inserted_window_dims=(1,), scatter_dims_to_operand_dims=(1,)
  )
  out = lax.scatter_add(
    jnp.zeros((g.shape[0], f), g.dtype),
    ids[..., None],
    g,
    dn,
    mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
  )
  return out, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


class Slots(NamedTuple):
  """Fragments slot-major (internal layout of ``rasterize_slots``): S <= K slots, nearest first,
  over pixel columns of shape Q: the pixels (Q = (H, W)), or with a tile budget
  (``RasterSettings.tile_budget`` < 1) the pixels of the tiles that hold faces (Q = (A * T * T,);
  ``to_image`` maps columns to the image).

  ``ids`` and ``valid`` are dense [S, *Q]; the evaluated quantities are [S, *Q] too, or with a
  fragment budget (``RasterSettings.fragment_budget`` < 1) flat [N] over the non-empty slots only,
  compacted (``expand`` maps them to [S, *Q]).
  """

  ids: jax.Array  # [S, *Q] int32 face ids, -1 for empty slots
  valid: jax.Array  # [S, *Q] bool: non-empty and evaluated
  bary: tuple  # 3 x [S, *Q] or [N]
  dist: jax.Array  # [S, *Q] or [N]
  depth: jax.Array  # [S, *Q] or [N]
  attrs: tuple  # D x [S, *Q] or [N], the gathered extra face columns
  rank: (
    jax.Array
  )  # [S * Q] int32 position in [N] of each slot's fragment (where valid); None when dense
  pos: (
    jax.Array
  )  # [N] int32 flat slot index of each evaluated fragment (S * Q if unused); None when dense
  pixel_column: (
    jax.Array
  )  # [H * W] int32 column of each image pixel, -1 if none; None when Q = (H, W)
  column_pixel: (
    jax.Array
  )  # [Q] int32 image pixel of each column, H * W if none; None when Q = (H, W)
  image_size: tuple  # (H, W)


@jax.custom_vjp
def _take_compact(x, rank, valid, pos):
  """[N] -> [M]: x[rank] where valid, 0 elsewhere, for a ``rank [M]`` that maps the valid entries
  one to one onto entries of x, whose inverse is ``pos [N]`` (>= M where unused). The gradient
  gathers back through ``pos`` rather than scatter-adding (autodiff of the gather)."""
  return jnp.where(valid, x[jnp.clip(rank, 0, x.shape[0] - 1)], jnp.zeros((), x.dtype))


def _take_compact_fwd(x, rank, valid, pos):
  return _take_compact(x, rank, valid, pos), pos


def _take_compact_bwd(pos, g):
  n = g.shape[0]
  return jnp.where(pos < n, g[jnp.minimum(pos, n - 1)], 0.0), None, None, None


_take_compact.defvjp(_take_compact_fwd, _take_compact_bwd)


def expand(slots: Slots, x):
  """A per-fragment array of ``slots`` as [S, *Q] (0 in slots that were not evaluated)."""
  if slots.rank is None:
    return x.reshape(slots.ids.shape)
  return _take_compact(x, slots.rank, slots.valid.reshape(-1), slots.pos).reshape(slots.ids.shape)


def to_image(slots: Slots, x, fill=0.0):
  """Per-column values ``x [..., *Q]`` as an image [..., H, W]; pixels outside the columns get
  ``fill`` (a number, or a sequence of one per leading entry of ``x``)."""
  h, w = slots.image_size
  if slots.pixel_column is None:
    return x
  has = slots.pixel_column >= 0
  if jnp.issubdtype(x.dtype, jnp.floating):
    take = lambda v: _take_compact(v, slots.pixel_column, has, slots.column_pixel)
  else:
    take = lambda v: v[jnp.maximum(slots.pixel_column, 0)]
  flat = x.reshape(-1, x.shape[-1])
  fills = list(fill) if isinstance(fill, (tuple, list)) else [fill] * flat.shape[0]
  out = jnp.stack([jnp.where(has, take(flat[i]), fills[i]) for i in range(flat.shape[0])])
  return out.reshape(x.shape[:-1] + (h, w))


def _compact(valid, budget):
  """Compacts the entries where ``valid [T]`` (in order, so that a budget drops the last ones).
  Returns (kept [T] bool, rank [T] position of each kept entry, pos [budget] index of each position,
  T if unused,
  dropped [] int32)."""
  total = valid.shape[0]
  rank = cumsum(valid.astype(jnp.int32)) - 1
  kept = valid & (rank < budget)
  pos = (
    jnp.full((budget,), total, jnp.int32)
    .at[jnp.where(kept, rank, budget)]
    .set(jnp.arange(total, dtype=jnp.int32), mode="drop", unique_indices=True)
  )
  return kept, rank, pos, jnp.maximum(rank[-1] + 1 - budget, 0).astype(jnp.int32)


def _active_tiles(cand, settings: RasterSettings):
  """The tiles with candidate faces, compacted to the tile budget (row-major; the last are dropped).
  Returns (cand [A, M], tiles [A] int32 (n_tiles where unused), pixel_column [H * W], column_pixel
  [A * T * T], dropped [] int32)."""
  h, w = settings.image_size
  t = settings.tile_size
  nty, ntx = _grid(settings)
  n_tiles = nty * ntx
  budget = max(1, math.ceil(settings.tile_budget * n_tiles))
  _, _, tiles, dropped = _compact(cand[:, 0] >= 0, budget)
  used = tiles < n_tiles
  cand = jnp.where(used[:, None], cand[jnp.minimum(tiles, n_tiles - 1)], -1)
  local = jnp.arange(
    t * t, dtype=jnp.int32
  )  # [P] pixels of a tile, row-major (as ``_tile_pixels``)
  row = (tiles // ntx)[:, None] * t + local // t  # [A, P]
  col = (tiles % ntx)[:, None] * t + local % t
  inside = used[:, None] & (row < h) & (col < w)
  column_pixel = jnp.where(inside, row * w + col, h * w).reshape(-1)
  pixel_column = (
    jnp.full((h * w,), -1, jnp.int32)
    .at[column_pixel]
    .set(jnp.arange(column_pixel.shape[0], dtype=jnp.int32), mode="drop", unique_indices=True)
  )
  return cand, tiles, pixel_column, column_pixel, dropped


# --------------------------------------------------------------------------------------------------
# View culling (no gradient): binning / chunking runs over the faces that can touch the image only.
#
# Faces behind the near plane, degenerate, back-facing (when culled) or whose grown box misses the
# image are dropped before the depth sort, the (face, tile) pairs / chunks and the selection, which
# then cost what the view shows rather than what the mesh holds (a 32 x 32 headset crop sees ~10-20
# % of the head). Shapes stay static: ``RasterSettings.face_budget`` None (the default) picks, per
# call, the smallest rung of a ladder of pair / chunk budgets B, B / 2, B / 4, ... (B the full
# set's) that holds the view's, with the faces that can touch the image compacted (in face order)
# into a set of min(F, budget) faces, through a ``lax.switch`` (one branch runs; under vmap the rung
# is the batch's largest, see ``_batch_max``). Nothing is dropped, so the result is exactly the full
# set's; rung 0 (the full set and budget, today's path) is the fallback. A fraction below 1 fixes
# one set of ``ceil(face_budget * F)`` faces instead (faces beyond it, the last in face order, are
# dropped and counted in ``overflow``); 1 switches culling off. Evaluation and its gradient read the
# vertex table (gather / scatter-add of the selected faces' corners), so the gradients' shapes do
# not depend on the rung.

# The automatic ladder: pair / chunk budgets B, B / 2, B / 4, ... (B the full set's), down to
# ``_MIN_LADDER_BUDGET``, at most ``_MAX_RUNGS`` (each is a compiled branch of binning / chunking,
# ~0.6 s of compile at 40 x 40 px). K > 1 stops at ``_MIN_PAIR_RUNG`` pairs once it has one rung
# below B: a chunk (K = 1) costs T * T tests and three window scatters, a pair one sort entry, and
# rungs of fewer than ~1,000 pairs save microseconds.
_MIN_LADDER_BUDGET = 256
_MIN_PAIR_RUNG = 1024
_MAX_RUNGS = 6
# The fragment ladder (``RasterSettings.fragment_budget=None``): K * H * W, halving down to this
# many slots, at most this many of them (each rung a compiled branch of the evaluation and
# shading); below the half, a rung of 3/4 of the rung above between halvings while it holds at
# least ``_MIN_FINE_FRAGMENT_RUNG`` slots, so that a large view evaluates at most half again as
# many slots as it has, not twice as many (512 x 512, K = 8, back faces culled: ~18 % of the
# slots are non-empty, the 3/16 rung instead of 1/4; forward + backward ~20 ms faster, in-process
# A/B; two more compiled branches).
_MIN_FRAGMENT_RUNG = 4096
_MAX_FRAGMENT_RUNGS = 4
_MIN_FINE_FRAGMENT_RUNG = 1 << 17


@jax.custom_batching.custom_vmap
def _batch_max(x):
  """``x``; under vmap the maximum over the mapped axis, unbatched, so that a ``lax.switch``
  indexed by it stays a switch (a batched index would run every branch)."""
  return x


@_batch_max.def_vmap
def _batch_max_vmap(axis_size, in_batched, x):
  del axis_size
  if not in_batched[0]:
    return x, False
  return _batch_max(jnp.max(x, axis=0)), False  # again, for enclosing vmaps


def _ladder(num_faces, full_budget, settings: RasterSettings):
  """Static (face set size, pair / chunk budget) of each rung, the full set first."""
  if settings.face_budget is not None:
    size = min(num_faces, max(1, math.ceil(settings.face_budget * num_faces)))
    return ((size, max(1, math.ceil(full_budget * size / num_faces))),)
  rungs = [(num_faces, full_budget)]
  floor = _MIN_LADDER_BUDGET
  if settings.faces_per_pixel > 1:
    floor = max(floor, min(_MIN_PAIR_RUNG, -(-full_budget // 2)))
  while len(rungs) < _MAX_RUNGS and -(-rungs[-1][1] // 2) >= floor:
    budget = -(-rungs[-1][1] // 2)
    # Every face that can touch the image has at least one pair / chunk: a rung whose budget holds
    # the view's pairs / chunks holds its faces in min(F, budget).
    rungs.append((min(num_faces, budget), budget))
  return tuple(rungs)


def _project_columns(camera: Camera, verts, eps=1e-8):
  """``geometry.project_with_depth`` as columns (x [V], y [V] pixels, z [V] depth), written
  elementwise: XLA:CPU runs the [V, 3] x [3, 3] dots (and their gradients) as library calls,
  several times slower."""
  r, k = camera.Rt, camera.K
  x, y, z = verts[:, 0], verts[:, 1], verts[:, 2]
  cam = [r[i, 0] * x + r[i, 1] * y + r[i, 2] * z + r[i, 3] for i in range(3)]
  p = [k[i, 0] * cam[0] + k[i, 1] * cam[1] + k[i, 2] * cam[2] for i in range(3)]
  wz = jnp.where(jnp.abs(p[2]) < eps, jnp.where(p[2] < 0, -eps, eps), p[2])
  return p[0] / wz, p[1] / wz, cam[2]


def _corner_columns(camera: Camera, verts, faces):
  """The faces' projected corners as 9 columns [F] (x0, y0, x1, y1, x2, y2, z0, z1, z2): gathered in
  3-D, one gather per column, and projected after. Under vmap over cameras (views of one mesh) the
  gathers do not depend on the camera, so they run once per mesh rather than once per view (and,
  under vmap over meshes, column gathers are ~5x faster on XLA:CPU than gathering rows)."""
  corners = [
    jnp.stack([_take(verts[:, c], faces[:, k]) for c in range(3)], -1) for k in range(3)
  ]  # 3 x [F, 3]
  proj = [_project_columns(camera, c) for c in corners]
  return tuple(p[i] for p in proj for i in (0, 1)) + tuple(p[2] for p in proj)


def _faces_from_columns(cols):
  """9 columns [S] -> (xy [S, 3, 2], z [S, 3])."""
  xy = jnp.stack([jnp.stack(cols[2 * k : 2 * k + 2], -1) for k in range(3)], 1)
  return xy, jnp.stack(cols[6:], -1)


def _rects_from_columns(cols, settings: RasterSettings, exact=False):
  """A superset of ``_face_rects`` from the columns: (maybe [F] bool, c0, c1 [F, 2] int32 covering
  the pixel ranges). Conservative (the areas and boxes are checked with a margin), because its
  arithmetic may round differently from ``_face_rects``, which the selection runs again on the kept
  faces. ``exact``: ``_face_rects``' own thresholds instead (for a selection that uses these)."""
  x0, y0, x1, y1, x2, y2, z0, z1, z2 = cols
  area2 = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
  eps = AREA_EPS if exact else 0.5 * AREA_EPS
  ok = (z0 > settings.znear) & (z1 > settings.znear) & (z2 > settings.znear)
  ok &= (jnp.abs(area2) > eps) & jnp.isfinite(area2) & jnp.isfinite(z0 + z1 + z2)
  if settings.cull_backfaces:
    ok &= area2 < 0 if exact else area2 < eps
  r = settings.blur_radius + (1 if exact else 2) * _BIN_MARGIN
  c0, c1 = [], []
  for lo, hi, n in (
    (_min3(x0, x1, x2), _max3(x0, x1, x2), settings.image_size[1]),
    (_min3(y0, y1, y2), _max3(y0, y1, y2), settings.image_size[0]),
  ):
    a = jnp.ceil(jnp.clip(lo - r - 0.5, -1.0, n))
    b = jnp.floor(jnp.clip(hi + r - 0.5, -1.0, n))
    ok &= (a <= b) & (b >= 0) & (a <= n - 1)
    c0.append(jnp.maximum(a, 0).astype(jnp.int32))
    c1.append(jnp.minimum(b, n - 1).astype(jnp.int32))
  return ok, jnp.stack(c0, -1), jnp.stack(c1, -1)


def _in_view(select, cols, settings: RasterSettings, full_budget, per_face_units):
  """Runs ``select`` on the faces that can touch the image, compacted (see the section comment).

  Args:
    select: (xy [S, 3, 2], z [S, 3], budget, fits) -> (ids int32 array of face indices into its
      arguments, -1 for none; overflow [] int32; optional extra outputs, passed through), with
      ``budget`` a static count of pairs / chunks and ``fits`` (static) True when the budget is
      known to hold all of them.
    cols: ``_corner_columns`` of the faces (constants), 9 x [F].
    full_budget: the pair / chunk budget of the full set (scaled with the set's size).
    per_face_units: c0, c1 [F, 2] -> [F] int32 pairs / chunks of each face (where valid).
  Returns:
    (ids of ``select`` in face indices, overflow: ``select``'s plus faces beyond the set, extras).
  """
  f = cols[0].shape[0]
  rungs = _ladder(f, full_budget, settings)
  full = lambda budget, fits: lambda cols, maybe: select(*_faces_from_columns(cols), budget, fits)
  if rungs == ((f, full_budget),):
    return full(full_budget, False)(cols, None)
  maybe, c0, c1 = _rects_from_columns(cols, settings)
  units = jnp.sum(jnp.where(maybe, per_face_units(c0, c1), 0))

  def branch(size, budget, fits):
    if size == f:  # no compaction
      return full(budget, fits)

    def run(cols, maybe):
      _, _, pos, dropped = _compact(maybe, size)  # pos [size]: F where unused
      used = pos < f
      safe = jnp.minimum(pos, f - 1)
      # Unused entries become degenerate faces behind the camera (never valid).
      xy_c, z_c = _faces_from_columns([jnp.where(used, _take(c, safe), 0.0) for c in cols])
      ids, overflow, *extra = select(xy_c, z_c, budget, fits)
      ids = jnp.where(ids >= 0, pos[jnp.maximum(ids, 0)], -1)
      return (ids, overflow + dropped, *extra)

    return run

  if len(rungs) == 1:  # one fixed set (``face_budget`` < 1): may drop faces and pairs / chunks
    return branch(*rungs[0], False)(cols, maybe)
  # Rung i > 0 runs only when its budget holds the view's pairs / chunks (``fits``; monotone in i);
  # rung 0, the full set with the full budget, is the fallback.
  branches = [branch(n, b, i > 0) for i, (n, b) in enumerate(rungs)]
  holds = sum((units <= b).astype(jnp.int32) for _, b in rungs[1:])
  need = len(rungs) - 1 - holds  # 0 = the smallest
  rung = len(rungs) - 1 - _batch_max(need)
  return lax.switch(rung, branches, cols, maybe)


def _nearest_in_view(cols, settings: RasterSettings):
  """``select_nearest`` over the faces that can touch the image (``face_budget=None``, K = 1), on
  the smallest rung of the chunk ladder that holds the view's chunks (``_ladder``'s budgets; under
  vmap the batch's largest). The chunks are enumerated straight from all faces' columns (faces out
  of view have none), so no face set is compacted and each face's box is computed once; ties go to
  the smaller (minimum depth, face index), as in the depth-sorted full path, which rung 0 runs.
  Returns (ids [H, W] int32, overflow [] int32)."""
  f = cols[0].shape[0]
  full = _chunk_budget(f, settings)
  budgets = [b for _, b in _ladder(f, full, settings)]
  fallback = lambda cols, rect: select_nearest(*_faces_from_columns(cols), settings, full)[:2]
  if len(budgets) == 1:
    return fallback(cols, None)
  t = settings.tile_size
  valid, c0, c1 = _rects_from_columns(cols, settings, exact=True)
  nx = (c1[:, 0] - c0[:, 0]) // t + 1
  n_chunks = jnp.where(valid, nx * ((c1[:, 1] - c0[:, 1]) // t + 1), 0)
  total = jnp.sum(n_chunks)

  def branch(budget):
    def run(cols, rect):
      c0, c1, nx, n_chunks = rect
      s, local, live, _ = _enumerate(n_chunks, budget)
      fc = jnp.where(live, s, 0)
      corners = tuple(_take(c, fc) for c in cols)
      c0c = jnp.stack([_take(c0[:, 0], fc), _take(c0[:, 1], fc)], -1)
      c1c = jnp.stack([_take(c1[:, 0], fc), _take(c1[:, 1], fc)], -1)
      ids = _nearest_of_chunks(corners, live, s, local, _take(nx, fc), c0c, c1c, f, settings, True)
      return ids, jnp.int32(0)

    return run

  holds = sum((total <= b).astype(jnp.int32) for b in budgets[1:])
  rung = len(budgets) - 1 - _batch_max(len(budgets) - 1 - holds)
  branches = [fallback] + [branch(b) for b in budgets[1:]]
  return lax.switch(rung, branches, cols, (c0, c1, nx, n_chunks))


def _check_mesh(verts, faces):
  verts, faces = jnp.asarray(verts), jnp.asarray(faces)
  if verts.ndim != 2 or verts.shape[-1] != 3:
    raise ValueError(f"verts must be [V, 3], got {verts.shape}")
  if faces.ndim != 2 or faces.shape[-1] != 3:
    raise ValueError(f"faces must be [F, 3], got {faces.shape}")
  if not jnp.issubdtype(faces.dtype, jnp.integer):
    raise ValueError(f"faces must be integer, got {faces.dtype}")
  return verts, faces


class Selection(NamedTuple):
  """What ``select_slots`` hands to the evaluation (no gradient except through ``proj``).

  Attributes:
    proj: (x, y, z) [V] projected vertex columns (pixels, camera depth); differentiable.
    faces: [F, 3] int32.
    ids: [S, *Q] int32 selected face per slot and pixel column, -1 for empty slots.
    overflow: [] int32 (see ``Fragments.overflow``).
    pixel_column, column_pixel: see ``Slots`` (None when Q = (H, W)).
  """

  proj: tuple
  faces: jax.Array
  ids: jax.Array
  overflow: jax.Array
  pixel_column: jax.Array
  column_pixel: jax.Array


def select_slots(verts, faces, camera, settings: RasterSettings, num_slots=None) -> Selection:
  """Projection, binning and selection of ``rasterize_slots`` (``num_slots``: keep the first
  slots only)."""
  verts, faces = _check_mesh(verts, faces)
  faces = faces.astype(jnp.int32)
  vx, vy, vz = _project_columns(camera, verts)  # [V] each
  cols = _corner_columns(camera, lax.stop_gradient(verts), faces)  # 9 x [F] (selection)
  f = faces.shape[0]
  h = settings.image_size[0]
  w = settings.image_size[1]
  pixel_column = column_pixel = None
  t = settings.tile_size
  if settings.faces_per_pixel == 1:
    chunks = lambda c0, c1: ((c1[:, 0] - c0[:, 0]) // t + 1) * ((c1[:, 1] - c0[:, 1]) // t + 1)
    if settings.face_budget is None:
      ids, overflow = _nearest_in_view(cols, settings)
    else:
      nearest = lambda xy, z, b, fits: select_nearest(xy, z, settings, b, fits)[:2]
      ids, overflow = _in_view(nearest, cols, settings, _chunk_budget(f, settings), chunks)
    ids = ids[None]
  else:
    pairs = lambda c0, c1: (c1[:, 0] // t - c0[:, 0] // t + 1) * (c1[:, 1] // t - c0[:, 1] // t + 1)
    full = _pair_budget(f, settings)
    if settings.max_faces_per_tile is None:  # no cap: the sorted pairs, every candidate tested

      def binned(xy, z, b, fits):
        (face, starts), overflow, _ = _bin_faces(xy, z, settings, b)
        face = jnp.where(jnp.arange(b) < starts[-1], face, -1)
        return jnp.pad(face, (0, full - b), constant_values=-1), overflow, starts

    else:
      binned = lambda xy, z, b, fits: _bin_faces(xy, z, settings, b)[:2]
    cand, overflow, *starts = _in_view(binned, cols, settings, full, pairs)
    xy, z = _faces_from_columns(cols)  # selection reads the candidates' rows
    if starts:
      ids = select_blocks(xy, z, cand, starts[0], settings)
    elif settings.tile_budget < 1:
      cand, tiles, pixel_column, column_pixel, dropped = _active_tiles(cand, settings)
      overflow = overflow + dropped
      sel, dropped = _select(xy, z, cand, settings, tiles)  # [K, A, P]
      ids = jnp.where(column_pixel < h * w, sel.reshape(sel.shape[0], -1), -1)  # [K, A * P]
      overflow = overflow + dropped
    else:
      sel, dropped = _select(xy, z, cand, settings)
      ids = _untile(sel, settings)  # [K, H, W]
      overflow = overflow + dropped
  if num_slots is not None:
    ids = ids[:num_slots]
  return Selection((vx, vy, vz), faces, ids, overflow, pixel_column, column_pixel)


def fragment_ladder(num_slots, settings: RasterSettings):
  """Static fragment budgets (evaluated slots) of the automatic ladder (``fragment_budget=None``):
  the dense evaluation (every slot) first, then halving down to ``_MIN_FRAGMENT_RUNG`` (at most
  ``_MAX_FRAGMENT_RUNGS`` such rungs), with a 3/4 step between halvings below the half while it
  holds at least ``_MIN_FINE_FRAGMENT_RUNG`` slots (512 x 512, K = 8: 1, 1/2, 3/8, 1/4, 3/16, 1/8
  of the slots). One rung (dense) for small images."""
  halves = [num_slots]
  while len(halves) < _MAX_FRAGMENT_RUNGS and -(-halves[-1] // 2) >= _MIN_FRAGMENT_RUNG:
    halves.append(-(-halves[-1] // 2))
  rungs = list(halves[:2])
  for upper, lower in zip(halves[1:], halves[2:]):
    if -(-3 * upper // 4) >= _MIN_FINE_FRAGMENT_RUNG:
      rungs.append(-(-3 * upper // 4))
    rungs.append(lower)
  return tuple(rungs)


def fragment_rung(ids, rungs):
  """Index into ``rungs`` (``fragment_ladder``) of the smallest budget that holds the non-empty
  slots of ``ids``; under vmap the batch's largest (an unbatched [] int32)."""
  n = jnp.sum(ids >= 0)
  holds = sum((n <= b).astype(jnp.int32) for b in rungs[1:])
  return len(rungs) - 1 - _batch_max(len(rungs) - 1 - holds)


def evaluate_slots(sel: Selection, settings: RasterSettings, face_attrs=None, budget=None):
  """The differentiable evaluation of ``rasterize_slots``: the selected fragments of ``sel`` with
  at most ``budget`` (static) of them evaluated, compacted (default: from
  ``settings.fragment_budget``; None = every slot, dense). Returns (``Slots``, overflow)."""
  vx, vy, vz = sel.proj
  faces, ids, overflow = sel.faces, sel.ids, sel.overflow
  column_pixel = sel.column_pixel
  f = faces.shape[0]
  h, w = settings.image_size
  total = ids.size
  num_columns = total // ids.shape[0]
  if budget is None and settings.fragment_budget is not None:
    budget = max(1, math.ceil(settings.fragment_budget * ids.shape[0] * h * w))
  budget = total if budget is None else min(total, budget)
  valid = ids >= 0
  rank = pos = None
  if budget < total:
    kept, rank, pos, dropped = _compact(valid.reshape(-1), budget)
    valid = kept.reshape(ids.shape)
    overflow = overflow + dropped
    pixel = pos % num_columns  # (== 0 for unused entries: harmless, they evaluate the dummy face)
    if column_pixel is not None:
      pixel = column_pixel[pixel]
    # The face of each compacted fragment, scattered like ``pos`` (a gather through ``pos`` would be
    # fused into, and recomputed by, each of the evaluation's gathers that read it).
    rows = (
      jnp.full((budget,), -1, jnp.int32)
      .at[jnp.where(kept, rank, budget)]
      .set(ids.reshape(-1), mode="drop", unique_indices=True)
    )
  else:  # every slot: [S, Q] (broadcasting the pixel centres)
    pixel = (
      jnp.arange(h * w, dtype=jnp.int32).reshape(h, w) if column_pixel is None else column_pixel
    )
    rows = ids
  px = (pixel % w).astype(vx.dtype) + 0.5
  py = (pixel // w).astype(vx.dtype) + 0.5
  rows = jnp.where(rows >= 0, rows, f)
  # The fragments' corners are gathered from the projected vertices (x, y, z) [3, V + 3], through
  # the faces' vertex ids [3, F + 1]: the gradient is a scatter-add into the vertices, and nothing
  # the size of the faces is differentiated (a small view of a large mesh pays for its fragments
  # only). Face F and vertices V .. V + 2 are a harmless triangle that empty slots evaluate (no NaN
  # can reach the gradients).
  nv = vx.shape[0]
  dummy = jnp.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]], vx.dtype)
  table = jnp.concatenate([jnp.stack([vx, vy, vz]), dummy], axis=1)  # [3, V + 3]
  corners = jnp.concatenate([faces.T, jnp.arange(nv, nv + 3, dtype=jnp.int32)[:, None]], axis=1)
  corner = [gather_rows(table, corners[k][rows]) for k in range(3)]
  (x0, y0, z0), (x1, y1, z1), (x2, y2, z2) = corner
  bary, dist, depth = eval_fragment(x0, y0, x1, y1, x2, y2, z0, z1, z2, px, py)
  attrs = ()
  if face_attrs is not None:
    attrs = gather_rows(
      jnp.concatenate([face_attrs, jnp.zeros_like(face_attrs[:1])]).T, rows
    )  # [D, F + 1]
  slots = Slots(
    ids=ids,
    valid=valid,
    bary=bary,
    dist=dist,
    depth=depth,
    attrs=attrs,
    rank=rank,
    pos=pos,
    pixel_column=sel.pixel_column,
    column_pixel=column_pixel,
    image_size=(h, w),
  )
  return slots, overflow


def rasterize_slots(
  verts, faces, camera, settings: RasterSettings, face_attrs=None, num_slots=None
):
  """Shared core of ``rasterize`` and ``render_mesh``, slot-major: ``select_slots`` then
  ``evaluate_slots`` (``fragment_budget=None``: every slot).

  Args:
    face_attrs: optional [F, D] extra per-face columns gathered per fragment along with the
      geometry.
    num_slots: evaluate only the first ``num_slots`` slots (default all K).
  Returns:
    (``Slots``, overflow: ``Fragments.overflow`` plus the number of tiles beyond the tile budget and
    of non-empty slots beyond the fragment budget).
  """
  sel = select_slots(verts, faces, camera, settings, num_slots)
  return evaluate_slots(sel, settings, face_attrs)


class Occupancy(NamedTuple):
  """What views need of the settings (``occupancy``): per field, the smallest value of the setting
  of the same name with which nothing overflows. [] arrays, or batched under vmap."""

  fragment_budget: jax.Array  # float32 fraction of the K * H * W slots that are non-empty
  tile_budget: (
    jax.Array
  )  # float32 fraction of the screen tiles that hold candidate faces (K > 1; else 1)
  max_faces_per_tile: (
    jax.Array
  )  # int32: K > 1, the candidates of the fullest tile; K = 1, for the chunks
  heavy_tile_budget: (
    jax.Array
  )  # float32 fraction of the tiles with more than light_faces_per_tile (K > 1)


def occupancy(verts, faces, camera: Camera, settings: RasterSettings) -> Occupancy:
  """What a view needs of the budgets and of the per-tile cap (``Occupancy``).

  Runs binning and selection only (one pass with all ``max_faces_per_tile`` candidates; no
  evaluation, no gradient). Measure representative views (vmap over cameras and frames) and turn the
  maxima into settings with ``fit_budgets`` (README shows the recipe). With K = 1 there are no tiles
  (tile_budget = 1, heavy_tile_budget = 0) and ``max_faces_per_tile`` is what ``select_nearest``'s
  chunk budget needs.
  """
  verts, faces = _check_mesh(verts, faces)
  xy, z = project_faces(verts, faces, camera)
  if settings.faces_per_pixel == 1:
    ids, _, chunks = select_nearest(xy, z, settings)
    per_64 = _chunk_budget(
      xy.shape[0], settings.replace(max_faces_per_tile=64)
    )  # the budget is linear in M
    need = jnp.maximum(1, -(-64 * chunks // per_64)).astype(jnp.int32)
    return Occupancy(jnp.mean(ids >= 0), jnp.float32(1.0), need, jnp.float32(0.0))
  cand, _, demand = _bin_faces(xy, z, settings)
  if settings.max_faces_per_tile is None:
    face, starts = cand
    face = jnp.where(jnp.arange(face.shape[0]) < starts[-1], face, -1)
    ids = select_blocks(xy, z, face, starts, settings)
    active = starts[1:] > starts[:-1]
  else:
    ids = _untile(select_faces(xy, z, cand, settings), settings)
    active = cand[:, 0] >= 0
  return Occupancy(
    jnp.mean(ids >= 0),
    jnp.mean(active),
    jnp.max(demand).astype(jnp.int32),
    jnp.mean(demand > settings.light_faces_per_tile),
  )


def fit_budgets(settings: RasterSettings, occ: Occupancy, margin: float = 1.1) -> RasterSettings:
  """``settings`` with the budgets and the per-tile cap that measured views need, plus a margin.

  Args:
    settings: the settings the views were measured with.
    occ: ``occupancy`` of the views (any batch shape; the maximum over it is used).
    margin: headroom factor on each measured maximum.
  Returns:
    settings with ``fragment_budget``, ``tile_budget`` and ``heavy_tile_budget`` = min(1, margin *
    max), and ``max_faces_per_tile`` = margin * max rounded up to a multiple of 8 (at least K). The
    heavy fraction depends on the cap (it counts tiles with more than a quarter of it): when the cap
    changed, measure again with the new settings and fit again.
  """
  grab = lambda x: float(jnp.max(jnp.asarray(x)))
  h, w = settings.image_size
  k = settings.faces_per_pixel
  n_tiles = math.prod(_grid(settings))
  frac = lambda x, n: min(1.0, max(margin * grab(x), 1.0 / n))
  cap = max(k, int(math.ceil(margin * grab(occ.max_faces_per_tile) / 8.0)) * 8)
  if k == 1:  # no tiles
    return settings.replace(
      fragment_budget=frac(occ.fragment_budget, h * w), max_faces_per_tile=cap
    )
  return settings.replace(
    fragment_budget=frac(occ.fragment_budget, k * h * w),
    tile_budget=frac(occ.tile_budget, n_tiles),
    heavy_tile_budget=frac(occ.heavy_tile_budget, n_tiles),
    max_faces_per_tile=cap,
  )


def rasterize(verts, faces, camera: Camera, settings: RasterSettings) -> Fragments:
  """Rasterizes a triangle mesh into a pinhole camera.

  Args:
    verts: [V, 3] float vertices in the camera's world frame.
    faces: [F, 3] int32 vertex indices (either winding; see ``settings.cull_backfaces``).
    camera: a single ``Camera`` (vmap over a batched one).
    settings: ``RasterSettings`` (static).
  Returns:
    ``Fragments`` with up to K faces near each pixel centre (see ``select_faces``), nearest first.
    Faces with a vertex at depth <= ``settings.znear`` and degenerate faces are culled. Gradients
    flow to ``verts`` (and the camera) through ``bary``, ``dists`` and ``zbuf``.
  """
  s, overflow = rasterize_slots(verts, faces, camera, settings)
  image = lambda x, fill: jnp.moveaxis(to_image(s, x, fill), 0, -1)  # [K, Q] -> [H, W, K]
  return Fragments(
    face_ids=image(jnp.where(s.valid, s.ids, -1), -1),
    bary=jnp.stack([image(jnp.where(s.valid, expand(s, b), 0.0), 0.0) for b in s.bary], -1),
    dists=image(jnp.where(s.valid, expand(s, s.dist), EMPTY_DIST), EMPTY_DIST),
    zbuf=image(jnp.where(s.valid, expand(s, s.depth), 0.0), 0.0),
    overflow=overflow,
  )


def interpolate(fragments: Fragments, faces, attrs):
  """Interpolates per-vertex attributes at the fragments.

  Args:
    fragments: from ``rasterize``.
    faces: [F, 3] int32 indices into ``attrs`` (e.g. the mesh faces, or UV faces for per-corner
      UVs).
    attrs: [V, D] per-vertex attributes.
  Returns:
    [H, W, K, D], 0 for empty slots.
  """
  corner = jnp.asarray(attrs)[jnp.asarray(faces)][
    jnp.maximum(fragments.face_ids, 0)
  ]  # [H, W, K, 3, D]
  b = fragments.bary
  out = (
    b[..., 0:1] * corner[..., 0, :]
    + b[..., 1:2] * corner[..., 1, :]
    + b[..., 2:3] * corner[..., 2, :]
  )
  return jnp.where(fragments.face_ids[..., None] >= 0, out, 0.0)
