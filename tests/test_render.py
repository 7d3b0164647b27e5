"""Tests of lipflow_jax.render against slow numpy reference loops, analytic areas and finite
differences."""

import importlib
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lipflow_jax import geometry, render
from lipflow_jax.render import RasterSettings
from lipflow_jax.render.demo import demo_texture, head_mesh

H, W = 30, 37  # not multiples of the tile size


def _camera(h=H, w=W, eye=(0.3, 0.2, 6.0), focal=45.0):
  return geometry.Camera(
    K=geometry.intrinsics(focal, (h, w)), Rt=geometry.look_at(eye, (0.0, 0.0, 0.0))
  )


def _random_scene(seed, num_faces=14, spread=1.3):
  """Random triangles of mixed sizes and depths, some partly outside the image. Separate
  vertices."""
  rng = np.random.default_rng(seed)
  centres = rng.uniform(-spread, spread, (num_faces, 1, 3)) * np.array([1.0, 0.8, 1.0])
  scale = rng.uniform(0.15, 0.9, (num_faces, 1, 1))
  verts = (centres + scale * rng.normal(size=(num_faces, 3, 3))).reshape(-1, 3).astype(np.float32)
  faces = np.arange(3 * num_faces, dtype=np.int32).reshape(-1, 3)
  return verts, faces


# ------------------------------------------------------------------------------------------ numpy
# reference
def _seg_dist(p, a, b):
  e = b - a
  t = np.clip(np.sum((p - a) * e, -1) / max(np.sum(e * e), 1e-30), 0.0, 1.0)
  q = a + t[..., None] * e
  return np.sqrt(np.sum((p - q) ** 2, -1))


def reference_rasterize(verts, faces, camera, h, w, k, blur, znear=1e-3):
  """Brute force: every face at every pixel centre, float64, with the documented selection rule (see
  ``render.select_faces``).

  Returns face ids, bary, dists, zbuf ([h, w, k(, 3)]) and ``ambiguous`` [h, w]: pixels whose
  selection can flip under float32 rounding (a near-tie in depth, distance or minimum depth that
  decides a slot, or a face whose nearness is within rounding of the blur radius or its bounding
  box).
  """
  K = np.asarray(camera.K, np.float64)
  Rt = np.asarray(camera.Rt, np.float64)
  cam = np.asarray(verts, np.float64) @ Rt[:, :3].T + Rt[:, 3]
  proj = cam @ K.T
  xy = proj[:, :2] / proj[:, 2:3]
  z = cam[:, 2]
  jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
  p = np.stack([jj, ii], -1)  # [h, w, 2]
  cand = []  # per face: dict of maps
  for fi, f in enumerate(np.asarray(faces)):
    a, zz = xy[f], z[f]
    area2 = (a[1, 0] - a[0, 0]) * (a[2, 1] - a[0, 1]) - (a[1, 1] - a[0, 1]) * (a[2, 0] - a[0, 0])
    if np.any(zz <= znear) or abs(area2) <= 1e-6:
      continue
    lam, line = [], []
    for i in range(3):
      u, v = a[(i + 1) % 3], a[(i + 2) % 3]
      e = v - u
      ei = e[0] * (p[..., 1] - u[1]) - e[1] * (p[..., 0] - u[0])
      lam.append(ei / area2)
      line.append(np.sign(area2) * ei / np.linalg.norm(e))
    lam = np.stack(lam, -1)
    line = np.min(np.stack(line, -1), -1)  # signed distance to the nearest edge line
    inside = np.all(lam >= 0, -1)
    segd = np.min(
      np.stack([_seg_dist(p, a[(i + 1) % 3], a[(i + 2) % 3]) for i in range(3)], -1), -1
    )
    dist = np.where(inside, segd, -segd)
    lo, hi = a.min(0) - blur, a.max(0) + blur
    near = (line >= -blur) & np.all((p >= lo) & (p <= hi), -1)
    edge = np.min(np.abs(np.concatenate([p - lo, p - hi], -1)), -1)
    shaky = (
      (np.abs(line + blur) < 1e-3) | ((edge < 1e-3) & (line >= -blur - 1e-3))
      if blur > 0
      else 0 * line
    )
    key = np.clip(np.sum(lam / zz, -1), np.min(1 / zz), np.max(1 / zz))
    lc = np.maximum(lam, 0)
    lc /= lc.sum(-1, keepdims=True)
    q = lc / zz
    cand.append(
      dict(
        id=fi,
        zmin=zz.min(),
        key=key,
        line=line,
        near=near,
        shaky=shaky > 0,
        bary=q / q.sum(-1, keepdims=True),
        dist=dist,
        depth=1.0 / q.sum(-1),
      )
    )
  ids = -np.ones((h, w, k), np.int64)
  bary = np.zeros((h, w, k, 3))
  dists = np.zeros((h, w, k))
  zbuf = np.zeros((h, w, k))
  ambiguous = np.zeros((h, w), bool)
  close = lambda x, y, tol: abs(x - y) <= tol * max(abs(x), abs(y), 1e-9)
  for y in range(h):
    for x in range(w):
      ambiguous[y, x] = any(c["shaky"][y, x] for c in cand)
      near = sorted([c for c in cand if c["near"][y, x]], key=lambda c: (c["zmin"], c["id"]))
      if not near:
        continue
      cover = [c for c in near if c["line"][y, x] >= 0]
      if cover:
        score = lambda c: c["key"][y, x]
        pool, tol = cover, 1e-4
      else:
        score = lambda c: c["line"][y, x]
        pool, tol = near, 1e-4 / max(abs(score(near[0])), 1e-9)
      pool = sorted(pool, key=lambda c: -score(c))  # stable: ties to the smaller minimum depth
      first = pool[0]
      if len(pool) > 1 and close(score(pool[0]), score(pool[1]), tol):
        ambiguous[y, x] = True
      rest = [c for c in near if c is not first]
      if len(rest) > k - 1 >= 0 and k > 1 and close(rest[k - 2]["zmin"], rest[k - 1]["zmin"], 1e-5):
        ambiguous[y, x] = True
      chosen = sorted([first] + rest[: k - 1], key=lambda c: -c["key"][y, x])
      keys = [c["key"][y, x] for c in chosen]
      if any(close(keys[i], keys[i + 1], 1e-4) for i in range(len(keys) - 1)):
        ambiguous[y, x] = True
      for s, c in enumerate(chosen):
        ids[y, x, s] = c["id"]
        bary[y, x, s] = c["bary"][y, x]
        dists[y, x, s] = c["dist"][y, x]
        zbuf[y, x, s] = c["depth"][y, x]
  return ids, bary, dists, zbuf, ambiguous


def _unambiguous(ambiguous, verts, faces, camera, h, w, margin=2e-3):
  """Pixels whose selection cannot flip under float32 rounding: not ``ambiguous`` (see
  ``reference_rasterize``) and no pixel centre near any edge line (where covering is decided)."""
  ok = ~ambiguous
  xy, _ = geometry.project_with_depth(camera, jnp.asarray(verts))
  xy = np.asarray(xy, np.float64)
  jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
  p = np.stack([jj, ii], -1)
  for f in faces:
    for i in range(3):
      u, v = xy[f[(i + 1) % 3]], xy[f[(i + 2) % 3]]
      e = v - u
      d = np.abs(e[0] * (p[..., 1] - u[1]) - e[1] * (p[..., 0] - u[0])) / max(
        np.linalg.norm(e), 1e-12
      )
      ok &= d > margin
  return ok


# ------------------------------------------------------------------------------------------
# fixtures
HARD = RasterSettings.hard((H, W))
SOFT = RasterSettings((H, W), faces_per_pixel=4, sigma=0.5, blur_radius=1.5)


@pytest.fixture(scope="module")
def jit_rasterize():
  return jax.jit(render.rasterize, static_argnums=3)


@pytest.fixture(scope="module")
def jit_render():
  return jax.jit(render.render_mesh, static_argnums=6)


# ------------------------------------------------------------------------------------------
# settings
def test_settings_validation_and_hashing():
  s = RasterSettings((16, 24))
  assert hash(s) == hash(RasterSettings((16, 24)))
  assert s.blur_radius > 0 and not s.is_hard
  h = RasterSettings.hard([16, 24])
  assert h.is_hard and h.faces_per_pixel == 1 and h.blur_radius == 0.0 and h.image_size == (16, 24)
  for bad in [
    dict(image_size=(0, 4)),
    dict(image_size=(4,)),
    dict(image_size=(4, 4), faces_per_pixel=0),
    dict(image_size=(4, 4), sigma=-1.0),
    dict(image_size=(4, 4), gamma=0.0),
    dict(image_size=(4, 4), blur_radius=-1.0),
    dict(image_size=(4, 4), tile_size=0),
    dict(image_size=(4, 4), faces_per_pixel=8, max_faces_per_tile=4),
    dict(image_size=(4, 4), background=()),
    dict(image_size=(4, 4), znear=0.0),
    dict(image_size=(4, 4), fragment_budget=0.0),
    dict(image_size=(4, 4), fragment_budget=1.5),
    dict(image_size=(4, 4), heavy_tile_budget=0.0),
    dict(image_size=(4, 4), heavy_tile_budget=2.0),
    dict(image_size=(4, 4), face_budget=0.0),
    dict(image_size=(4, 4), face_budget=1.5),
    dict(image_size=(4, 4), face_budget=float("nan")),
  ]:
    with pytest.raises(ValueError, match="RasterSettings"):
      RasterSettings(**bad)


