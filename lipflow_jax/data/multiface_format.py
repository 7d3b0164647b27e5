"""The Multiface entity directory layout: strict file readers, path helpers, constants and errors.

Layout of one entity (``m--20180227--0000--6795937--GHS``), as published::

  KRT                               cameras: name, K (3 lines), distortion, [R|t] (3 lines), blank
  frame_list.txt                    'segment frame' per line (frame: 6 digits)
  tex_mean.png, tex_var.txt         mean texture (RGB), texture variance (one number)
  vert_mean.bin, vert_var.txt       mean mesh (raw float32 [V*3]), vertex variance (one number)
  tracked_mesh/<seg>/
    <frame>.bin                     raw float32 [V, 3], head coordinates
    <frame>.obj                     same topology with vt and f v/vt (read once)
    <frame>_transform.txt           3x4 head pose, head -> world
  unwrapped_uv_1024/<seg>/
    <cam>/<frame>.png               this camera's unwrapped texture (black = unobserved)
    average/<frame>.png             the average over cameras
  images/<seg>/<cam>/<frame>.png    photos
  test_segment.json                 {"segment": [prefixes]} (in the Multiface repo; optional here)
  camera-split-config*.json         {"full": {"train": [...], "test": [...], "visual": [...]}}

Texture orientation: a texture PNG is an ordinary image whose top row is v = 1 (OBJ: UV (0, 0) is
the bottom-left). Multiface's reference loader flips the rows after loading because its renderer
wants row 0 at v = 0; ``lipflow_jax.render.sample_texture`` wants row 0 at v = 1, i.e. the file's
own orientation, so ``texture_from_png`` keeps the rows as they are (and ``texture_to_png`` writes
them unchanged).

Two files are additions of ours, used when present: ``keypoint_vertex_ids.txt`` ('name vertex_id'
per line) and the split JSONs inside the entity directory.

Every reader raises ``MultifaceFormatError`` (``MultifaceMissingFileError`` for a missing file)
naming the file (and line): wrong shapes (a texture that is not square, a mesh of the wrong vertex
count), non-finite numbers, values out of range (variances <= 0, a head pose that is not a
rotation). The entity reader is ``lipflow_jax.data.multiface``; the exporter of synthetic
captures ``lipflow_jax.data.multiface_export``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from lipflow_jax.geometry.krt import ROTATION_TOLERANCE

UV_DIR = "unwrapped_uv_1024"
TEST_SEGMENT_JSON = "test_segment.json"
CAMERA_SPLIT_JSON = "camera-split-config.json"
KEYPOINT_IDS_TXT = "keypoint_vertex_ids.txt"
DEFAULT_TEST_PREFIXES = ("EXP_ROM", "EXP_free_face")


class MultifaceFormatError(ValueError):
  """A file of a Multiface entity directory that cannot be used; the message names the file."""


class MultifaceMissingFileError(MultifaceFormatError, FileNotFoundError):
  """A file that the layout requires is missing."""


def _need(path, what):
  if not os.path.exists(path):
    raise MultifaceMissingFileError(f"{what} not found: {path}")


# --------------------------------------------------------------------------------------- readers
def read_frame_list(path) -> List[Tuple[str, str]]:
  """[(segment, frame)] from ``frame_list.txt`` (no final newline needed)."""
  _need(path, "frame list")
  frames = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2 or not parts[1].isdigit():
        raise MultifaceFormatError(
          f"{path}:{lineno}: expected 'segment frame' (frame = digits), got {line.strip()!r}"
        )
      frames.append((parts[0], parts[1]))
  if not frames:
    raise MultifaceFormatError(f"{path}: empty frame list (no 'segment frame' lines)")
  seen = set()
  for fr in frames:
    if fr in seen:
      raise MultifaceFormatError(f"{path}: frame {fr[0]} {fr[1]} listed twice")
    seen.add(fr)
  return frames


def read_scalar(path, what) -> float:
  """One finite number from a text file (``tex_var.txt``, ``vert_var.txt``)."""
  _need(path, what)
  with open(path) as f:
    text = f.read().split()
  if len(text) != 1:
    raise MultifaceFormatError(
      f"{path}: {what} must hold exactly one number, found {len(text)} tokens"
    )
  try:
    x = float(text[0])
  except ValueError as e:
    raise MultifaceFormatError(f"{path}: {what} is not a number: {text[0]!r}") from e
  if not np.isfinite(x) or x <= 0:
    raise MultifaceFormatError(f"{path}: {what} must be a positive finite number, got {x}")
  return x


def read_mesh_bin(path, num_verts: Optional[int] = None) -> np.ndarray:
  """Raw little-endian float32 vertices [V, 3]; checks the count against ``num_verts``."""
  _need(path, "mesh")
  size = os.path.getsize(path)
  if size % 12:
    raise MultifaceFormatError(
      f"{path}: {size} bytes is not a whole number of float32 xyz vertices (12 bytes each)"
    )
  v = np.fromfile(path, dtype="<f4").reshape(-1, 3)
  if num_verts is not None and v.shape[0] != num_verts:
    raise MultifaceFormatError(
      f"{path}: has {v.shape[0]} vertices, expected {num_verts} (the topology's count)"
    )
  if not np.all(np.isfinite(v)):
    raise MultifaceFormatError(f"{path}: non-finite vertex coordinates")
  return v.astype(np.float32)


def read_transform(path) -> np.ndarray:
  """[3, 4] head-to-world pose from ``<frame>_transform.txt`` (3x4, or 4x4 ending 0 0 0 1)."""
  _need(path, "head pose")
  try:
    m = np.loadtxt(path, dtype=np.float64, ndmin=2)
  except ValueError as e:
    raise MultifaceFormatError(f"{path}: cannot parse the head pose: {e}") from e
  if m.shape == (4, 4):
    m = m[:3]
  if m.shape != (3, 4) or not np.all(np.isfinite(m)):
    raise MultifaceFormatError(
      f"{path}: head pose must be a finite 3x4 matrix, got shape {m.shape}"
    )
  R = m[:, :3]
  err = np.abs(R @ R.T - np.eye(3)).max()
  if err > ROTATION_TOLERANCE or np.linalg.det(R) <= 0:
    raise MultifaceFormatError(
      f"{path}: head pose must be [R|t] with R a rotation (|R R^T - I| <= {ROTATION_TOLERANCE}, "
      f"det R > 0); got |R R^T - I| = {err:.3g}, det R = {np.linalg.det(R):.3g}"
    )
  return m.astype(np.float32)


def read_png(path, what="image", channels: int = 3) -> np.ndarray:
  """[H, W, channels] uint8 from a PNG (RGB or grey)."""
  _need(path, what)
  try:
    with Image.open(path) as im:
      im.load()
      im = im.convert("RGB" if channels == 3 else "L")
      a = np.asarray(im, np.uint8)
  except (OSError, SyntaxError, ValueError) as e:
    raise MultifaceFormatError(f"{path}: unreadable {what} PNG ({e})") from e
  return a.reshape(a.shape[0], a.shape[1], channels)


def png_size(path, what="image") -> Tuple[int, int]:
  """(H, W) of a PNG without decoding it."""
  _need(path, what)
  try:
    with Image.open(path) as im:
      w, h = im.size
  except (OSError, SyntaxError, ValueError) as e:
    raise MultifaceFormatError(f"{path}: unreadable {what} PNG ({e})") from e
  return h, w


def read_texture(path, what="texture") -> np.ndarray:
  """[T, T, 3] uint8 unwrapped texture from a PNG; a texture that is not square is an error."""
  a = read_png(path, what)
  if a.shape[0] != a.shape[1]:
    raise MultifaceFormatError(
      f"{path}: {what} must be square (T x T), got {a.shape[0]} x {a.shape[1]} (H x W)"
    )
  return texture_from_png(a)


def texture_from_png(a):
  """A PNG array as a texture (row 0 is v = 1, as ``render.sample_texture`` wants): unchanged."""
  return a


def texture_to_png(a):
  """PNG array from a texture array: unchanged (see the module docstring)."""
  return a


def write_png(path, a):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  a = np.asarray(a, np.uint8)
  Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path)


def read_test_segments(path) -> Tuple[str, ...]:
  """Test segment prefixes from ``{"segment": [...]}``."""
  _need(path, "test-segment JSON")
  try:
    with open(path) as f:
      d = json.load(f)
    seg = d["segment"]
    if not isinstance(seg, list) or not all(isinstance(s, str) for s in seg):
      raise TypeError("'segment' must be a list of strings")
  except (ValueError, KeyError, TypeError) as e:
    raise MultifaceFormatError(f"{path}: expected {{\"segment\": [prefixes]}}: {e}") from e
  return tuple(seg)


def read_camera_split(path) -> Dict[str, List[str]]:
  """{'train': [...], 'test': [...], 'visual': [...]} from ``{"full": {...}}``."""
  _need(path, "camera-split JSON")
  try:
    with open(path) as f:
      d = json.load(f)["full"]
    out = {k: [str(c) for c in d.get(k, [])] for k in ("train", "test", "visual")}
  except (ValueError, KeyError, TypeError) as e:
    raise MultifaceFormatError(
      f"{path}: expected {{\"full\": {{\"train\": [...], \"test\": [...]}}}}: {e}"
    ) from e
  return out


def read_keypoint_ids(path) -> Tuple[Tuple[str, ...], np.ndarray]:
  """(names, [P] int32) from 'name vertex_id' lines."""
  names, ids = [], []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
        raise MultifaceFormatError(
          f"{path}:{lineno}: expected 'name vertex_id', got {line.strip()!r}"
        )
      names.append(parts[0])
      ids.append(int(parts[1]))
  return tuple(names), np.asarray(ids, np.int32)


# ----------------------------------------------------------------------------------------- paths
def mesh_path(root, seg, frame, ext=".bin"):
  suffix = {"transform": "_transform.txt"}.get(ext, ext)
  return os.path.join(root, "tracked_mesh", seg, f"{frame}{suffix}")


def tex_path(root, seg, cam, frame):
  return os.path.join(root, UV_DIR, seg, cam, f"{frame}.png")


def image_path(root, seg, cam, frame):
  return os.path.join(root, "images", seg, cam, f"{frame}.png")
