"""A procedural, person-specific head: fixed-topology face mesh with UVs, expression model and
appearance.

The face is a grid of vertices on a *face plane* (millimetres): x to the subject's left, y up,
origin between the eyes and the mouth. The plane is wrapped onto an ellipsoid (the head, centred at
the origin of head coordinates, facing +z, y up) and pushed along its normal by a height field
(nose, brows, eye sockets, lips, chin). UVs are a monotone per-axis warp of the plane that gives the
eyes, the mouth interior and the central face more texels.

Expression factors (``FACTOR_NAMES``) displace vertices in the plane (before wrapping) or along the
normal, with smooth, localised weights; some only change the albedo. The mouth interior is a band of
UV rows that is folded to about 1 mm at rest and opens with the jaw, like a real mouth; the eye
opening is a region that the upper lid compresses onto the lower lid.

    visible to keypoints (jaw, lips, brows, eyelids)   -> geometry of the keypoint vertices
    hidden (gaze, tongue, cheek puff, wrinkles, flush) -> albedo, or geometry off the keypoints

Appearance: albedo(UV, factors) and a shading model with a view-dependent Blinn-Phong specular and a
rim term, lit by two lights fixed in head coordinates; ``shade`` turns albedo into the colour a
camera at a given position sees, so unwrapped textures differ between cameras.

Every function after ``make_head`` is pure JAX and jit/vmap friendly.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lipflow_jax.geometry import mesh as mesh_lib

# -----------------------------------------------------------------------------------------------
# factors
FACTOR_NAMES = (
  "jaw_open",
  "lip_corner_l",
  "lip_corner_r",
  "pucker",
  "brow_raise_l",
  "brow_raise_r",
  "eyelid_close_l",
  "eyelid_close_r",  # visible to keypoints
  "gaze_x",
  "gaze_y",
  "tongue",
  "cheek_puff",
  "wrinkles",
  "flush",  # hidden from keypoints
)
NUM_FACTORS = len(FACTOR_NAMES)
FACTOR_KEYPOINT_VISIBLE = tuple(i < 8 for i in range(NUM_FACTORS))
# What the headset cameras see: eyes (lids, gaze), mouth (jaw, lips, pucker, tongue, part of the
# cheeks).
FACTOR_HMC_VISIBLE = tuple(
  n not in ("brow_raise_l", "brow_raise_r", "wrinkles", "flush") for n in FACTOR_NAMES
)
FACTOR_RANGES = {
  "jaw_open": (0.0, 1.0),
  "lip_corner_l": (-0.3, 1.0),
  "lip_corner_r": (-0.3, 1.0),
  "pucker": (0.0, 1.0),
  "brow_raise_l": (-0.4, 1.0),
  "brow_raise_r": (-0.4, 1.0),
  "eyelid_close_l": (0.0, 1.0),
  "eyelid_close_r": (0.0, 1.0),
  "gaze_x": (-1.0, 1.0),
  "gaze_y": (-1.0, 1.0),
  "tongue": (0.0, 1.0),
  "cheek_puff": (0.0, 1.0),
  "wrinkles": (0.0, 1.0),
  "flush": (-1.0, 1.0),
}
F = {n: i for i, n in enumerate(FACTOR_NAMES)}

# ------------------------------------------------------------------------------------- face plane
# (mm)
X_HALF = 150.0  # plane x in [-X_HALF, X_HALF]
Y_MIN, Y_MAX = -125.0, 115.0
EYE_X, EYE_Y, EYE_HW, EYE_UP, EYE_LO = 32.0, 26.0, 14.0, 5.5, 3.5
BROW_Y = 41.0
MOUTH_Y, MOUTH_HW, MOUTH_BAND = (
  -45.0,
  25.0,
  0.6,
)  # the folded mouth band is 2 * MOUTH_BAND high at rest
JAW_OPEN_MM = 16.0
# Ellipsoid: plane -> angles -> head coordinates.
THETA_SCALE, PHI_SCALE = 84.0, 112.0
RADII = (78.0, 112.0, 95.0)

# Lights in head coordinates (direction towards the light, intensity); ambient term.
LIGHTS = (
  (np.array([0.4, 0.6, 1.0]) / np.linalg.norm([0.4, 0.6, 1.0]), 0.65),
  (np.array([-0.7, 0.1, 0.7]) / np.linalg.norm([-0.7, 0.1, 0.7]), 0.30),
)
AMBIENT = 0.35


class Head(NamedTuple):
  """Static description of one synthetic person (numpy arrays).

  Attributes:
    plane: [V, 2] rest face-plane coordinates (mm) of the vertices.
    uvs: [V, 2] texture coordinates (UV (0, 0) = bottom-left), one per vertex.
    faces: [F, 3] int32, counter-clockwise seen from outside; ``uv_faces`` equal ``faces``.
    keypoint_vertex_ids: [P] int32; ``keypoint_names``: P strings.
    person: [S] float32 person-specific appearance parameters (skin blotches, iris colour).
    grid: (rows, cols) of the vertex grid.
  """

  plane: np.ndarray
  uvs: np.ndarray
  faces: np.ndarray
  keypoint_vertex_ids: np.ndarray
  keypoint_names: Tuple[str, ...]
  person: np.ndarray
  grid: Tuple[int, int]


# ----------------------------------------------------------------------------------------- UV warp
def _sigmoid_np(t):
  return 0.5 * (1.0 + np.tanh(0.5 * t))


def _smooth_box(t, lo, hi, soft):
  return _sigmoid_np((t - lo) / soft) * _sigmoid_np((hi - t) / soft)


def _warp_table(lo, hi, density_fn, n=20001):
  t = np.linspace(lo, hi, n)
  rho = density_fn(t)
  cum = np.concatenate([[0.0], np.cumsum(0.5 * (rho[1:] + rho[:-1]) * np.diff(t))])
  return t, cum / cum[-1]


def _u_density(x):
  return 1.0 + 1.2 * _smooth_box(np.abs(x), -1.0, 62.0, 6.0)


def _v_density(y):
  eye = 2.5 * _smooth_box(y, EYE_Y - EYE_LO - 2.0, EYE_Y + EYE_UP + 2.0, 0.8)
  mouth = 18.0 * _smooth_box(y, MOUTH_Y - MOUTH_BAND, MOUTH_Y + MOUTH_BAND, 0.05)
  return 1.0 + eye + mouth


_U_TABLE = _warp_table(-X_HALF, X_HALF, _u_density)
_V_TABLE = _warp_table(Y_MIN, Y_MAX, _v_density)


def plane_to_uv(xy):
  """[..., 2] face-plane mm -> [..., 2] UV in [0, 1]."""
  xy = np.asarray(xy, np.float64)
  u = np.interp(xy[..., 0], *_U_TABLE)
  v = np.interp(xy[..., 1], *_V_TABLE)
  return np.stack([u, v], -1)


def uv_to_plane(uv):
  """[..., 2] UV -> [..., 2] rest face-plane mm (inverse of ``plane_to_uv``)."""
  uv = np.asarray(uv, np.float64)
  x = np.interp(uv[..., 0], _U_TABLE[1], _U_TABLE[0])
  y = np.interp(uv[..., 1], _V_TABLE[1], _V_TABLE[0])
  return np.stack([x, y], -1)


# ---------------------------------------------------------------------------------------- keypoints
def _keypoint_targets():
  """(names, [P, 2] face-plane targets) of the keypoints: contour, brows, eyes, nose, lips."""
  pts = []
  for k, a in enumerate(
    np.linspace(0.0, np.pi, 9)
  ):  # jaw contour from the subject's right ear to the left
    pts.append((f"contour_{k}", (-72.0 * np.cos(a), -40.0 - 58.0 * np.sin(a))))
  for side, sx in (("r", -1.0), ("l", 1.0)):
    for k, dx in enumerate((-16.0, -8.0, 0.0, 8.0, 16.0)):
      pts.append((f"brow_{side}_{k}", (sx * (EYE_X + dx), BROW_Y + 1.0)))
  for side, sx in (("r", -1.0), ("l", 1.0)):
    ex = sx * EYE_X
    pts += [
      (f"eye_{side}_inner", (ex - sx * (EYE_HW - 1.5), EYE_Y)),
      (f"eye_{side}_outer", (ex + sx * (EYE_HW - 1.5), EYE_Y)),
      (f"eye_{side}_upper_0", (ex - 5.0, EYE_Y + EYE_UP * 0.93)),
      (f"eye_{side}_upper_1", (ex + 5.0, EYE_Y + EYE_UP * 0.93)),
      (f"eye_{side}_lower_0", (ex - 5.0, EYE_Y - EYE_LO * 0.93)),
      (f"eye_{side}_lower_1", (ex + 5.0, EYE_Y - EYE_LO * 0.93)),
    ]
  pts += [
    ("nose_bridge", (0.0, 30.0)),
    ("nose_mid", (0.0, 12.0)),
    ("nose_tip", (0.0, -8.0)),
    ("nose_base", (0.0, -17.0)),
    ("nostril_r", (-10.0, -14.0)),
    ("nostril_l", (10.0, -14.0)),
  ]
  m = MOUTH_Y
  pts += [
    ("mouth_corner_r", (-MOUTH_HW, m)),
    ("mouth_corner_l", (MOUTH_HW, m)),
    ("lip_upper_outer", (0.0, m + 8.0)),
    ("lip_upper_outer_r", (-12.0, m + 6.5)),
    ("lip_upper_outer_l", (12.0, m + 6.5)),
    ("lip_lower_outer", (0.0, m - 9.0)),
    ("lip_lower_outer_r", (-12.0, m - 7.5)),
    ("lip_lower_outer_l", (12.0, m - 7.5)),
    ("lip_upper_inner", (0.0, m + MOUTH_BAND)),
    ("lip_lower_inner", (0.0, m - MOUTH_BAND)),
    ("lip_upper_inner_r", (-11.0, m + MOUTH_BAND)),
    ("lip_upper_inner_l", (11.0, m + MOUTH_BAND)),
    ("lip_lower_inner_r", (-11.0, m - MOUTH_BAND)),
    ("lip_lower_inner_l", (11.0, m - MOUTH_BAND)),
  ]
  return tuple(n for n, _ in pts), np.array([p for _, p in pts], np.float64)


def _geo_density_x(x):
  return 1.0 + 1.5 * _smooth_box(np.abs(x), -1.0, 62.0, 6.0)


def _geo_density_y(y):
  return 1.0 + 1.0 * _smooth_box(y, -75.0, 55.0, 6.0)


def _axis_positions(lo, hi, n, density, snaps):
  """``n`` increasing positions in [lo, hi] spaced by ``density``, with the nearest ones moved
  onto ``snaps``."""
  t, cum = _warp_table(lo, hi, density)
  pos = np.interp(np.linspace(0.0, 1.0, n), cum, t)
  taken = {0, n - 1}
  for s in sorted(snaps, key=lambda s: abs(s)):
    order = np.argsort(np.abs(pos - s))
    i = next(int(i) for i in order if int(i) not in taken)
    pos[i] = s
    taken.add(i)
  pos = np.sort(pos)
  if np.any(np.diff(pos) <= 0):
    raise ValueError(f"grid of {n} is too coarse for the feature lines {sorted(snaps)}")
  return pos


def make_head(grid: Tuple[int, int] = (48, 53), seed: int = 0) -> Head:
  """Builds the mesh, UVs, keypoint vertices and person parameters.

  Vertices lie on a grid in the face plane (denser over the face) whose rows and columns pass
  exactly through the feature lines (lip lines, eyelids, brows, mouth corners, eye corners); UVs are
  the warped plane, so the mouth band, a single row of thin faces at rest, still owns many texels.

  Args:
    grid: (rows, cols) of the vertex grid (V = rows * cols, F = 2 (rows - 1)(cols - 1)).
    seed: person identity (skin blotches, iris colour).
  """
  rows, cols = grid
  if rows < 16 or cols < 15:
    raise ValueError(f"make_head: grid must be at least 16 x 15, got {grid}")
  names, targets = _keypoint_targets()
  m = MOUTH_Y
  ysnap = {
    m + MOUTH_BAND,
    m - MOUTH_BAND,
    EYE_Y,
    EYE_Y + 0.93 * EYE_UP,
    EYE_Y - 0.93 * EYE_LO,
    BROW_Y + 1.0,
    m + 7.0,
    m - 8.0,
  }
  xsnap = {0.0, MOUTH_HW, -MOUTH_HW, EYE_X, -EYE_X, 12.0, -12.0}
  for sx in (1.0, -1.0):
    xsnap |= {sx * (EYE_X - EYE_HW + 1.5), sx * (EYE_X + EYE_HW - 1.5)}
  ys = _axis_positions(Y_MIN, Y_MAX, rows, _geo_density_y, ysnap)[
    ::-1
  ]  # row 0 at the top (forehead)
  xs = _axis_positions(-X_HALF, X_HALF, cols, _geo_density_x, xsnap)
  xx, yy = np.meshgrid(xs, ys)
  plane = np.stack([xx, yy], -1).reshape(-1, 2)
  uvs = plane_to_uv(plane)
  idx = np.arange(rows * cols).reshape(rows, cols)
  a, b = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel()  # top-left, top-right
  c, d = idx[1:, :-1].ravel(), idx[1:, 1:].ravel()  # bottom-left, bottom-right
  # Counter-clockwise in UV (u right, v up) = counter-clockwise seen from outside (the plane's x,
  # the subject's left, is the viewer's right when the face is seen from the front).
  faces = np.concatenate([np.stack([c, d, a], -1), np.stack([a, d, b], -1)]).astype(np.int32)
  # Nearest vertex in the plane, measured in local grid spacings.
  sx = np.interp(targets[:, 0], xs, np.gradient(xs))
  sy = np.interp(targets[:, 1], ys[::-1], np.gradient(ys[::-1]))
  d2 = ((targets[:, None, 0] - plane[None, :, 0]) / sx[:, None]) ** 2 + (
    (targets[:, None, 1] - plane[None, :, 1]) / sy[:, None]
  ) ** 2
  kp = np.argmin(d2, axis=1).astype(np.int32)
  if len(set(kp.tolist())) != len(kp):
    dup = [n for n, k in zip(names, kp) if (kp == k).sum() > 1]
    raise ValueError(f"make_head: grid {grid} too coarse, keypoints share vertices: {dup}")
  rng = np.random.RandomState(seed)
  # 12 skin blotches (x, y, sigma, amplitude) + iris colour (3) + skin tone scale (1).
  blotches = np.stack(
    [
      rng.uniform(-110, 110, 12),
      rng.uniform(-110, 100, 12),
      rng.uniform(8, 30, 12),
      rng.uniform(-0.09, 0.09, 12),
    ],
    -1,
  ).ravel()
  iris = rng.uniform([0.15, 0.25, 0.25], [0.45, 0.55, 0.65])
  person = np.concatenate([blotches, iris, [rng.uniform(0.92, 1.05)]]).astype(np.float32)
  return Head(
    plane=plane.astype(np.float32),
    uvs=uvs.astype(np.float32),
    faces=faces,
    keypoint_vertex_ids=kp,
    keypoint_names=names,
    person=person,
    grid=(rows, cols),
  )


def head_mesh(head: Head, verts) -> mesh_lib.Mesh:
  """The ``geometry.Mesh`` (numpy) of ``verts`` [V, 3] with the head's topology and UVs."""
  return mesh_lib.Mesh(np.asarray(verts, np.float32), head.faces, head.uvs, head.faces)