# ------------------------------------------------------------------------------------------
# rasterization
@pytest.mark.parametrize("seed", [0, 1])
def test_hard_matches_brute_force(jit_rasterize, seed):
  verts, faces = _random_scene(seed)
  cam = _camera()
  fr = jit_rasterize(jnp.asarray(verts), jnp.asarray(faces), cam, HARD)
  ids, bary, dists, zbuf, amb = reference_rasterize(verts, faces, cam, H, W, 1, 0.0)
  ok = _unambiguous(amb, verts, faces, cam, H, W)
  assert ok.mean() > 0.8
  got = np.asarray(fr.face_ids)
  np.testing.assert_array_equal(got[ok], ids[ok])
  m = ok[..., None] & (ids >= 0)
  assert m.sum() > 100
  np.testing.assert_allclose(np.asarray(fr.bary)[m], bary[m], atol=2e-4)
  np.testing.assert_allclose(np.asarray(fr.zbuf)[m], zbuf[m], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(fr.dists)[m], dists[m], atol=2e-3)
  assert int(fr.overflow) == 0


@pytest.mark.parametrize("num_faces,k,blur", [(18, 4, 1.5), (40, 2, 3.0), (40, 1, 2.0)])
def test_soft_matches_brute_force(jit_rasterize, num_faces, k, blur):
  """Binned selection (K > 1; K = 1 with a blur: the z-buffer path) equals the documented rule, also
  where more than K faces are near a pixel."""
  verts, faces = _random_scene(2, num_faces=num_faces, spread=1.6)
  cam = _camera()
  settings = RasterSettings(
    (H, W), faces_per_pixel=k, sigma=0.5, blur_radius=blur, max_faces_per_tile=64
  )
  fr = jit_rasterize(jnp.asarray(verts), jnp.asarray(faces), cam, settings)
  assert int(fr.overflow) == 0
  ids, bary, dists, zbuf, amb = reference_rasterize(verts, faces, cam, H, W, k, blur)
  ok = _unambiguous(amb, verts, faces, cam, H, W)
  assert ok.mean() > 0.5
  got = np.asarray(fr.face_ids)
  np.testing.assert_array_equal(got[ok], ids[ok])
  m = ok[..., None] & (ids >= 0)
  assert m.sum() > 200
  if k > 1:
    assert (np.sum(ids >= 0, -1) >= 2).sum() > 20
  # The rule is exercised: pixels with a covering face and pixels with near faces only.
  covered = np.any((ids >= 0) & (dists >= 0), -1)
  assert np.sum(ok & covered) > 50 and np.sum(ok & (ids[..., 0] >= 0) & ~covered) > 10
  np.testing.assert_allclose(np.asarray(fr.bary)[m], bary[m], atol=3e-4)
  np.testing.assert_allclose(np.asarray(fr.zbuf)[m], zbuf[m], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(fr.dists)[m], dists[m], atol=3e-3)
  assert np.all(np.asarray(fr.dists)[got < 0] == render.EMPTY_DIST)


def test_small_tiles_and_caps_agree(jit_rasterize):
  """Tile size and cap (when it does not overflow) do not change the result."""
  verts, faces = _random_scene(3)
  cam = _camera()
  a = jit_rasterize(jnp.asarray(verts), jnp.asarray(faces), cam, SOFT)
  b = jit_rasterize(
    jnp.asarray(verts),
    jnp.asarray(faces),
    cam,
    SOFT.replace(tile_size=5, max_faces_per_tile=20, blur_radius=SOFT.blur_radius),
  )
  assert int(a.overflow) == 0 and int(b.overflow) == 0
  np.testing.assert_array_equal(np.asarray(a.face_ids), np.asarray(b.face_ids))
  np.testing.assert_allclose(np.asarray(a.bary), np.asarray(b.bary), atol=1e-5)


def test_cumsum_matches_numpy():
  """``rasterize.cumsum`` (a parallel scan) against NumPy's sequential prefix sum: odd and
  power-of-2 lengths (the scan's padding), each axis, and under vmap."""
  cumsum = importlib.import_module("lipflow_jax.render.rasterize").cumsum
  rng = np.random.default_rng(0)
  for n in (1, 2, 7, 64, 1000, 4097):
    x = rng.integers(0, 3, n).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(jax.jit(cumsum)(jnp.asarray(x))), np.cumsum(x))
  x = rng.integers(-5, 5, (5, 6, 7)).astype(np.int32)
  for axis in (0, 1, 2, -1):
    got = jax.jit(cumsum, static_argnums=1)(jnp.asarray(x), axis)
    np.testing.assert_array_equal(np.asarray(got), np.cumsum(x, axis=axis))
  np.testing.assert_array_equal(
    np.asarray(jax.vmap(cumsum)(jnp.asarray(x[:, 0]))), np.cumsum(x[:, 0], axis=1)
  )


def test_selection_unrolled_and_scan_agree():
  """``select_faces`` takes the first set bits of its candidate masks unrolled for up to 128
  candidates per tile and with a scan beyond: padding the candidate lists with empty entries crosses
  over and changes nothing. The faces are many and small, so that tiles hold more than 32 candidates
  (several words)."""
  rng = np.random.default_rng(0)
  f = 120
  centre = rng.uniform(2, 22, (f, 1, 2))
  xy = jnp.asarray(centre + rng.uniform(-3, 3, (f, 3, 2)), jnp.float32)
  z = jnp.asarray(rng.uniform(2, 6, (f, 1)) + rng.uniform(0, 0.5, (f, 3)), jnp.float32)
  s = RasterSettings((24, 24), faces_per_pixel=8, sigma=0.5, tile_size=8, max_faces_per_tile=128)
  cand, overflow = jax.jit(render.bin_faces, static_argnums=2)(xy, z, s)
  assert int(overflow) == 0 and int(jnp.max(jnp.sum(cand >= 0, axis=1))) > 64
  padded = jnp.concatenate([cand, jnp.full((cand.shape[0], 64), -1, jnp.int32)], axis=1)
  select = jax.jit(render.select_faces, static_argnums=3)
  a = np.asarray(select(xy, z, cand, s))
  b = np.asarray(select(xy, z, padded, s.replace(max_faces_per_tile=192)))
  assert np.sum(a[1:] >= 0) > 0.5 * a[1:].size  # slots 1 .. K - 1 come from the bit masks
  np.testing.assert_array_equal(a, b)


def test_interpolate_depth_equals_zbuf(jit_rasterize):
  verts, faces = _random_scene(4)
  cam = _camera()
  fr = jit_rasterize(jnp.asarray(verts), jnp.asarray(faces), cam, HARD)
  cam_z = geometry.world_to_camera(cam, jnp.asarray(verts))[:, 2:3]
  zi = render.interpolate(fr, jnp.asarray(faces), cam_z)[..., 0]
  m = np.asarray(fr.face_ids) >= 0
  np.testing.assert_allclose(np.asarray(zi)[m], np.asarray(fr.zbuf)[m], rtol=1e-5)
  assert np.all(np.asarray(zi)[~m] == 0)


def test_orientation_winding_and_culling(jit_rasterize):
  """World up appears at the image top; either winding is drawn unless back faces are culled."""
  size = 32
  cam = geometry.Camera(
    K=geometry.intrinsics(40.0, (size, size)), Rt=geometry.look_at((0, 0, 5.0), (0, 0, 0))
  )
  verts = jnp.array(
    [[-1, -1, 0], [1, -1, 0], [0, 1, 0]], jnp.float32
  )  # counter-clockwise seen from +z
  front = jnp.array([[0, 1, 2]], jnp.int32)
  back = jnp.array([[0, 2, 1]], jnp.int32)
  hard = RasterSettings.hard((size, size))
  cov = np.asarray(jit_rasterize(verts, front, cam, hard).face_ids[..., 0]) >= 0
  rows = np.nonzero(cov.any(1))[0]
  widths = cov.sum(1)
  assert widths[rows[0]] < widths[rows[-1]]  # apex (world y = +1) at the top
  assert (np.asarray(jit_rasterize(verts, back, cam, hard).face_ids) >= 0).sum() == cov.sum()
  culled = RasterSettings.hard((size, size), cull_backfaces=True)
  assert (np.asarray(jit_rasterize(verts, front, cam, culled).face_ids) >= 0).sum() == cov.sum()
  assert (np.asarray(jit_rasterize(verts, back, cam, culled).face_ids) >= 0).sum() == 0
  # Behind the camera: culled.
  behind = verts.at[:, 2].add(10.0)
  assert (np.asarray(jit_rasterize(behind, front, cam, hard).face_ids) >= 0).sum() == 0


def _quad_stack(n=12, size=16):
  """n full-screen quads (2 faces each) at decreasing depth: the last quad is the nearest."""
  depths = np.linspace(5.0, 2.0, n)
  quad = np.array([[-2, -2], [2, -2], [2, 2], [-2, 2]], np.float32)
  verts = np.concatenate([np.concatenate([quad * d, np.full((4, 1), d)], -1) for d in depths])
  faces = np.concatenate([np.array([[0, 1, 2], [0, 2, 3]]) + 4 * i for i in range(n)])
  cam = geometry.Camera(K=geometry.intrinsics(16.0, (size, size)), Rt=jnp.eye(3, 4))
  return jnp.asarray(verts, jnp.float32), jnp.asarray(faces, jnp.int32), cam


