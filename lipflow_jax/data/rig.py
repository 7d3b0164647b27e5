"""The virtual capture rig: dome cameras and a frontal camera (world), headset cameras (head
coordinates).

The subject's head sits at the world origin (up to its per-frame pose), facing +z, y up.
Millimetres.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import jax.numpy as jnp
import numpy as np

from lipflow_jax import geometry
from lipflow_jax.data import synthetic_head as sh

HMC_VIEWS = ("left_eye", "right_eye", "mouth")


class Rig(NamedTuple):
  """Cameras of a capture (numpy float32).

  Attributes:
    names: dome camera names (Multiface style, e.g. '400000').
    K, Rt: [N, 3, 3], [N, 3, 4] dome cameras, world -> camera.
    image_size: (H, W) of the dome images.
    frontal_K, frontal_Rt: [3, 3], [3, 4] the keypoint camera (world); ``frontal_size`` (H, W).
    hmc_K, hmc_Rt: [3, 3, 3], [3, 3, 4] headset cameras (left eye, right eye, mouth), head ->
      camera; ``hmc_size`` (h, w).
    gain, bias: [N, 3] per-camera colour response (image = gain * radiance + bias).
  """

  names: Tuple[str, ...]
  K: np.ndarray
  Rt: np.ndarray
  image_size: Tuple[int, int]
  frontal_K: np.ndarray
  frontal_Rt: np.ndarray
  frontal_size: Tuple[int, int]
  hmc_K: np.ndarray
  hmc_Rt: np.ndarray
  hmc_size: Tuple[int, int]
  gain: np.ndarray
  bias: np.ndarray


def _plane_point(x, y):
  """Head-coordinate position of a rest face-plane point of the neutral face."""
  return np.asarray(sh.deform(jnp.array([[x, y]], jnp.float32), jnp.zeros(sh.NUM_FACTORS)))[0]


def make_rig(
  num_cameras: int,
  image_size,
  frontal_size,
  hmc_size,
  radius: float = 650.0,
  fov_degrees: float = 27.0,
  max_azimuth_degrees: float = 80.0,
  hmc_fov_degrees: float = 70.0,
  seed: int = 0,
) -> Rig:
  """Dome on a spherical cap (3 elevation rings), a frontal camera, three headset cameras."""
  dome = geometry.dome_cameras(
    num_cameras,
    radius,
    tuple(image_size),
    fov_degrees=fov_degrees,
    max_azimuth_degrees=max_azimuth_degrees,
    elevations_degrees=(-20.0, 5.0, 28.0),
  )
  names = tuple(str(400000 + i) for i in range(num_cameras))
  fh, fw = frontal_size
  frontal_K = geometry.intrinsics(geometry.focal_for_fov(fov_degrees, min(fh, fw)), (fh, fw))
  frontal_Rt = geometry.look_at([0.0, 15.0, radius], [0.0, 0.0, 0.0])
  hmc_K, hmc_Rt = [], []
  hf = geometry.focal_for_fov(hmc_fov_degrees, min(hmc_size))
  for sx in (1.0, -1.0):  # left eye (subject's left = +x), right eye
    eye = _plane_point(sx * sh.EYE_X, sh.EYE_Y)
    pos = eye + np.array(
      [sx * 5.0, -15.0, 33.0]
    )  # below and in front of the eye, like a headset camera
    hmc_K.append(geometry.intrinsics(hf, tuple(hmc_size)))
    hmc_Rt.append(geometry.look_at(pos, eye + np.array([0.0, 1.0, 0.0])))
  mouth = _plane_point(0.0, sh.MOUTH_Y)
  hmc_K.append(geometry.intrinsics(hf, tuple(hmc_size)))
  hmc_Rt.append(
    geometry.look_at(mouth + np.array([0.0, -40.0, 42.0]), mouth + np.array([0.0, -4.0, 0.0]))
  )
  rng = np.random.RandomState(seed + 7)
  gain = rng.uniform(0.92, 1.08, (num_cameras, 3)).astype(np.float32)
  bias = rng.uniform(-0.015, 0.015, (num_cameras, 3)).astype(np.float32)
  f32 = lambda a: np.asarray(a, np.float32)
  return Rig(
    names,
    f32(dome.K),
    f32(dome.Rt),
    tuple(image_size),
    f32(frontal_K),
    f32(frontal_Rt),
    tuple(frontal_size),
    f32(np.stack(hmc_K)),
    f32(np.stack(hmc_Rt)),
    tuple(hmc_size),
    gain,
    bias,
  )
