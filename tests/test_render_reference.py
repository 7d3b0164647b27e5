"""lipflow_jax.render against references written from the documented conventions alone (numpy,
float64), not from the renderer's code: which pixels a hard render covers, and the soft blend's
forward at the default settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lipflow_jax import geometry, render
from lipflow_jax.render import RasterSettings

SIZE = 64
# A pinhole camera written out: focal 64 px, principal point at the image centre, at z = -2 looking
# down +z (world to camera: identity rotation, t = (0, 0, 2)).
K = np.array([[64.0, 0.0, 32.0], [0.0, 64.0, 32.0], [0.0, 0.0, 1.0]])
RT = np.concatenate([np.eye(3), [[0.0], [0.0], [2.0]]], 1)


def _centres_inside(pix, h, w):
  """[h, w] bool: pixel centres (j + 0.5, i + 0.5) inside the triangle ``pix`` [3, 2] (pixels:
  x right, y down, origin at the top-left corner of the top-left pixel), and [h, w] the distance
  of each centre to the nearest edge line."""
  jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
  p = np.stack([jj, ii], -1)
  side, near = [], np.full((h, w), np.inf)
  for i in range(3):
    a, b = pix[i], pix[(i + 1) % 3]
    e = b - a
    cross = e[0] * (p[..., 1] - a[1]) - e[1] * (p[..., 0] - a[0])
    side.append(cross)
    near = np.minimum(near, np.abs(cross) / np.linalg.norm(e))
  side = np.stack(side)
  inside = np.all(side >= 0, 0) | np.all(side <= 0, 0)
  return inside, near


@pytest.mark.parametrize("seed", range(4))
def test_hard_coverage_is_the_pixel_centres_inside(seed):
  """A hard render covers exactly the pixels whose centre lies inside the projected triangle (the
  pixel convention of DESIGN section 5), so a half-pixel shift or a dilation of the coverage fails;
  pixels whose centre is within 1e-3 px of an edge line are left out (float32 rounding)."""
  rng = np.random.default_rng(10 + seed)
  pix = rng.uniform(4, SIZE - 4, (3, 2))
  # Back-project the pixel positions onto the plane z = 0 (camera depth 2).
  depth = 2.0
  cam_pts = np.concatenate([(pix - K[:2, 2]) / K[0, 0] * depth, np.full((3, 1), depth)], 1)
  verts = cam_pts - RT[:, 3]
  camera = geometry.Camera(K=jnp.asarray(K, jnp.float32), Rt=jnp.asarray(RT, jnp.float32))
  fr = jax.jit(render.rasterize, static_argnums=3)(
    jnp.asarray(verts, jnp.float32),
    jnp.asarray([[0, 1, 2]], jnp.int32),
    camera,
    RasterSettings.hard((SIZE, SIZE)),
  )
  covered = np.asarray(fr.face_ids)[..., 0] >= 0
  inside, near = _centres_inside(pix, SIZE, SIZE)
  sure = near > 1e-3
  assert inside.sum() > 20 and sure.mean() > 0.95
  np.testing.assert_array_equal(covered[sure], inside[sure])
  # The count is the area (to within the boundary pixels), as a sanity check of the reference.
  a, b = pix[1] - pix[0], pix[2] - pix[0]
  area = 0.5 * abs(a[0] * b[1] - a[1] * b[0])
  perimeter = sum(np.linalg.norm(pix[i] - pix[(i + 1) % 3]) for i in range(3))
  assert abs(inside.sum() - area) <= 0.5 * perimeter + 2


def _softras_reference(dist, depth, valid, colors, sigma, gamma, background):
  """The soft blend of RasterSettings' docstring, per pixel, float64.

  Slot k of a pixel: coverage p_k = 2 sigmoid(min(d_k, 0) / sigma) (0 if the slot is empty);
  alpha = 1 - prod_k (1 - p_k); colour weights w_k proportional to p_k exp(-r_k / gamma), with
  r_k = z_k / z_0 - 1 the depth relative to slot 0 (the pixel's nearest fragment);
  rgb = alpha sum_k w_k c_k + (1 - alpha) background; depth = sum_k w_k z_k (0 with no fragment).
  """
  k, n = dist.shape
  rgb, alpha, out_depth = np.zeros((n, colors.shape[0])), np.zeros(n), np.zeros(n)
  for i in range(n):
    slots = [s for s in range(k) if valid[s, i]]
    if not slots:
      rgb[i] = background
      continue
    d = dist[slots, i].astype(np.float64)
    z = depth[slots, i].astype(np.float64)
    p = 2.0 / (1.0 + np.exp(-np.minimum(d, 0.0) / sigma))
    alpha[i] = 1.0 - np.prod(1.0 - p)
    z0 = depth[0, i] if valid[0, i] else 1.0
    logw = np.log(p) - (z / z0 - 1.0) / gamma
    w = np.exp(logw - logw.max())
    w /= w.sum()
    fg = colors[:, slots, i].astype(np.float64) @ w
    rgb[i] = alpha[i] * fg + (1.0 - alpha[i]) * np.asarray(background)
    out_depth[i] = w @ z
  return rgb, alpha, out_depth


def test_soft_blend_forward_matches_the_softras_formula_at_default_settings():
  defaults = RasterSettings((8, 8))
  k, n = defaults.faces_per_pixel, 400
  rng = np.random.default_rng(0)
  # Fragments sorted nearest first (as the rasterizer hands them over), at depths around 5 that
  # differ by up to 1e-3 relative: several gamma = 1e-4 apart, so the depth weights matter.
  depth = np.sort(5.0 * (1.0 + rng.uniform(0, 1e-3, (k, n))), axis=0).astype(np.float32)
  dist = rng.uniform(-1.5 * defaults.sigma * 8, 2.0, (k, n)).astype(np.float32)
  used = rng.integers(0, k + 1, n)  # fragments per pixel, 0 .. K
  valid = np.arange(k)[:, None] < used[None]
  colors = rng.uniform(0, 1, (3, k, n)).astype(np.float32)
  background = (0.2, 0.5, 0.9)
  rgb, alpha, dep = jax.jit(render.soft_blend, static_argnums=(4, 5, 6))(
    jnp.asarray(dist),
    jnp.asarray(depth),
    jnp.asarray(valid),
    jnp.asarray(colors),
    defaults.sigma,
    defaults.gamma,
    background,
  )
  want_rgb, want_alpha, want_depth = _softras_reference(
    dist, depth, valid, colors, defaults.sigma, defaults.gamma, background
  )
  assert 0.05 < np.mean((want_alpha > 0.01) & (want_alpha < 0.99)) < 0.95  # soft edges occur
  np.testing.assert_allclose(np.asarray(alpha), want_alpha, atol=2e-6)
  np.testing.assert_allclose(np.asarray(rgb), want_rgb, atol=2e-5)
  np.testing.assert_allclose(np.asarray(dep), want_depth, rtol=1e-6, atol=1e-6)