def test_overflow_counter_and_nearest_kept(jit_rasterize):
  """Too small a cap overflows (counted) but keeps the nearest faces; an ample cap does not
  overflow."""
  n, size = 12, 16
  verts, faces, cam = _quad_stack(n, size)
  off_diagonal = ~np.eye(size, dtype=bool)  # pixel centres on the quads' diagonal edge are ties
  nearest = {2 * n - 2, 2 * n - 1}
  # K > 1 (tiles): a cap of 4 candidates per 8 x 8 tile overflows all 4 tiles.
  tiles = RasterSettings(
    (size, size), faces_per_pixel=2, sigma=0.1, tile_size=8, max_faces_per_tile=4
  )
  fr = jit_rasterize(verts, faces, cam, tiles)
  assert int(fr.overflow) == 4
  assert set(np.unique(np.asarray(fr.face_ids[..., 0]))) <= nearest
  ok = jit_rasterize(verts, faces, cam, tiles.replace(max_faces_per_tile=2 * n, sigma=0.1))
  assert int(ok.overflow) == 0
  np.testing.assert_array_equal(
    np.asarray(ok.face_ids[..., 0])[off_diagonal], np.asarray(fr.face_ids[..., 0])[off_diagonal]
  )
  # K = 1 (chunks): 24 faces x 4 chunks of 8 x 8 pixels exceed the chunk budget; the farthest are
  # dropped.
  hard = RasterSettings.hard((size, size), tile_size=8, max_faces_per_tile=16)
  fr = jit_rasterize(verts, faces, cam, hard)
  assert int(fr.overflow) > 0
  assert set(np.unique(np.asarray(fr.face_ids))) <= nearest
  ok = jit_rasterize(verts, faces, cam, hard.replace(max_faces_per_tile=256))
  assert int(ok.overflow) == 0
  np.testing.assert_array_equal(
    np.asarray(ok.face_ids[..., 0])[off_diagonal], np.asarray(fr.face_ids[..., 0])[off_diagonal]
  )


def test_fragment_budget_drops_farthest_slots_first(jit_rasterize):
  """A budget below the number of non-empty slots keeps them in slot-major order (slot 0 of every
  pixel, then slot 1, ...; row-major within a slot) and counts the rest in ``overflow``."""
  n, size, k = 12, 16, 4
  verts, faces, cam = _quad_stack(n, size)
  dense_settings = RasterSettings(
    (size, size), faces_per_pixel=k, sigma=0.1, max_faces_per_tile=2 * n
  )
  dense = jit_rasterize(verts, faces, cam, dense_settings)
  budget = 0.6
  part = jit_rasterize(verts, faces, cam, dense_settings.replace(fragment_budget=budget))
  ids = np.moveaxis(np.asarray(dense.face_ids), -1, 0)  # [K, H, W]
  assert np.all(ids >= 0) and int(dense.overflow) == 0  # every slot of every pixel is non-empty
  kept = (np.arange(ids.size) < int(np.ceil(budget * ids.size))).reshape(ids.shape)
  assert int(part.overflow) == ids.size - kept.sum()
  np.testing.assert_array_equal(
    np.moveaxis(np.asarray(part.face_ids), -1, 0), np.where(kept, ids, -1)
  )
  m = np.moveaxis(kept, 0, -1)
  np.testing.assert_allclose(np.asarray(part.bary)[m], np.asarray(dense.bary)[m], atol=1e-6)
  np.testing.assert_allclose(np.asarray(part.dists)[m], np.asarray(dense.dists)[m], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(part.dists)[~m], render.EMPTY_DIST)


def test_tile_budget_drops_last_tiles(jit_rasterize, jit_render):
  """A tile budget below the number of tiles holding faces keeps the first ones (row-major), renders
  the others as background and counts them in ``overflow``."""
  n, size = 12, 16
  verts, faces, cam = _quad_stack(n, size)
  settings = RasterSettings(
    (size, size), faces_per_pixel=2, sigma=0.1, tile_size=8, max_faces_per_tile=2 * n
  )
  dense = jit_rasterize(verts, faces, cam, settings)
  part = jit_rasterize(verts, faces, cam, settings.replace(tile_budget=0.5))  # 2 of the 4 tiles
  assert int(dense.overflow) == 0 and int(part.overflow) == 2
  np.testing.assert_array_equal(np.asarray(part.face_ids[:8]), np.asarray(dense.face_ids[:8]))
  np.testing.assert_allclose(np.asarray(part.bary[:8]), np.asarray(dense.bary[:8]), atol=1e-6)
  assert np.all(np.asarray(part.face_ids[8:]) == -1) and np.all(
    np.asarray(part.dists[8:]) == render.EMPTY_DIST
  )
  img = jit_render(
    verts,
    faces,
    verts[:, :2] * 0.0 + 0.5,
    faces,
    jnp.ones((2, 2, 3)),
    cam,
    settings.replace(tile_budget=0.5, background=(0.25, 0.5, 0.75)),
  )
  np.testing.assert_allclose(
    np.asarray(img.rgb[8:]), np.broadcast_to([0.25, 0.5, 0.75], (8, 16, 3))
  )
  assert np.all(np.asarray(img.alpha[8:]) == 0) and np.all(np.asarray(img.alpha[:8]) == 1)


def _head_view_40px():
  """The 1,000-face demo head and a 40 x 40 camera it half fills (the budget tests' scene)."""

  cam = geometry.Camera(
    K=geometry.intrinsics(48.0, (40, 40)), Rt=geometry.look_at((1.4, 0.8, 3.8), (0, 0, 0))
  )
  return head_mesh(1000), cam


def test_heavy_tile_budget_second_pass(jit_rasterize):
  """Two-pass selection: with room for every heavy tile it equals one pass over all candidates; with
  less, the first heavy tiles (row-major) get the second pass, the others keep the first pass (among
  the first ``light_faces_per_tile`` candidates) and are counted in ``overflow``. ``occupancy``
  counts what binning generates."""
  mesh, cam = _head_view_40px()
  verts, faces = jnp.asarray(mesh.verts), jnp.asarray(mesh.faces)
  settings = RasterSettings(
    (40, 40), faces_per_pixel=4, sigma=0.5, tile_size=4, max_faces_per_tile=128, cull_backfaces=True
  )
  light = settings.light_faces_per_tile
  assert light == 32
  # Candidates per tile, counted from binning with room for all.
  binned = lambda v, c, s: render.bin_faces(*render.project_faces(v, faces, c), s)
  cand, _ = jax.jit(binned, static_argnums=2)(verts, cam, settings.replace(max_faces_per_tile=1024))
  counts = np.asarray(jnp.sum(cand >= 0, axis=1))  # [100] tiles, row-major over 10 x 10
  occ = jax.jit(render.occupancy, static_argnums=3)(verts, faces, cam, settings)
  assert int(occ.max_faces_per_tile) == counts.max() <= 128
  heavy = np.flatnonzero(counts > light)
  assert float(occ.heavy_tile_budget) == pytest.approx(len(heavy) / counts.size)
  full = jit_rasterize(verts, faces, cam, settings)
  first = jit_rasterize(verts, faces, cam, settings.replace(max_faces_per_tile=light))
  assert int(full.overflow) == 0
  tile_of = lambda ids: np.asarray(ids).reshape(10, 4, 10, 4, -1).swapaxes(1, 2).reshape(100, -1)
  f_full, f_first = tile_of(full.face_ids), tile_of(first.face_ids)
  assert np.any(f_full[heavy] != f_first[heavy])  # the first pass alone would differ
  two = jit_rasterize(
    verts, faces, cam, settings.replace(heavy_tile_budget=len(heavy) / 100 + 0.005)
  )
  assert int(two.overflow) == 0
  np.testing.assert_array_equal(np.asarray(two.face_ids), np.asarray(full.face_ids))
  np.testing.assert_allclose(np.asarray(two.bary), np.asarray(full.bary), atol=1e-6)
  kept = len(heavy) // 2
  part = jit_rasterize(verts, faces, cam, settings.replace(heavy_tile_budget=kept / 100))
  assert int(part.overflow) == len(heavy) - kept
  f_part = tile_of(part.face_ids)
  np.testing.assert_array_equal(f_part[heavy[kept:]], f_first[heavy[kept:]])
  light_tiles = np.setdiff1d(np.arange(100), heavy[kept:])
  np.testing.assert_array_equal(f_part[light_tiles], f_full[light_tiles])