# ------------------------------------------------------------------------------------------
# geometry
def _g(x, s):
  return jnp.exp(-0.5 * (x / s) ** 2)


def _smoothstep(t):
  t = jnp.clip(t, 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def _eye_profile(dx):
  return jnp.sqrt(jnp.clip(1.0 - (dx / EYE_HW) ** 2, 0.0, 1.0))


def _mouth_profile(x):
  return jnp.sqrt(jnp.clip(1.0 - (x / MOUTH_HW) ** 2, 0.0, 1.0))


def _base_height(x, y):
  """Rest height field (mm along the ellipsoid normal) of the face features."""
  ax = jnp.abs(x)
  ridge = 7.0 + 16.0 * jnp.clip((30.0 - y) / 42.0, 0.0, 1.0)
  width = 5.0 + 0.12 * jnp.clip(30.0 - y, 0.0, 45.0)
  nose = ridge * _g(x, width) * jax.nn.sigmoid((y + 13.0) / 2.5) * jax.nn.sigmoid((36.0 - y) / 3.0)
  wings = 5.0 * _g(ax - 11.0, 5.0) * _g(y + 10.0, 4.0)
  brow = 5.0 * _g(y - 40.0, 7.0) * _g(x, 50.0)
  socket = -8.0 * _g(ax - EYE_X, 15.0) * _g(y - EYE_Y, 10.0)
  eyeball = 5.0 * _g(ax - EYE_X, 9.0) * _g(y - EYE_Y + 1.0, 6.0)
  cheekbone = 6.0 * _g(ax - 50.0, 15.0) * _g(y - 5.0, 12.0)
  lips = 5.0 * _g(x, 18.0) * _g(y - MOUTH_Y - 4.0, 4.0) + 6.0 * _g(x, 17.0) * _g(
    y - MOUTH_Y + 5.0, 4.5
  )
  chin = 7.0 * _g(x, 16.0) * _g(y + 92.0, 12.0)
  return nose + wings + brow + socket + eyeball + cheekbone + lips + chin


def _mouth_band_t(y):
  """0 at the upper lip line, 1 at the lower lip line of the folded mouth band."""
  return jnp.clip((MOUTH_Y + MOUTH_BAND - y) / (2.0 * MOUTH_BAND), 0.0, 1.0)


def _wrap(x, y, h):
  """Face plane (mm) + height (mm) -> head coordinates [..., 3]."""
  theta = x / THETA_SCALE
  phi = y / PHI_SCALE
  rx, ry, rz = RADII
  taper = 1.0 - 0.2 * jnp.maximum(-jnp.sin(phi), 0.0) ** 1.5
  rx = rx * taper
  p = jnp.stack(
    [rx * jnp.cos(phi) * jnp.sin(theta), ry * jnp.sin(phi), rz * jnp.cos(phi) * jnp.cos(theta)], -1
  )
  n = p / jnp.stack([rx**2, jnp.full_like(rx, ry**2), jnp.full_like(rx, rz**2)], -1)
  n = n / jnp.linalg.norm(n, axis=-1, keepdims=True)
  return p + h[..., None] * n


def deform(plane, factors):
  """Vertices of the expressed face.

  Args:
    plane: [V, 2] rest face-plane coordinates (``Head.plane``).
    factors: [N_f] expression factors (``FACTOR_NAMES``).
  Returns:
    [V, 3] float32 vertices in head coordinates (mm).
  """
  x0, y0 = plane[:, 0], plane[:, 1]
  f = lambda name: factors[F[name]]
  dx = jnp.zeros_like(x0)
  dy = jnp.zeros_like(y0)
  h = _base_height(x0, y0)
  # Eyelids: compress the eye opening onto the lower lid; the lid skin above follows.
  for side, sx in (("l", 1.0), ("r", -1.0)):
    ddx = x0 - sx * EYE_X
    prof = _eye_profile(ddx)
    y_up, y_lo = EYE_Y + EYE_UP * prof, EYE_Y - EYE_LO * prof
    c = 0.95 * jnp.clip(f(f"eyelid_close_{side}"), 0.0, 1.0)
    inside = (y0 >= y_lo) & (y0 <= y_up)
    above = y0 > y_up
    dy = dy - c * jnp.where(inside, y0 - y_lo, 0.0)
    dy = dy - c * jnp.where(above, (y_up - y_lo) * _g(y0 - y_up, 7.0), 0.0)
    # Brows.
    b = f(f"brow_raise_{side}")
    dy = dy + 7.0 * b * _g(ddx, 17.0) * _g(y0 - 44.0, 13.0) * jax.nn.sigmoid((y0 - 34.0) / 2.5)
    # Lip corners: out and up, slightly back.
    s = f(f"lip_corner_{side}")
    gc = jnp.exp(-((x0 - sx * MOUTH_HW) ** 2 + (y0 - MOUTH_Y) ** 2) / (2.0 * 11.0**2))
    dx = dx + sx * 6.0 * s * gc
    dy = dy + 4.5 * s * gc
    h = h - 2.0 * s * gc
    # Cheek puff (hidden from keypoints: mostly along the normal, away from the contour).
    q = f("cheek_puff")
    gq = _g(x0 - sx * 45.0, 12.0) * _g(y0 + 28.0, 13.0)
    h = h + 12.0 * q * gq
  # Pucker: lips towards the middle and forward.
  p = f("pucker")
  gm = _g(x0, 20.0) * _g(y0 - MOUTH_Y, 11.0)
  dx = dx - 0.4 * p * x0 * gm
  h = h + 9.0 * p * gm
  # Jaw: the folded mouth band opens (elliptic opening), the chin follows, the cheeks stretch.
  amount = JAW_OPEN_MM * jnp.clip(f("jaw_open"), 0.0, 1.0)
  e = _mouth_profile(x0)
  t_band = _mouth_band_t(y0)
  t_soft = _smoothstep((MOUTH_Y + 4.0 - y0) / 40.0)
  width = 1.0 - _smoothstep((jnp.abs(x0) - 55.0) / 35.0)
  drop = amount * (e * t_band + (1.0 - e) * t_soft) * width
  dy = dy - drop
  h = h - 0.3 * amount * t_soft * width
  interior = e * 4.0 * t_band * (1.0 - t_band)
  h = h - 0.4 * amount * interior + 4.0 * f("tongue") * interior
  return _wrap(x0 + dx, y0 + dy, h).astype(jnp.float32)


# ----------------------------------------------------------------------------------------
# appearance
def _mix(base, colour, w):
  return base * (1.0 - w[..., None]) + jnp.asarray(colour, jnp.float32) * w[..., None]


def albedo(plane, factors, person):
  """Albedo (and material) at rest face-plane points.

  Args:
    plane: [..., 2] rest face-plane coordinates of texels (``texel_plane``).
    factors: [N_f]; person: ``Head.person``.
  Returns:
    (rgb [..., 3] in [0, 1], specular strength [...], shininess [...]).
  """
  x, y = plane[..., 0], plane[..., 1]
  ax = jnp.abs(x)
  f = lambda name: factors[F[name]]
  blot = person[:48].reshape(12, 4)
  noise = jnp.zeros_like(x)
  for k in range(12):
    noise = noise + blot[k, 3] * jnp.exp(
      -((x - blot[k, 0]) ** 2 + (y - blot[k, 1]) ** 2) / (2 * blot[k, 2] ** 2)
    )
  iris_rgb, tone = person[48:51], person[51]
  skin = jnp.asarray([0.80, 0.60, 0.50], jnp.float32) * tone * (1.0 + noise[..., None])
  # Fine person-specific pattern (pores/freckles stand-in) so that textures have detail to learn.
  pattern = (
    0.035 * jnp.sin(x * 0.9 + 1.3 * jnp.sin(y * 0.35)) * jnp.sin(y * 0.8 + 0.7 * jnp.sin(x * 0.3))
  )
  rgb = skin * (1.0 + pattern[..., None])
  ks = jnp.full_like(x, 0.16)
  shin = jnp.full_like(x, 18.0)
  # Flush (hidden): redder cheeks and a slight global tint.
  fl = f("flush")
  cheeks = _g(ax - 45.0, 17.0) * _g(y + 10.0, 17.0)
  rgb = rgb + fl * (
    cheeks[..., None] * jnp.array([0.10, -0.04, -0.04]) + jnp.array([0.02, 0.0, -0.01])
  )
  # Wrinkles (hidden, correlated with brow raise): horizontal forehead lines.
  stripes = (0.5 + 0.5 * jnp.cos(2.0 * jnp.pi * (y - 52.0) / 7.0)) ** 6
  fore = jax.nn.sigmoid((y - 50.0) / 2.0) * jax.nn.sigmoid((84.0 - y) / 2.0) * _g(x, 35.0)
  rgb = rgb * (1.0 - 0.35 * jnp.clip(f("wrinkles"), 0.0, 1.0) * (stripes * fore)[..., None])
  # Lips.
  lip = jax.nn.sigmoid((1.0 - ((x / 27.0) ** 2 + ((y - MOUTH_Y) / 9.5) ** 2)) * 8.0)
  rgb = _mix(rgb, [0.70, 0.34, 0.36], lip)
  ks = ks + 0.2 * lip
  # Nostrils.
  nos = jax.nn.sigmoid((2.6 - jnp.sqrt((ax - 7.5) ** 2 + ((y + 15.5) * 1.6) ** 2)) * 2.0)
  rgb = _mix(rgb, [0.25, 0.13, 0.11], nos)
  # Mouth interior (the folded band): dark, teeth at the top, tongue at the bottom.
  t = (MOUTH_Y + MOUTH_BAND - y) / (2.0 * MOUTH_BAND)
  band = jax.nn.sigmoid((0.5 - jnp.abs(t - 0.5)) * 30.0) * jax.nn.sigmoid(
    (1.0 - (x / MOUTH_HW) ** 2) * 10.0
  )
  interior = jnp.where(
    (t < 0.28)[..., None], jnp.array([0.90, 0.88, 0.80]), jnp.array([0.32, 0.07, 0.08])
  )
  tongue = f("tongue")
  tc = 0.88 - 0.35 * tongue
  tw = jnp.sqrt((x / (12.0 + 6.0 * tongue)) ** 2 + ((t - tc) / (0.22 + 0.18 * tongue)) ** 2)
  interior = _mix(interior, [0.82, 0.38, 0.42], jax.nn.sigmoid((1.0 - tw) * 6.0))
  rgb = rgb * (1.0 - band[..., None]) + interior * band[..., None]
  ks = ks + 0.2 * band
  # Eyes: sclera, iris (moved by gaze), pupil, lash line; eyebrows.
  for sx in (1.0, -1.0):
    dx = x - sx * EYE_X
    prof = _eye_profile(dx)
    y_up, y_lo = EYE_Y + EYE_UP * prof, EYE_Y - EYE_LO * prof
    inside = jax.nn.sigmoid(jnp.minimum(y_up - y, y - y_lo) * 4.0) * (prof > 0.0)
    gx, gy = f("gaze_x"), f("gaze_y")
    r = jnp.sqrt((dx - 6.5 * gx) ** 2 + (y - EYE_Y - 0.5 - 2.5 * gy) ** 2)
    eye = jnp.broadcast_to(jnp.asarray([0.93, 0.91, 0.88], jnp.float32), rgb.shape)
    eye = _mix(eye, iris_rgb, jax.nn.sigmoid((4.6 - r) * 3.0))
    eye = _mix(eye, [0.04, 0.04, 0.05], jax.nn.sigmoid((1.9 - r) * 4.0))
    lash = jax.nn.sigmoid((1.0 - jnp.abs(y - y_up)) * 3.0) * (prof > 0.05)
    rgb = rgb * (1.0 - inside[..., None]) + eye * inside[..., None]
    rgb = _mix(rgb, [0.10, 0.07, 0.06], 0.8 * lash)
    ks = ks + 0.5 * inside
    shin = shin + 50.0 * inside
    brow_y = BROW_Y + 3.0 * (1.0 - (dx / 20.0) ** 2)
    brow = jax.nn.sigmoid((2.6 - jnp.abs(y - brow_y)) * 2.0) * jax.nn.sigmoid(
      (20.0 - jnp.abs(dx)) * 0.8
    )
    rgb = _mix(rgb, [0.24, 0.16, 0.11], brow)
  # Hair: top of the head and the sides.
  hair = jnp.maximum(
    jax.nn.sigmoid((y - 88.0 - 8.0 * jnp.cos(x / 45.0)) * 0.8),
    jax.nn.sigmoid((ax - 118.0 + 0.15 * jnp.maximum(y, 0.0)) * 0.6),
  )
  rgb = _mix(rgb, [0.22, 0.15, 0.10], hair)
  ks = ks * (1.0 - 0.8 * hair)
  return jnp.clip(rgb, 0.0, 1.0), ks, shin


def shade(rgb, ks, shin, points, normals, eye):
  """Colour seen from ``eye``: Lambert + Blinn-Phong specular + rim, lights fixed in head
  coordinates.

  Args:
    rgb: [..., 3] albedo; ks, shin: [...] specular strength and exponent.
    points, normals: [..., 3] surface points and unit normals (head coordinates).
    eye: [3] camera centre (head coordinates).
  Returns:
    [..., 3] colour in [2/255, 1].
  """
  v = eye - points
  v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  ndv = jnp.sum(normals * v, -1)
  diffuse = jnp.full(ndv.shape, AMBIENT)
  spec = jnp.zeros_like(ndv)
  for d, w in LIGHTS:
    d = jnp.asarray(d, jnp.float32)
    diffuse = diffuse + w * jnp.maximum(normals @ d, 0.0)
    half = v + d
    half = half / jnp.linalg.norm(half, axis=-1, keepdims=True)
    spec = spec + w * jnp.maximum(jnp.sum(normals * half, -1), 0.0) ** shin * (normals @ d > 0)
  rim = 0.12 * (1.0 - jnp.clip(ndv, 0.0, 1.0)) ** 3
  out = (
    rgb * diffuse[..., None] + (ks * spec)[..., None] + rim[..., None] * jnp.array([0.9, 0.9, 1.0])
  )
  return jnp.clip(out, 2.0 / 255.0, 1.0)


def texel_plane(size: int, supersample: int = 2):
  """[size * s, size * s, 2] rest face-plane coordinates of (sub-)texel centres (image rows: row
  0 = v = 1)."""
  n = size * supersample
  c = (np.arange(n) + 0.5) / n
  uu, vv = np.meshgrid(c, 1.0 - c)
  return uv_to_plane(np.stack([uu, vv], -1)).astype(np.float32)


def albedo_texture(plane_ss, factors, person, supersample: int = 2):
  """Albedo texture [T, T, 3] (and ks, shin [T, T]) from supersampled texel plane coordinates."""
  rgb, ks, shin = albedo(plane_ss, factors, person)
  n = plane_ss.shape[0] // supersample

  def pool(a):
    return a.reshape(n, supersample, n, supersample, *a.shape[2:]).mean(axis=(1, 3))

  return pool(rgb), pool(ks), pool(shin)


def sample_factors(rng: np.random.RandomState, n: int) -> np.ndarray:
  """[n, N_f] independent uniform factors in ``FACTOR_RANGES`` (for tests and demos)."""
  lo = np.array([FACTOR_RANGES[k][0] for k in FACTOR_NAMES])
  hi = np.array([FACTOR_RANGES[k][1] for k in FACTOR_NAMES])
  return rng.uniform(lo, hi, (n, NUM_FACTORS)).astype(np.float32)


def neutral_factors() -> np.ndarray:
  """[N_f] zeros: the neutral expression."""
  return np.zeros(NUM_FACTORS, np.float32)


def keypoint_groups(names: Sequence[str]):
  """{group: [indices]} of keypoint names: contour, brow_l/r, eye_l/r, nose, mouth."""
  groups = {}
  for i, n in enumerate(names):
    g = n.split("_")[0]
    if g in ("brow", "eye"):
      g = f"{g}_{n.split('_')[1]}"
    elif g in ("lip", "mouth"):
      g = "mouth"
    elif g == "nostril":
      g = "nose"
    groups.setdefault(g, []).append(i)
  return groups
