"""Pinhole cameras in the KRT convention of Multiface.

A camera maps a point ``x`` (world or head coordinates, millimetres in Multiface) to pixels:

    x_cam = R @ x + t                      (Rt: [3, 4], world -> camera, camera looks along +z)
    [u*w, v*w, w] = K @ x_cam              (K: [3, 3] intrinsics in pixels)

Pixel coordinates: x to the right, y down, origin at the top-left corner of the top-left pixel, so
the centre of pixel (row i, column j) is (j + 0.5, i + 0.5).

Every function is pure, vectorised and jit/vmap friendly. A batch of cameras is a ``Camera`` whose
leaves have leading batch axes (``K [..., 3, 3]``, ``Rt [..., 3, 4]``); use ``jax.vmap`` over it.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np


@chex.dataclass(frozen=True, mappable_dataclass=False)
class Camera:
  """A pinhole camera: ``K [3, 3]`` intrinsics (pixels) and ``Rt [3, 4]`` world-to-camera
  extrinsics.

  ``Camera(K, Rt)`` or ``Camera(K=K, Rt=Rt)``. A JAX pytree (leaves ``K``, ``Rt``), so it passes
  through ``jax.jit`` and ``jax.vmap``. Not a mapping (chex's default would make it one and refuse
  positional arguments).
  """

  K: chex.Array
  Rt: chex.Array


def _safe_normalize(v, axis=-1, eps=1e-12):
  return v / jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=axis, keepdims=True), eps))


def transform_points(Rt, points):
  """Applies ``[R|t]`` to points.

  Args:
    Rt: [3, 4] rigid (or affine) transform.
    points: [N, 3].
  Returns:
    [N, 3] = points @ R^T + t.
  """
  return points @ Rt[:, :3].T + Rt[:, 3]


def world_to_camera(camera: Camera, points):
  """[N, 3] world points -> [N, 3] camera-space points (z = depth along the optical axis)."""
  return transform_points(camera.Rt, points)


def project(camera: Camera, points, eps: float = 1e-8):
  """Projects points to pixels.

  Args:
    camera: a single ``Camera``.
    points: [N, 3] points in the camera's world frame.
    eps: lower clamp for the depth, so that points at or behind the camera do not give inf/NaN.
  Returns:
    [N, 2] pixel coordinates (x right, y down, origin at the top-left pixel's corner).
  """
  p = world_to_camera(camera, points) @ camera.K.T
  w = p[:, 2:3]
  w = jnp.where(jnp.abs(w) < eps, jnp.where(w < 0, -eps, eps), w)
  return p[:, :2] / w


def project_with_depth(camera: Camera, points, eps: float = 1e-8):
  """Like ``project`` but also returns the camera-space depth. Returns ([N, 2] pixels, [N]
  depth)."""
  cam = world_to_camera(camera, points)
  p = cam @ camera.K.T
  w = p[:, 2:3]
  w = jnp.where(jnp.abs(w) < eps, jnp.where(w < 0, -eps, eps), w)
  return p[:, :2] / w, cam[:, 2]


def unproject(camera: Camera, pixels, depth):
  """Inverse of ``project_with_depth``: [N, 2] pixels and [N] depths -> [N, 3] world points."""
  homog = jnp.concatenate([pixels, jnp.ones_like(pixels[:, :1])], axis=-1)
  rays = homog @ jnp.linalg.inv(camera.K).T  # z = 1
  cam = rays * depth[:, None]
  R, t = camera.Rt[:, :3], camera.Rt[:, 3]
  return (cam - t) @ R  # R^T (x - t)


def camera_center(camera: Camera):
  """[3] camera centre in world coordinates: -R^T t."""
  R, t = camera.Rt[:, :3], camera.Rt[:, 3]
  return -R.T @ t


def rigid_inverse(Rt):
  """Inverse of a rigid [3, 4] transform."""
  R, t = Rt[:, :3], Rt[:, 3]
  return jnp.concatenate([R.T, (-R.T @ t)[:, None]], axis=1)


def compose_rigid(a, b):
  """[3, 4] transform equal to applying ``b`` then ``a``: x -> a(b(x))."""
  R = a[:, :3] @ b[:, :3]
  t = a[:, :3] @ b[:, 3] + a[:, 3]
  return jnp.concatenate([R, t[:, None]], axis=1)


def compose_head_pose(camera: Camera, head_pose) -> Camera:
  """The camera seen from head coordinates.

  Multiface's ``<frame>_transform.txt`` is a head-to-world pose, x_world = R x_head + t. The
  returned camera projects head-coordinate points (the tracked mesh) directly: Rt' = Rt o head_pose.

  Args:
    camera: world camera.
    head_pose: [3, 4] head-to-world transform.
  """
  return Camera(K=camera.K, Rt=compose_rigid(camera.Rt, head_pose))


def view_direction(camera: Camera, head_pose=None):
  """Unit view direction in head coordinates, as in Multiface's loader.

  normalize(R_pose^T (camera_centre - t_pose)): the direction from the head origin towards the
  camera. With ``head_pose=None`` the camera is already in head coordinates (e.g. after
  ``compose_head_pose``).

  Returns:
    [3] unit vector.
  """
  c = camera_center(camera)
  if head_pose is not None:
    c = head_pose[:, :3].T @ (c - head_pose[:, 3])
  return _safe_normalize(c)


def look_at(eye, target, up=(0.0, 1.0, 0.0)):
  """World-to-camera [3, 4] extrinsics of a camera at ``eye`` looking at ``target``.

  Camera axes follow the image convention: +x right, +y down (image rows), +z forward. ``up`` is the
  world direction that should appear upwards in the image.
  """
  eye = jnp.asarray(eye, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  up = jnp.asarray(up, jnp.float32)
  z = _safe_normalize(target - eye)
  x = _safe_normalize(jnp.cross(z, up))  # right = down x forward = forward x up
  y = jnp.cross(z, x)  # down
  R = jnp.stack([x, y, z], axis=0)
  t = -R @ eye
  return jnp.concatenate([R, t[:, None]], axis=1)


def intrinsics(focal, image_size, principal=None):
  """[3, 3] K for a focal length in pixels (scalar or (fx, fy)) and ``image_size=(H, W)``.

  The principal point defaults to the image centre (W / 2, H / 2).
  """
  h, w = image_size
  fx, fy = (focal, focal) if np.isscalar(focal) else focal
  cx, cy = (w / 2.0, h / 2.0) if principal is None else principal
  return jnp.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], jnp.float32)


def focal_for_fov(fov_degrees, size):
  """Focal length in pixels that gives a field of view of ``fov_degrees`` across ``size`` pixels."""
  return 0.5 * size / np.tan(np.deg2rad(fov_degrees) / 2.0)


def dome_cameras(
  num_cameras,
  radius,
  image_size,
  fov_degrees=30.0,
  target=(0.0, 0.0, 0.0),
  max_azimuth_degrees=90.0,
  elevations_degrees=(-25.0, 0.0, 25.0),
  up=(0.0, 1.0, 0.0),
):
  """A capture dome: ``num_cameras`` cameras on a spherical cap in front of the subject, looking at
  ``target``.

  The subject faces +z. Cameras are spread over azimuths in [-max_azimuth, max_azimuth] (0 =
  frontal) and the given elevation rings, ordered ring by ring (deterministic).

  Returns:
    A batched ``Camera`` with K [N, 3, 3] and Rt [N, 3, 4].
  """
  if num_cameras < 1:
    raise ValueError(f"dome_cameras: num_cameras must be >= 1, got {num_cameras}")
  rings = len(elevations_degrees)
  per_ring = [num_cameras // rings + (1 if i < num_cameras % rings else 0) for i in range(rings)]
  target = np.asarray(target, np.float32)
  eyes = []
  for elev, n in zip(elevations_degrees, per_ring):
    if n == 0:
      continue
    azs = np.linspace(-max_azimuth_degrees, max_azimuth_degrees, n) if n > 1 else np.zeros(1)
    for az in azs:
      a, e = np.deg2rad(az), np.deg2rad(elev)
      eyes.append(
        target + radius * np.array([np.sin(a) * np.cos(e), np.sin(e), np.cos(a) * np.cos(e)])
      )
  K = intrinsics(focal_for_fov(fov_degrees, min(image_size)), image_size)
  Rts = jnp.stack([look_at(eye, target, up) for eye in eyes])
  return Camera(K=jnp.broadcast_to(K, (len(eyes), 3, 3)), Rt=Rts)


def stack_cameras(cameras) -> Camera:
  """Stacks a sequence of single cameras into a batched ``Camera``."""
  return Camera(K=jnp.stack([c.K for c in cameras]), Rt=jnp.stack([c.Rt for c in cameras]))


def index_camera(cameras: Camera, i) -> Camera:
  """The ``i``-th camera of a batched ``Camera``."""
  return Camera(K=cameras.K[i], Rt=cameras.Rt[i])