def test_fit_budgets_from_measured_views():
  """``fit_budgets`` takes the maximum over the views, adds the margin, rounds the cap up to a
  multiple of 8 (raising or lowering it) and keeps fractions of empty views above 0."""
  s = RasterSettings((32, 32), faces_per_pixel=4, tile_size=8, max_faces_per_tile=64)
  occ = render.Occupancy(
    fragment_budget=jnp.array([0.2, 0.3]),
    tile_budget=jnp.array([0.5, 0.4]),
    max_faces_per_tile=jnp.array([100, 117]),
    heavy_tile_budget=jnp.array([0.0, 0.1]),
  )
  fit = render.fit_budgets(s, occ, margin=1.1)
  assert fit.fragment_budget == pytest.approx(0.33) and fit.tile_budget == pytest.approx(0.55)
  assert (
    fit.heavy_tile_budget == pytest.approx(0.11) and fit.max_faces_per_tile == 136
  )  # ceil(128.7 / 8) * 8
  assert fit.faces_per_pixel == 4 and fit.image_size == (32, 32)
  empty = render.Occupancy(jnp.float32(0), jnp.float32(0), jnp.int32(0), jnp.float32(0))
  fit = render.fit_budgets(s, empty)
  assert fit.max_faces_per_tile == 4 and fit.tile_budget == fit.heavy_tile_budget == pytest.approx(
    1 / 16
  )
  assert fit.fragment_budget == pytest.approx(1 / (4 * 32 * 32))
  assert (
    render.fit_budgets(s, occ._replace(fragment_budget=jnp.array([0.95]))).fragment_budget == 1.0
  )


def test_occupancy_hard_mode_chunk_cap(jit_rasterize):
  """K = 1: ``occupancy`` gives the cap whose chunk budget holds every face's chunks: with it
  nothing overflows and the image is the default's; with half of it chunks are dropped."""
  n, size = 12, 16
  verts, faces, cam = _quad_stack(n, size)
  hard = RasterSettings.hard((size, size), tile_size=4, max_faces_per_tile=512)
  occ = jax.jit(render.occupancy, static_argnums=3)(verts, faces, cam, hard)
  need = int(occ.max_faces_per_tile)
  assert 64 < need < 512 and float(occ.tile_budget) == 1.0
  ref = jit_rasterize(verts, faces, cam, hard)
  fit = jit_rasterize(verts, faces, cam, hard.replace(max_faces_per_tile=need))
  assert int(ref.overflow) == int(fit.overflow) == 0
  np.testing.assert_array_equal(np.asarray(fit.face_ids), np.asarray(ref.face_ids))
  assert (
    int(jit_rasterize(verts, faces, cam, hard.replace(max_faces_per_tile=need // 2)).overflow) > 0
  )


@pytest.mark.parametrize(
  "settings,budgets",
  [
    (RasterSettings.hard((40, 40), cull_backfaces=True), ("fragment",)),
    (
      RasterSettings(
        (40, 40),
        faces_per_pixel=4,
        sigma=0.5,
        gamma=1e-2,
        max_faces_per_tile=256,
        cull_backfaces=True,
      ),
      ("fragment",),
    ),
    (
      RasterSettings(
        (40, 40),
        faces_per_pixel=4,
        sigma=0.5,
        gamma=1e-2,
        tile_size=4,
        max_faces_per_tile=128,
        cull_backfaces=True,
      ),
      ("fragment", "tile"),
    ),
    (
      RasterSettings(
        (40, 40),
        faces_per_pixel=4,
        sigma=0.5,
        gamma=1e-2,
        tile_size=4,
        max_faces_per_tile=128,
        cull_backfaces=True,
      ),
      ("fragment", "tile", "heavy"),
    ),
  ],
)
def test_budgets_equal_dense_evaluation(settings, budgets):
  """Evaluating only the non-empty slots (compacted, blended with segment sums), and only the tiles
  holding faces, gives the same render and gradients as evaluating every slot of every pixel. (gamma
  1e-2: with the default 1e-4 the blend weights amplify float32 rounding of the depths 10^4-fold,
  and the two paths round differently.)"""

  mesh, cam = _head_view_40px()
  verts, faces, uvs = jnp.asarray(mesh.verts), jnp.asarray(mesh.faces), jnp.asarray(mesh.uvs)
  uv_faces = jnp.asarray(mesh.uv_faces)
  tex = jnp.asarray(demo_texture(32))
  wts = jnp.asarray(np.random.default_rng(0).normal(size=(40, 40, 3)), jnp.float32)

  def run(s):
    def loss(v, t):
      out = render.render_mesh(v, faces, uvs, uv_faces, t, cam, s)
      return jnp.sum(out.rgb * wts) + jnp.sum(out.alpha) + jnp.sum(out.depth), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(verts, tex)
    return out, grads

  dense, g_dense = run(settings)
  # What the view needs (too little would overflow below); some slots and tiles are empty.
  occ = jax.jit(render.occupancy, static_argnums=3)(verts, faces, cam, settings)
  nonempty, active, heavy = (
    float(occ.fragment_budget),
    float(occ.tile_budget),
    float(occ.heavy_tile_budget),
  )
  assert 0.1 < nonempty < 0.75
  budget = {"fragment_budget": nonempty + 0.01}
  if "tile" in budgets:
    assert active < 0.8
    budget["tile_budget"] = active + 0.01
  if "heavy" in budgets:  # a second selection pass for the tiles with more than 32 candidates
    assert 0.1 < heavy < 0.8
    budget["heavy_tile_budget"] = heavy + 0.01
  part, g_part = run(settings.replace(**budget))
  assert int(dense.overflow) == 0 and int(part.overflow) == 0
  np.testing.assert_array_equal(np.asarray(part.face_id), np.asarray(dense.face_id))
  for a, b in zip(part[:3], dense[:3]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  for a, b in zip(g_part, g_dense):
    assert np.abs(np.asarray(b)).max() > 0
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * np.abs(np.asarray(b)).max()
    )


# ------------------------------------------------------------------------------------------ texture
def test_sample_texture_ramp_and_corners():
  th, tw = 8, 12
  rr, cc = np.meshgrid(np.arange(th), np.arange(tw), indexing="ij")
  tex = jnp.asarray(np.stack([cc, rr], -1).astype(np.float32))
  rng = np.random.default_rng(0)
  uv = rng.uniform(0, 1, (50, 2)).astype(np.float32)
  uv[:, 0] = np.clip(uv[:, 0], 0.5 / tw, 1 - 0.5 / tw)
  uv[:, 1] = np.clip(uv[:, 1], 0.5 / th, 1 - 0.5 / th)
  out = np.asarray(render.sample_texture(tex, jnp.asarray(uv)))
  np.testing.assert_allclose(out[:, 0], uv[:, 0] * tw - 0.5, atol=1e-5)
  np.testing.assert_allclose(out[:, 1], (1 - uv[:, 1]) * th - 0.5, atol=1e-5)
  corners = np.asarray(render.sample_texture(tex, jnp.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]])))
  np.testing.assert_allclose(corners, [[0, th - 1], [tw - 1, 0], [0, 0]])  # (col, row)
  # Batch shape and texel centres are exact.
  uvc = jnp.array([[[(3 + 0.5) / tw, 1 - (5 + 0.5) / th]]])
  np.testing.assert_allclose(render.sample_texture(tex, uvc), [[[3.0, 5.0]]])


def test_render_texture_not_flipped(jit_render):
  """A quad facing the camera with UV (0,0) at its bottom-left shows texture row 0 at the image
  top."""
  size = 24
  cam = geometry.Camera(
    K=geometry.intrinsics(24.0, (size, size)), Rt=geometry.look_at((0, 0, 3.0), (0, 0, 0))
  )
  verts = jnp.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], jnp.float32) * 1.3
  faces = jnp.array([[0, 1, 2], [0, 2, 3]], jnp.int32)
  uvs = jnp.array([[0, 0], [1, 0], [1, 1], [0, 1]], jnp.float32)
  tex = np.zeros((4, 4, 3), np.float32)
  tex[:2, :, 0] = 1.0  # top half red
  tex[:, 2:, 1] = 1.0  # right half green
  out = jit_render(
    verts, faces, uvs, faces, jnp.asarray(tex), cam, RasterSettings.hard((size, size))
  )
  rgb = np.asarray(out.rgb)
  assert rgb[3, 12, 0] == 1 and rgb[20, 12, 0] == 0
  assert rgb[12, 20, 1] == 1 and rgb[12, 3, 1] == 0
  assert np.asarray(out.face_id)[0, 0] == -1 and np.asarray(out.alpha)[0, 0, 0] == 0
  assert np.asarray(out.depth)[0, 0] == 0 and np.asarray(out.depth)[12, 12] == pytest.approx(
    3.0, rel=1e-5
  )


