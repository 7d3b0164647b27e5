"""Reading and writing Multiface ``KRT`` camera files.

Per camera a 9-line block::

    400067                 camera name
    fx 0 cx                \
    0 fy cy                 K, pixels
    0 0 1                  /
    k1 k2 p1 p2 k3        distortion (OpenCV order; zeros in practice; the pinhole model ignores it)
    r11 r12 r13 t1         \
    r21 r22 r23 t2          [R|t], world to camera, translation in mm
    r31 r32 r33 t3         /
    (blank line)
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

import numpy as np

from lipflow_jax.geometry.camera import Camera


class KRTFormatError(ValueError):
  """A KRT file that does not follow the 9-line-per-camera layout or holds an impossible camera."""


ROTATION_TOLERANCE = 1e-3  # max |R R^T - I| of a camera's rotation (files store ~7 digits)


def _floats(path, lineno, line, count, what):
  parts = line.split()
  if len(parts) != count:
    raise KRTFormatError(
      f"{path}:{lineno}: expected {count} numbers for {what}, got {len(parts)}: {line!r}"
    )
  try:
    values = [float(p) for p in parts]
  except ValueError as e:
    raise KRTFormatError(f"{path}:{lineno}: non-numeric value in {what}: {line!r}") from e
  if not all(np.isfinite(values)):
    raise KRTFormatError(f"{path}:{lineno}: non-finite value in {what}: {line!r}")
  return values


def _check_camera(path, block, name, K, Rt):
  """Ranges of one camera: positive focal lengths, K's last row (0, 0, 1), a rotation R."""
  k_line, r_line = block[1][0], block[5][0]
  if K[0, 0] <= 0 or K[1, 1] <= 0:
    raise KRTFormatError(
      f"{path}:{k_line}: camera {name!r}: focal lengths must be > 0, got fx={K[0, 0]}, fy={K[1, 1]}"
    )
  if np.abs(K[2] - [0, 0, 1]).max() > 1e-6:
    raise KRTFormatError(f"{path}:{block[3][0]}: camera {name!r}: K's last row must be 0 0 1")
  R = Rt[:, :3].astype(np.float64)
  err = np.abs(R @ R.T - np.eye(3)).max()
  if err > ROTATION_TOLERANCE or np.linalg.det(R) <= 0:
    raise KRTFormatError(
      f"{path}:{r_line}: camera {name!r}: [R|t] must hold a rotation (R R^T = I within "
      f"{ROTATION_TOLERANCE}, det R > 0); |R R^T - I| = {err:.3g}, det R = {np.linalg.det(R):.3g}"
    )


def read_krt(path) -> Tuple[Dict[str, Camera], Dict[str, np.ndarray]]:
  """Reads a KRT file.

  Returns:
    (cameras, distortion): ``{name: Camera(K [3,3] f32, Rt [3,4] f32)}`` in file order and
    ``{name: [5] f32}`` distortion coefficients.
  Raises:
    FileNotFoundError if missing; KRTFormatError naming the file and line for a malformed block,
    a non-finite number, a focal length <= 0, a K without last row 0 0 1 or an R that is not a
    rotation.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"KRT file not found: {path}")
  with open(path) as f:
    lines = [(i + 1, text.rstrip("\n")) for i, text in enumerate(f)]
  cameras, dist = {}, {}
  i = 0
  while i < len(lines):
    if not lines[i][1].strip():
      i += 1
      continue
    block = []
    while i < len(lines) and lines[i][1].strip():
      block.append(lines[i])
      i += 1
    lineno, name = block[0]
    name = name.strip()
    if len(block) != 8:
      raise KRTFormatError(
        f"{path}:{lineno}: camera {name!r} has {len(block) - 1} lines after its name, expected 7 "
        "(3 of K, 1 of distortion, 3 of [R|t])"
      )
    if len(name.split()) != 1:
      raise KRTFormatError(f"{path}:{lineno}: expected a camera name, got {name!r}")
    K = np.array([_floats(path, n, text, 3, "K") for n, text in block[1:4]], np.float32)
    d = np.array(_floats(path, block[4][0], block[4][1], 5, "distortion"), np.float32)
    Rt = np.array([_floats(path, n, text, 4, "[R|t]") for n, text in block[5:8]], np.float32)
    _check_camera(path, block, name, K, Rt)
    if name in cameras:
      raise KRTFormatError(f"{path}:{lineno}: camera {name!r} appears twice")
    cameras[name] = Camera(K=K, Rt=Rt)
    dist[name] = d
  if not cameras:
    raise KRTFormatError(f"{path}: no cameras found")
  return cameras, dist


def write_krt(path, cameras: Dict[str, Camera], distortion: Dict[str, np.ndarray] | None = None):
  """Writes ``{name: Camera}`` in the Multiface KRT layout (zero distortion unless given)."""
  with open(path, "w") as f:
    for name, cam in cameras.items():
      K, Rt = np.asarray(cam.K, np.float64), np.asarray(cam.Rt, np.float64)
      d = np.zeros(5) if distortion is None else np.asarray(distortion[name], np.float64)
      f.write(f"{name}\n")
      for row in K:
        f.write(" ".join(f"{v:.9g}" for v in row) + "\n")
      f.write(" ".join(f"{v:.9g}" for v in d) + "\n")
      for row in Rt:
        f.write(" ".join(f"{v:.9g}" for v in row) + "\n")
      f.write("\n")