# ------------------------------------------------------------------------------------------
# gradients
def test_gradients_match_finite_differences():
  """Directional derivatives of a soft render (float64) w.r.t. vertices and texture vs central
  differences."""
  size = 20
  with jax.enable_x64(True):
    cam = geometry.Camera(
      K=geometry.intrinsics(24.0, (size, size)).astype(jnp.float64),
      Rt=geometry.look_at((0.3, 0.2, 3.0), (0, 0, 0)).astype(jnp.float64),
    )
    verts = jnp.array(
      [[-0.9, -0.8, 0.1], [0.8, -0.7, -0.2], [0.1, 0.9, 0.0], [0.9, 0.6, 0.4]], jnp.float64
    )
    faces = jnp.array([[0, 1, 2], [1, 3, 2]], jnp.int32)
    uvs = jnp.array([[0.1, 0.1], [0.9, 0.2], [0.4, 0.9], [0.9, 0.8]], jnp.float64)
    rng = np.random.default_rng(0)
    tex = jnp.asarray(rng.uniform(0, 1, (6, 6, 3)))
    # Large sigma, gamma and blur so that every face reaches every pixel: no selection changes under
    # FD.
    s = RasterSettings(
      (size, size),
      faces_per_pixel=2,
      sigma=3.0,
      gamma=0.05,
      blur_radius=100.0,
      tile_size=8,
      max_faces_per_tile=4,
      background=(0.2, 0.4, 0.6),
    )
    wr = jnp.asarray(rng.normal(size=(size, size, 3)))
    wa = jnp.asarray(rng.normal(size=(size, size, 1)))
    wd = jnp.asarray(rng.normal(size=(size, size)))
    wk = jnp.asarray(rng.normal(size=(size, size, 2)))

    def loss(v, t):
      out = render.render_mesh(v, faces, uvs, faces, t, cam, s)
      fr = render.rasterize(v, faces, cam, s)
      return (
        jnp.sum(out.rgb * wr)
        + jnp.sum(out.alpha * wa)
        + 0.1 * jnp.sum(out.depth * wd)
        + jnp.sum(fr.bary[..., 0] * wk)
        + 0.01 * jnp.sum(fr.dists * wk)
      )

    f = jax.jit(loss)
    gv, gt = jax.jit(jax.grad(loss, argnums=(0, 1)))(verts, tex)
    assert np.all(np.isfinite(np.asarray(gv))) and np.all(np.isfinite(np.asarray(gt)))
    eps = 1e-6
    for _ in range(3):
      dv = jnp.asarray(rng.normal(size=verts.shape))
      dt = jnp.asarray(rng.normal(size=tex.shape))
      fd_v = (f(verts + eps * dv, tex) - f(verts - eps * dv, tex)) / (2 * eps)
      fd_t = (f(verts, tex + eps * dt) - f(verts, tex - eps * dt)) / (2 * eps)
      np.testing.assert_allclose(float(jnp.sum(gv * dv)), float(fd_v), rtol=2e-4, atol=1e-7)
      np.testing.assert_allclose(float(jnp.sum(gt * dt)), float(fd_t), rtol=2e-4, atol=1e-7)


def test_sample_texture_gradients_match_autodiff_reference():
  rng = np.random.default_rng(3)
  tex = jnp.asarray(rng.uniform(size=(5, 7, 3)), jnp.float32)
  uv = jnp.asarray(
    rng.uniform(-0.1, 1.1, size=(40, 2)), jnp.float32
  )  # also outside [0, 1]: clamped
  w = jnp.asarray(rng.normal(size=(40, 3)), jnp.float32)

  def ref(t, uv):  # four plain lookups, differentiated by JAX
    th, tw, _ = t.shape
    x = jnp.clip(uv[:, 0] * tw - 0.5, 0, tw - 1)
    y = jnp.clip((1 - uv[:, 1]) * th - 0.5, 0, th - 1)
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    x1, y1 = jnp.minimum(x0 + 1, tw - 1), jnp.minimum(y0 + 1, th - 1)
    return (
      t[y0, x0] * (1 - fx) * (1 - fy)
      + t[y0, x1] * fx * (1 - fy)
      + t[y1, x0] * (1 - fx) * fy
      + t[y1, x1] * fx * fy
    )

  np.testing.assert_allclose(render.sample_texture(tex, uv), ref(tex, uv), atol=1e-6)
  got = jax.grad(lambda t, u: jnp.sum(render.sample_texture(t, u) * w), argnums=(0, 1))(tex, uv)
  want = jax.grad(lambda t, u: jnp.sum(ref(t, u) * w), argnums=(0, 1))(tex, uv)
  np.testing.assert_allclose(got[0], want[0], atol=1e-5)
  np.testing.assert_allclose(got[1], want[1], atol=1e-4)


def _degenerate_mesh():
  verts = jnp.array(
    [
      [-1, -1, 0],
      [1, -1, 0],
      [0, 1, 0],  # good
      [0.2, 0.2, 0.1],
      [0.2, 0.2, 0.1],
      [0.5, 0.6, 0.1],  # zero area (repeated vertex)
      [-0.5, 0.0, -0.5],
      [0.5, 0.0, 0.5],
      [0.0, 0.0, 0.0],  # edge-on (collinear on screen? nearly)
      [0.3, 0.3, 4.0],
      [0.6, 0.3, 4.0],
      [0.3, 0.6, 4.0],  # behind the camera
      [0.3, -0.3, 2.9],
      [0.6, -0.3, 6.0],
      [0.3, 0.1, 2.0],  # crosses the camera plane
    ],
    jnp.float32,
  )
  faces = jnp.arange(15, dtype=jnp.int32).reshape(5, 3)
  return verts, faces


@pytest.mark.parametrize(
  "settings",
  [RasterSettings.hard((20, 20)), RasterSettings((20, 20), faces_per_pixel=4, sigma=0.5)],
)
def test_no_nan_gradients_on_degenerate_faces(jit_rasterize, settings):
  verts, faces = _degenerate_mesh()
  cam = geometry.Camera(
    K=geometry.intrinsics(20.0, (20, 20)), Rt=geometry.look_at((0, 0, 3.0), (0, 0, 0))
  )
  tex = jnp.ones((4, 4, 3)) * jnp.arange(3.0)
  uvs = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (15, 2)), jnp.float32)

  def loss(v, t):
    out = render.render_mesh(v, faces, uvs, faces, t, cam, settings)
    return jnp.sum(out.rgb) + jnp.sum(out.alpha) + jnp.sum(out.depth)

  val, (gv, gt) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(verts, tex)
  assert np.isfinite(float(val))
  assert np.all(np.isfinite(np.asarray(gv))) and np.all(np.isfinite(np.asarray(gt)))
  assert np.any(np.asarray(gv)[:3] != 0)
  fr = jit_rasterize(verts, faces, cam, settings)
  assert set(np.unique(np.asarray(fr.face_ids))) <= {-1, 0}


# ------------------------------------------------------------------------------------------ view
# culling
def _crop_camera(size, centre, focal=48.0, eye=(1.4, 0.8, 3.8)):
  """A ``size`` x ``size`` window of ``_head_view_40px``'s camera, its top-left at ``centre`` - size
  / 2 of the 40 x 40 view (the principal point shifted)."""
  k = np.array(geometry.intrinsics(focal, (40, 40)), np.float64)
  k[0, 2] -= centre[0] - size / 2
  k[1, 2] -= centre[1] - size / 2
  return geometry.Camera(K=jnp.asarray(k, jnp.float32), Rt=geometry.look_at(eye, (0, 0, 0)))


def test_view_culling_ladder_picks_smallest_set():
  """``_in_view`` runs its selection on the smallest rung of the ladder whose budget holds the
  view's pairs / chunks (here one per face; the rung told by the set size the selection reports as
  its overflow), under vmap the largest the batch needs."""
  rz = importlib.import_module(
    "lipflow_jax.render.rasterize"
  )  # the module (``rasterize`` is a function)
  mesh, full = _head_view_40px()
  verts, faces = jnp.asarray(mesh.verts), jnp.asarray(mesh.faces)
  crop = _crop_camera(40, (20, 20), focal=192.0)  # a close-up
  s = RasterSettings.hard((40, 40))
  f = faces.shape[0]
  rungs = rz._ladder(f, 1000, s)
  assert rungs == ((f, 1000), (500, 500))

  def set_size(cam, settings):
    cols = rz._corner_columns(cam, verts, faces)
    select = lambda xy, z, budget, fits: (jnp.zeros((1,), jnp.int32), jnp.int32(xy.shape[0]))
    return rz._in_view(select, cols, settings, 1000, lambda c0, c1: c0[:, 0] * 0 + 1)[1]

  count = jax.jit(
    lambda cam: jnp.sum(rz._face_rects(*render.project_faces(verts, faces, cam), s)[0])
  )
  assert count(crop) <= 500 < count(full)
  one = jax.jit(set_size, static_argnums=1)
  assert int(one(crop, s)) == 500 and int(one(full, s)) == f
  many = jax.jit(jax.vmap(set_size, (0, None)), static_argnums=1)
  stack = lambda *cams: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *cams)
  np.testing.assert_array_equal(many(stack(crop, crop, full), s), [f] * 3)
  np.testing.assert_array_equal(many(stack(crop, crop), s), [500] * 2)
  # A fraction fixes one set; 1 switches culling off (the full set, no compaction).
  assert int(set_size(crop, s.replace(face_budget=0.3))) == math.ceil(0.3 * f)
  assert int(set_size(crop, s.replace(face_budget=1.0))) == f


@pytest.mark.parametrize(
  "settings",
  [
    RasterSettings.hard((12, 12)),
    RasterSettings(
      (12, 12),
      faces_per_pixel=4,
      sigma=0.5,
      gamma=1e-2,
      max_faces_per_tile=128,
      cull_backfaces=True,
    ),
    RasterSettings(
      (12, 12),
      faces_per_pixel=4,
      sigma=0.5,
      gamma=1e-2,
      max_faces_per_tile=128,
      cull_backfaces=True,
      tile_size=4,
      fragment_budget=0.6,
      tile_budget=0.8,
    ),
  ],
)
def test_view_culling_crop_equals_full_set(settings):
  """A 12 x 12 crop of a 1,000-face head with the faces compacted to the view (the default) renders
  and differentiates exactly like the full face set (``face_budget=1``), alone and batched with a
  full view."""

  mesh, _ = _head_view_40px()
  verts, faces, uvs = jnp.asarray(mesh.verts), jnp.asarray(mesh.faces), jnp.asarray(mesh.uvs)
  tex = jnp.asarray(demo_texture(32))
  cams = [
    _crop_camera(12, (16, 22)),
    _crop_camera(12, (20, 20), focal=16.0),
  ]  # a close-up, the whole head
  wts = jnp.asarray(np.random.default_rng(0).normal(size=(12, 12, 3)), jnp.float32)

  def run(s):  # jitted once per settings, over cameras
    def loss(v, t, cam):
      out = render.render_mesh(v, faces, uvs, faces, t, cam, s)
      return jnp.sum(out.rgb * wts) + jnp.sum(out.alpha) + jnp.sum(out.depth), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  assert settings.face_budget is None
  got, ref = run(settings), run(settings.replace(face_budget=1.0))
  for cam in cams:
    (_, out_got), g_got = got(verts, tex, cam)
    (_, out_ref), g_ref = ref(verts, tex, cam)
    assert np.any(np.asarray(out_ref.face_id) >= 0)
    if cam is cams[0] and settings.fragment_budget in (
      None,
      1,
    ):  # (the whole head overflows the small caps)
      assert int(out_ref.overflow) == 0
    for a, b in zip(
      jax.tree_util.tree_leaves((out_got, g_got)), jax.tree_util.tree_leaves((out_ref, g_ref))
    ):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Batched: the crop and the whole head in one vmap (the batch takes the larger set) and alone
  # agree.
  batch = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), *cams)
  many = jax.jit(
    jax.vmap(lambda c: render.render_mesh(verts, faces, uvs, faces, tex, c, settings))
  )(batch)
  for i, cam in enumerate(cams):
    (_, one), _ = got(verts, tex, cam)
    np.testing.assert_array_equal(np.asarray(many.face_id[i]), np.asarray(one.face_id))
    np.testing.assert_allclose(np.asarray(many.rgb[i]), np.asarray(one.rgb), atol=1e-6)


def test_hard_in_view_chunk_ladder_matches_brute_force():
  """K = 1 with the default ``face_budget=None``: the chunks enumerated straight from the faces in
  view, on a rung below the full budget (asserted), agree with the float64 brute force on a close-up
  of the 1,000-face head, jitted and vmapped over two crops (the batch takes the larger rung)."""
  rz = importlib.import_module("lipflow_jax.render.rasterize")
  mesh, _ = _head_view_40px()
  verts, faces = jnp.asarray(mesh.verts), jnp.asarray(mesh.faces)
  s = RasterSettings.hard((24, 24), tile_size=4, cull_backfaces=True)
  cams = [_crop_camera(24, (18, 16), focal=96.0), _crop_camera(24, (22, 24), focal=64.0)]
  f = faces.shape[0]
  budgets = [b for _, b in rz._ladder(f, rz._chunk_budget(f, s), s)]

  def chunks(cam):
    cols = rz._corner_columns(cam, verts, faces)
    valid, c0, c1 = rz._rects_from_columns(cols, s, exact=True)
    n = ((c1[:, 0] - c0[:, 0]) // 4 + 1) * ((c1[:, 1] - c0[:, 1]) // 4 + 1)
    return int(jnp.sum(jnp.where(valid, n, 0)))

  assert len(budgets) >= 3 and max(chunks(c) for c in cams) <= budgets[1]
  one = jax.jit(render.rasterize, static_argnums=3)
  many = jax.jit(jax.vmap(render.rasterize, (None, None, 0, None)), static_argnums=3)
  batch = many(verts, faces, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *cams), s)
  cull = np.asarray(mesh.faces)
  for i, cam in enumerate(cams):
    fr = one(verts, faces, cam, s)
    xy, _ = geometry.project_with_depth(cam, verts)
    xy = np.asarray(xy, np.float64)[cull]
    area2 = (xy[:, 1, 0] - xy[:, 0, 0]) * (xy[:, 2, 1] - xy[:, 0, 1]) - (
      xy[:, 1, 1] - xy[:, 0, 1]
    ) * (xy[:, 2, 0] - xy[:, 0, 0])
    front = cull[area2 < 0]  # the brute force has no culling: give it the front faces only
    ids, bary, _, zbuf, amb = reference_rasterize(mesh.verts, front, cam, 24, 24, 1, 0.0)
    ids = np.where(ids >= 0, np.flatnonzero(area2 < 0)[np.maximum(ids, 0)], -1)
    ok = _unambiguous(amb, mesh.verts, front, cam, 24, 24)
    assert ok.mean() > 0.5 and (ids[ok] >= 0).mean() > 0.5
    got = np.asarray(fr.face_ids)
    np.testing.assert_array_equal(got[ok], ids[ok])
    m = ok[..., None] & (ids >= 0)
    np.testing.assert_allclose(np.asarray(fr.zbuf)[m], zbuf[m], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(fr.bary)[m], bary[m], atol=2e-4)
    assert int(fr.overflow) == 0
    np.testing.assert_array_equal(np.asarray(batch.face_ids[i]), got)


def test_face_budget_overflow_counts_dropped_faces(jit_rasterize):
  """A compacted face set smaller than the view's faces keeps the first in face order and counts the
  rest in ``overflow``; one that holds them all equals the full set."""
  n, size = 12, 16
  verts, faces, cam = _quad_stack(n, size)  # 24 faces, all in view; the last quad is the nearest
  for s in [
    RasterSettings.hard((size, size), tile_size=8, max_faces_per_tile=256),
    RasterSettings((size, size), faces_per_pixel=2, sigma=0.1, tile_size=8, max_faces_per_tile=64),
  ]:
    half = jit_rasterize(verts, faces, cam, s.replace(face_budget=0.5))  # 12 faces: quads 0 .. 5
    assert int(half.overflow) == n
    ids = np.asarray(half.face_ids)
    assert set(np.unique(ids[..., 0])) <= {10, 11} and ids.max() <= 11
    full = jit_rasterize(verts, faces, cam, s.replace(face_budget=1.0))
    assert int(full.overflow) == 0 and set(np.unique(np.asarray(full.face_ids[..., 0]))) <= {22, 23}
    for budget in (None, 1.0 - 1e-6):  # auto, and a set that holds all 24
      same = jit_rasterize(verts, faces, cam, s.replace(face_budget=budget))
      for a, b in zip(same, full):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------
# batching
def test_vmap_over_cameras_and_frames(jit_render):
  verts, faces = _random_scene(5, num_faces=10)
  verts, faces = jnp.asarray(verts), jnp.asarray(faces)
  uvs = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (verts.shape[0], 2)), jnp.float32)
  tex = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (8, 8, 3)), jnp.float32)
  cams = geometry.dome_cameras(3, 6.0, (H, W), fov_degrees=40.0)
  s = SOFT
  render_cams = jax.jit(jax.vmap(lambda c: render.render_mesh(verts, faces, uvs, faces, tex, c, s)))
  out = render_cams(cams)
  chex.assert_shape(out.rgb, (3, H, W, 3))
  chex.assert_shape(out.alpha, (3, H, W, 1))
  chex.assert_shape(out.face_id, (3, H, W))
  chex.assert_shape(out.overflow, (3,))
  single = jit_render(verts, faces, uvs, faces, tex, geometry.index_camera(cams, 1), s)
  np.testing.assert_allclose(np.asarray(out.rgb[1]), np.asarray(single.rgb), atol=1e-5)
  # Frames: vmap over verts and texture with one camera.
  vb = jnp.stack([verts, verts * 1.1])
  tb = jnp.stack([tex, 1.0 - tex])
  cam = geometry.index_camera(cams, 0)
  frames = jax.jit(jax.vmap(lambda v, t: render.render_mesh(v, faces, uvs, faces, t, cam, s)))(
    vb, tb
  )
  chex.assert_shape(frames.rgb, (2, H, W, 3))
  second = jit_render(vb[1], faces, uvs, faces, tb[1], cam, s)
  np.testing.assert_allclose(np.asarray(frames.rgb[1]), np.asarray(second.rgb), atol=1e-5)
  # Gradients through vmap.
  g = jax.jit(
    jax.grad(
      lambda v: jnp.sum(
        jax.vmap(lambda c: render.render_mesh(v, faces, uvs, faces, tex, c, s).rgb)(cams)
      )
    )
  )(verts)
  assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)


def test_soft_render_blending_properties(jit_render):
  """Soft mode: opaque interior across shared edges, background outside, alpha in [0, 1]."""
  size = 24
  cam = geometry.Camera(
    K=geometry.intrinsics(24.0, (size, size)), Rt=geometry.look_at((0, 0, 3.0), (0, 0, 0))
  )
  verts = jnp.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], jnp.float32) * 0.9
  faces = jnp.array([[0, 1, 2], [0, 2, 3]], jnp.int32)
  uvs = jnp.array([[0, 0], [1, 0], [1, 1], [0, 1]], jnp.float32)
  tex = jnp.full((4, 4, 3), 0.5)
  s = RasterSettings((size, size), faces_per_pixel=4, sigma=0.5, background=(1.0, 0.0, 0.0))
  out = jit_render(verts, faces, uvs, faces, tex, cam, s)
  alpha = np.asarray(out.alpha[..., 0])
  assert np.all((alpha >= 0) & (alpha <= 1))
  inner = alpha[6:18, 6:18]
  np.testing.assert_allclose(inner, 1.0)  # including pixels on the diagonal shared edge
  np.testing.assert_allclose(np.asarray(out.rgb)[6:18, 6:18], 0.5, atol=1e-6)
  assert alpha[0, 0] == 0 and np.all(np.asarray(out.rgb)[0, 0] == [1, 0, 0])
  edge = alpha[12, 1:6]
  assert np.all(np.diff(edge) >= 0) and 0 < edge[1] < 1  # soft silhouette


# ------------------------------------------------------------------------------------------ NaN
# regressions
def _thin_fragments(n=20000, seed=0):
  """eval_fragment inputs: thin and tiny faces, pixels on vertices, on edges and on the edges'
  lines."""
  rng = np.random.default_rng(seed)
  c = rng.uniform(0, 64, (n, 1, 2))
  sc = 10 ** rng.uniform(-3, 1.5, (n, 1, 1))
  v = c + sc * rng.normal(size=(n, 3, 2))
  thin = rng.uniform(size=n) < 0.5
  t = rng.uniform(size=(n, 1))
  v[thin, 2] = (
    v[thin, 0] + (v[thin, 1] - v[thin, 0]) * t[thin] + 1e-3 * rng.normal(size=(thin.sum(), 2))
  )
  p = c[:, 0] + 2 * sc[:, 0] * rng.normal(size=(n, 2))
  kind = rng.integers(0, 4, n)
  p[kind == 1] = v[kind == 1, 0]
  p[kind == 2] = v[kind == 2, 0] + t[kind == 2] * (v[kind == 2, 1] - v[kind == 2, 0])
  p[kind == 3] = v[kind == 3, 0] + (1 + t[kind == 3]) * (v[kind == 3, 1] - v[kind == 3, 0])
  z = rng.uniform(1, 5, (n, 3))
  cols = [
    v[:, 0, 0],
    v[:, 0, 1],
    v[:, 1, 0],
    v[:, 1, 1],
    v[:, 2, 0],
    v[:, 2, 1],
    z[:, 0],
    z[:, 1],
    z[:, 2],
    p[:, 0],
    p[:, 1],
  ]
  # A face whose sub-areas all round to 0 at a pixel on its first vertex (found by the search
  # above).
  bad = [
    80.50482,
    -29.208767,
    58.61828,
    -6.360664,
    61.742393,
    -9.622034,
    1.8885946,
    4.724592,
    4.6843605,
    80.50482,
    -29.208767,
  ]
  return [jnp.asarray(np.append(a, b), jnp.float32) for a, b in zip(cols, bad)]


def test_eval_fragment_gradients_finite_on_thin_faces():
  """A loss of the distances alone still back-propagates (zero) cotangents through the barycentrics
  and depth; their partial derivatives must be finite even where rounding clips all barycentrics to
  0 (this used to give 0 * inf = NaN, eagerly or under jit depending on how XLA rounds)."""
  args = _thin_fragments()
  w = jnp.asarray(np.random.default_rng(1).normal(size=(4, args[0].shape[0])), jnp.float32)

  def dist_only(*a):
    (b0, _, _), d, dep = render.eval_fragment(*a)
    return jnp.sum(w[0] * d) + 0.0 * jnp.sum(dep) + 0.0 * jnp.sum(b0)

  def everything(*a):
    (b0, b1, _), d, dep = render.eval_fragment(*a)
    return jnp.sum(w[0] * d + w[1] * b0 + w[2] * b1 + w[3] * dep)

  for loss in (dist_only, everything):
    for grad in (
      jax.grad(loss, argnums=tuple(range(9))),
      jax.jit(jax.grad(loss, argnums=tuple(range(9)))),
    ):
      for g in grad(*args):
        assert np.all(np.isfinite(np.asarray(g)))
  (b0, b1, b2), _, dep = render.eval_fragment(*[a[-1:] for a in args])
  np.testing.assert_allclose(float(b0[0] + b1[0] + b2[0]), 1.0, rtol=1e-6)
  assert 1.8 < float(dep[0]) < 4.8


@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_dense_mesh_soft_render_and_gradients_jit_equal_eager(sigma):
  """Soft mode on a dense mesh (faces ~1 px, many within the blur radius): rgb, alpha and the
  gradients of a loss of them with respect to the vertices and the texture are finite and the same
  under jit and eagerly (guards against compiler-only discrepancies: XLA:CPU once mis-broadcast a
  channel reduction)."""

  size = 40
  mesh = head_mesh(3000)
  verts, faces = jnp.asarray(mesh.verts), jnp.asarray(mesh.faces)
  uvs = jnp.asarray(mesh.uvs)
  tex = jnp.asarray(demo_texture(32))
  cam = geometry.Camera(
    K=geometry.intrinsics(1.6 * size, (size, size)),
    Rt=geometry.look_at((1.4, 0.8, 3.8), (0.0, 0.0, 0.0)),
  )
  s = RasterSettings((size, size), faces_per_pixel=4, sigma=sigma)
  w = jnp.asarray(np.random.default_rng(0).normal(size=(size, size, 3)), jnp.float32)

  def loss(v, t):
    out = render.render_mesh(v, faces, uvs, faces, t, cam, s)
    return jnp.sum(out.rgb * w) + jnp.sum(out.alpha), (out.rgb, out.alpha)

  grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (_, (rgb_j, alpha_j)), (gv_j, gt_j) = jax.jit(grad)(verts, tex)
  (_, (rgb_e, alpha_e)), (gv_e, gt_e) = grad(verts, tex)
  np.testing.assert_allclose(np.asarray(rgb_j), np.asarray(rgb_e), atol=1e-4)
  np.testing.assert_allclose(np.asarray(alpha_j), np.asarray(alpha_e), atol=1e-5)
  opaque = np.asarray(alpha_e)[..., 0] > 0.99
  assert opaque.mean() > 0.1 and np.std(np.asarray(rgb_e)[opaque], axis=-1).mean() > 0.05
  # (Relative to the largest entry: the vertex gradients reach ~300 where faces are ~1 px.)
  for gj, ge, rel in ((gv_j, gv_e, 1e-3), (gt_j, gt_e, 2e-4)):
    gj, ge = np.asarray(gj), np.asarray(ge)
    assert np.all(np.isfinite(gj)) and np.all(np.isfinite(ge))
    assert np.abs(ge).max() > 0
    np.testing.assert_allclose(gj, ge, atol=rel * np.abs(ge).max())


def test_dense_mesh_wide_blur_keeps_covering_face(jit_render):
  """Many faces within the blur radius of each pixel (faces ~1 px, blur ~3.8 px, K = 4): every pixel
  whose centre a face covers (hard render) is opaque, and the coverage is about the hard one plus a
  soft rim."""

  size = 48
  mesh = head_mesh(3000)
  verts, faces, uvs = jnp.asarray(mesh.verts), jnp.asarray(mesh.faces), jnp.asarray(mesh.uvs)
  tex = jnp.asarray(demo_texture(32))
  cam = geometry.Camera(
    K=geometry.intrinsics(1.6 * size, (size, size)),
    Rt=geometry.look_at((1.4, 0.8, 3.8), (0.0, 0.0, 0.0)),
  )
  hard = jit_render(
    verts, faces, uvs, faces, tex, cam, RasterSettings.hard((size, size), cull_backfaces=True)
  )
  soft = jit_render(
    verts,
    faces,
    uvs,
    faces,
    tex,
    cam,
    RasterSettings(
      (size, size), faces_per_pixel=4, sigma=0.5, max_faces_per_tile=256, cull_backfaces=True
    ),
  )
  assert int(soft.overflow) == 0
  covered = np.asarray(hard.face_id) >= 0
  alpha = np.asarray(soft.alpha[..., 0])
  assert covered.mean() > 0.3
  assert np.all(alpha[covered] > 1 - 1e-5), np.sort(alpha[covered])[:5]
  np.testing.assert_array_equal(np.asarray(soft.face_id) >= 0, covered)
  assert covered.mean() < alpha.mean() < covered.mean() + 0.1


@pytest.mark.parametrize("outputs", ["bary dist depth", "bary", "dist", "depth"])
def test_eval_fragment_gradients_match_finite_differences(outputs):
  """The hand-written backward of eval_fragment vs central differences (float64), pixels inside and
  outside faces (the distance's closest feature an edge or a vertex), with cotangents on every
  output or on some only (the others are JAX's symbolic zeros, whose terms the backward skips)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    n = 400
    v = rng.uniform(0, 10, (n, 3, 2))
    p = rng.uniform(-2, 12, (n, 2))
    bary = rng.dirichlet(np.ones(3), n // 2)  # half of the pixels inside their face
    p[: n // 2] = np.einsum("nk,nkc->nc", bary, v[: n // 2])
    z = rng.uniform(1, 3, (n, 3))
    args = [
      jnp.asarray(a)
      for a in (
        v[:, 0, 0],
        v[:, 0, 1],
        v[:, 1, 0],
        v[:, 1, 1],
        v[:, 2, 0],
        v[:, 2, 1],
        z[:, 0],
        z[:, 1],
        z[:, 2],
        p[:, 0],
        p[:, 1],
      )
    ]
    w = jnp.asarray(rng.normal(size=(5, n)))

    def loss(*a):
      (b0, b1, b2), d, dep = render.eval_fragment(*a)
      terms = {"bary": w[0] * b0 + w[1] * b1 + w[2] * b2, "dist": w[3] * d, "depth": w[4] * dep}
      return jnp.sum(sum(terms[o] for o in outputs.split()), axis=0)

    per = jax.vmap(jax.grad(lambda *a: loss(*a), argnums=tuple(range(9))))(
      *[a[:, None] for a in args]
    )
    eps = 1e-6
    (_, _, _), d, _ = render.eval_fragment(*args)
    assert np.sum(np.asarray(d) > 0) > 50 and np.sum(np.asarray(d) < 0) > 50
    f = jax.jit(lambda *a: jax.vmap(lambda *b: loss(*b))(*[x[:, None] for x in a]))
    for j in range(9):
      up = list(args)
      dn = list(args)
      up[j] = up[j] + eps
      dn[j] = dn[j] - eps
      fd = (f(*up) - f(*dn)) / (2 * eps)
      np.testing.assert_allclose(np.asarray(per[j])[:, 0], np.asarray(fd), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# automatic settings (the defaults)
def test_uncapped_selection_equals_ample_cap_and_vmap(jit_rasterize):
  """``max_faces_per_tile=None`` (the default) tests every candidate of every tile in blocks: the
  same fragments as a cap that holds every tile, no overflow, and the same under vmap (views whose
  loops run different numbers of blocks)."""
  mesh, cam = _head_view_40px()
  verts, faces = jnp.asarray(mesh.verts), jnp.asarray(mesh.faces)
  for k, t in [(4, 4), (8, 8), (2, 3)]:
    s = RasterSettings((40, 40), faces_per_pixel=k, sigma=0.5, tile_size=t, cull_backfaces=True)
    assert s.max_faces_per_tile is None
    auto = jit_rasterize(verts, faces, cam, s)
    capped = jit_rasterize(verts, faces, cam, s.replace(max_faces_per_tile=512))
    assert int(auto.overflow) == int(capped.overflow) == 0
    for a, b in zip(auto[:4], capped[:4]):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  crop = geometry.Camera(K=geometry.intrinsics(120.0, (40, 40)), Rt=cam.Rt)  # a close-up
  cams = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), cam, crop)
  many = jax.jit(jax.vmap(lambda c: render.rasterize(verts, faces, c, s)))(cams)
  for i, c in enumerate((cam, crop)):
    np.testing.assert_array_equal(
      np.asarray(many.face_ids[i]), np.asarray(jit_rasterize(verts, faces, c, s).face_ids)
    )


@pytest.mark.parametrize("num_faces,k,blur", [(18, 4, 1.5), (40, 2, 3.0)])
def test_uncapped_soft_matches_brute_force(jit_rasterize, num_faces, k, blur):
  """The uncapped block selection follows the documented rule (brute force, float64)."""
  verts, faces = _random_scene(2, num_faces=num_faces, spread=1.6)
  cam = _camera()
  settings = RasterSettings((H, W), faces_per_pixel=k, sigma=0.5, blur_radius=blur)
  fr = jit_rasterize(jnp.asarray(verts), jnp.asarray(faces), cam, settings)
  assert int(fr.overflow) == 0
  ids, bary, _, _, amb = reference_rasterize(verts, faces, cam, H, W, k, blur)
  ok = _unambiguous(amb, verts, faces, cam, H, W)
  assert ok.mean() > 0.5 and (np.sum(ids >= 0, -1) >= 2).sum() > 20
  np.testing.assert_array_equal(np.asarray(fr.face_ids)[ok], ids[ok])
  m = ok[..., None] & (ids >= 0)
  np.testing.assert_allclose(np.asarray(fr.bary)[m], bary[m], atol=3e-4)


def test_fragment_ladder_picks_the_smallest_rung_that_holds():
  """The ladder of a large view (512 x 512, K = 8) and the rung picked for n non-empty slots,
  against the brute-force choice (the last rung of at least n) and the ladder's promise: dense
  first, decreasing, at least 4096 slots, and a view filling at least the smallest rung gets at
  most 3/2 of its slots (steps of 3/4 and 2/3; 2 in halving steps below 2^17 slots)."""
  rz = importlib.import_module("lipflow_jax.render.rasterize")
  s = RasterSettings((512, 512), faces_per_pixel=8)
  total = 8 * 512 * 512
  rungs = rz.fragment_ladder(total, s)
  assert rungs[0] == total and rungs[-1] >= 4096
  assert all(a > b for a, b in zip(rungs, rungs[1:]))
  rung_of = jax.jit(lambda n: rz.fragment_rung(jnp.where(jnp.arange(total) < n, 0, -1), rungs))
  for n in [0, 1, rungs[-1], rungs[-1] + 1, 380_000, 393_216, 393_217, 700_000, total // 2 + 1]:
    r = int(rung_of(n))
    assert r == max(i for i, b in enumerate(rungs) if b >= n), n
    if rungs[-1] <= n <= rungs[1]:
      assert rungs[r] <= (3 / 2 if rungs[r] >= 1 << 17 else 2) * n + 1, (n, rungs[r])


def test_auto_fragment_budget_equals_explicit_rung():
  """``fragment_budget=None`` (the default) evaluates the smallest rung of the ladder that holds the
  view's non-empty slots: bit for bit the render of that budget given explicitly, and its gradients
  (to the last bit's rounding), under vmap too (the batch takes the largest rung), and never drops
  a slot."""
  rz = importlib.import_module("lipflow_jax.render.rasterize")
  mesh = head_mesh(1000)
  verts, faces, uvs = jnp.asarray(mesh.verts), jnp.asarray(mesh.faces), jnp.asarray(mesh.uvs)
  uv_faces, tex = jnp.asarray(mesh.uv_faces), jnp.asarray(demo_texture(32))
  for s, rung in [
    (RasterSettings.hard((128, 128), cull_backfaces=True), 2),
    (RasterSettings((80, 80), faces_per_pixel=4, sigma=0.5, gamma=1e-2, cull_backfaces=True), 1),
  ]:
    h = s.image_size[0]
    cam = geometry.Camera(
      K=geometry.intrinsics(1.2 * h, (h, h)), Rt=geometry.look_at((1.4, 0.8, 3.8), (0, 0, 0))
    )
    wts = jnp.asarray(np.random.default_rng(0).normal(size=(h, h, 3)), jnp.float32)

    def run(s, cam=cam, wts=wts):
      def loss(v, t, u):
        out = render.render_mesh(v, faces, u, uv_faces, t, cam, s)
        return jnp.sum(out.rgb * wts) + jnp.sum(out.alpha) + jnp.sum(out.depth), out

      # The uvs differentiated in one mode only (the ladder's backward skips undifferentiated ones).
      wrt = (0, 1) if s.is_hard else (0, 1, 2)
      return jax.jit(jax.value_and_grad(loss, argnums=wrt, has_aux=True))(verts, tex, uvs)

    select = jax.jit(rz.select_slots, static_argnums=(3, 4))
    sel = select(verts, faces, cam, s, 1 if s.is_hard else None)
    rungs = rz.fragment_ladder(sel.ids.size, s)
    assert len(rungs) == 3 and int(rz.fragment_rung(sel.ids, rungs)) == rung
    (_, auto), g_auto = run(s)
    (_, fixed), g_fixed = run(s.replace(fragment_budget=rungs[rung] / sel.ids.size))
    assert int(auto.overflow) == int(fixed.overflow) == 0
    for a, b in zip(jax.tree_util.tree_leaves(auto), jax.tree_util.tree_leaves(fixed)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The gradients are the same sums, but XLA fuses (and so rounds) the projection's backward
    # differently in the two programs: it has moved 43 of 1,620 vertex gradient entries by 1 ulp.
    for a, b in zip(jax.tree_util.tree_leaves(g_auto), jax.tree_util.tree_leaves(g_fixed)):
      b = np.asarray(b)
      np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7 * np.abs(b).max())
    if not s.is_hard:
      continue  # (the rung's batching rule is the same in both modes; soft close-ups rarely fill K)
    # Batched with a close-up that needs a larger rung: the batch takes the larger.
    close = geometry.Camera(K=geometry.intrinsics(6.0 * h, (h, h)), Rt=cam.Rt)
    r_close = int(rz.fragment_rung(select(verts, faces, close, s, None).ids, rungs))
    assert r_close < rung
    cams = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), cam, close)
    many = jax.jit(jax.vmap(lambda c: render.render_mesh(verts, faces, uvs, uv_faces, tex, c, s)))(
      cams
    )
    big = jax.jit(render.render_mesh, static_argnums=6)(
      verts,
      faces,
      uvs,
      uv_faces,
      tex,
      cam,
      s.replace(fragment_budget=rungs[min(rung, r_close)] / sel.ids.size),
    )
    np.testing.assert_array_equal(np.asarray(many.face_id[0]), np.asarray(big.face_id))
    np.testing.assert_allclose(np.asarray(many.rgb[0]), np.asarray(big.rgb), atol=1e-5)
