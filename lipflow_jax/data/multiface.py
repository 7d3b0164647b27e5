"""Multiface entity directories as examples in the dataset schema (the ``multiface`` builder's).

The file layout and its readers are in ``multiface_format``; the reader takes textures and photos at
whatever size it finds and resizes them to the requested one.

Derived signals: keypoints are the fixed keypoint vertices projected into the frontal camera (a dome
camera; visibility from a hard render of the tracked mesh, then the detector noise model); the
headset crops are square windows of fixed size in mm around the eyes and the mouth of the mean
face, cut from chosen dome photos, turned grey and resized (``hmc_K``/``hmc_Rt`` are the crop
cameras; ``hmc_mask`` is the tracked mesh rendered into them). Multiface has no foreground masks:
``image_mask`` is all ones. ``factors`` are zeros.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
from typing import Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from lipflow_jax import geometry, render
from lipflow_jax.data import capture as capture_lib
from lipflow_jax.data import multiface_format as fmt
from lipflow_jax.data import schema
from lipflow_jax.data import synthetic_head as sh


@dataclasses.dataclass(frozen=True)
class MultifaceOptions:
  """How to turn an entity directory into examples (the ``multiface`` builder's config).

  Plain values.

  Attributes:
    texture_size: resize unwrapped textures to T x T (None: keep the file's size).
    image_size: resize photos to (H, W) (None: keep); K is scaled to match.
    frontal_camera: keypoint camera (a dome camera name; None: the one facing the mean face most
      directly).
    hmc_cameras: dome cameras to cut the (left eye, right eye, mouth) crops from (None: the frontal
      camera).
    hmc_size: (h, w) of the crops; hmc_crop_mm: side of each square crop window in mm at the
      region's depth.
    image_frontal_size: (h, w) of the stored low-resolution frontal photo.
    keypoint_vertex_ids: fixed keypoint vertices (None: ``keypoint_vertex_ids.txt`` in the entity
      directory, else ``num_keypoints`` vertices by farthest-point sampling of the mean face seen by
      the frontal camera).
    keypoint_noise_px / keypoint_dropout: detector model, as for the synthetic capture; the noise is
      in pixels of the frontal camera at ``image_size`` (None: 1.5 px per 128 pixels of image
      height, the synthetic default's relative noise).
    num_factors: length of the (zero) ``factors`` vector, so that batches match the synthetic ones.
    skip_bad_frames: skip (and count) unreadable or inconsistent per-frame files instead of raising.
    frame_list / test_segment_json / camera_split_json: paths (None: inside the entity directory;
      the split files are optional: default test prefixes EXP_ROM, EXP_free_face and every camera
      for training).
    cameras: use only these dome cameras (None: all in KRT).
    seed: keypoint noise.
  """

  texture_size: Optional[int] = None
  image_size: Optional[Tuple[int, int]] = None
  frontal_camera: Optional[str] = None
  hmc_cameras: Optional[Tuple[str, str, str]] = None
  hmc_size: Tuple[int, int] = (32, 32)
  hmc_crop_mm: Tuple[float, float, float] = (55.0, 55.0, 75.0)
  image_frontal_size: Tuple[int, int] = (64, 64)
  keypoint_vertex_ids: Optional[Tuple[int, ...]] = None
  num_keypoints: int = 51
  keypoint_noise_px: Optional[float] = None
  keypoint_dropout: float = 0.03
  num_factors: int = sh.NUM_FACTORS
  skip_bad_frames: bool = False
  frame_list: Optional[str] = None
  test_segment_json: Optional[str] = None
  camera_split_json: Optional[str] = None
  cameras: Optional[Tuple[str, ...]] = None
  seed: int = 0


def _resize(a, size, resample=Image.BOX):
  """uint8 [H, W, C] -> [h, w, C]."""
  h, w = size
  if a.shape[:2] == (h, w):
    return a
  im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
  return np.asarray(im.resize((w, h), resample), np.uint8).reshape(h, w, a.shape[-1])


def _resize_texture(tex, size):
  """Resizes a texture whose black texels are unobserved: masked average, majority mask."""
  if tex.shape[0] == size:
    return tex
  m = schema.texture_mask(tex).astype(np.float32)
  num = np.asarray(jax.image.resize(tex.astype(np.float32) * m, (size, size, 3), "linear"))
  den = np.asarray(jax.image.resize(m, (size, size, 1), "linear"))
  out = np.where(den > 0.5, num / np.maximum(den, 1e-6), 0.0)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _scale_K(K, native, size):
  h0, w0 = native
  h, w = size
  return np.diag([w / w0, h / h0, 1.0]).astype(np.float32) @ np.asarray(K, np.float32)


def _farthest_points(points, count, start):
  chosen = [start]
  d = np.linalg.norm(points - points[start], axis=-1)
  for _ in range(count - 1):
    i = int(np.argmax(d))
    chosen.append(i)
    d = np.minimum(d, np.linalg.norm(points - points[i], axis=-1))
  return np.asarray(chosen, np.int32)


@functools.lru_cache(maxsize=8)
def _hard_render_fn(size):
  """Jitted, vmapped over cameras.

  (verts, faces, K [N, 3, 3], Rt [N, 3, 4]) -> (depth, alpha) [N, H, W].
  """
  settings = capture_lib.raster_settings(size)

  def one(verts, faces, K, Rt):
    frags = render.rasterize(verts, faces, geometry.Camera(K=K, Rt=Rt), settings)
    valid = frags.face_ids[..., 0] >= 0
    return jnp.where(valid, frags.zbuf[..., 0], 0.0), valid.astype(jnp.float32)

  return jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0)))


class MultifaceEntity:
  """One entity directory, validated and ready to produce examples in the dataset schema.

  Global files (KRT, frame list, statistics, topology, splits) are read in the constructor and
  always raise on error; per-frame files raise ``MultifaceFormatError`` naming the file, or, with
  ``options.skip_bad_frames``, are skipped and counted (``self.skipped``,
  ``self.skipped_reasons``).
  """

  def __init__(self, entity_dir, options: MultifaceOptions = MultifaceOptions()):
    self.root = os.fspath(entity_dir)
    self.options = o = options
    if not os.path.isdir(self.root):
      raise fmt.MultifaceMissingFileError(f"Multiface entity directory not found: {self.root}")
    cams, _ = geometry.read_krt(os.path.join(self.root, "KRT"))
    names = list(cams)
    if o.cameras is not None:
      unknown = [c for c in o.cameras if c not in cams]
      if unknown:
        raise fmt.MultifaceFormatError(
          f"{os.path.join(self.root, 'KRT')}: cameras {unknown} not in the file"
        )
      names = list(o.cameras)
    self.camera_names = names
    self.world_K = np.stack([np.asarray(cams[n].K, np.float32) for n in names])
    self.world_Rt = np.stack([np.asarray(cams[n].Rt, np.float32) for n in names])
    self.frames = fmt.read_frame_list(o.frame_list or os.path.join(self.root, "frame_list.txt"))
    self.segments = list(dict.fromkeys(s for s, _ in self.frames))
    self.skipped, self.skipped_reasons = 0, []
    # Topology from the first readable frame's OBJ.
    mesh = None
    for seg, fr in self.frames:
      try:
        mesh = geometry.read_obj(fmt.mesh_path(self.root, seg, fr, ".obj"))
        break
      except (OSError, ValueError) as e:
        if not o.skip_bad_frames:
          raise
        logging.warning(
          "multiface: no topology from %s: %s", fmt.mesh_path(self.root, seg, fr, ".obj"), e
        )
    if mesh is None:
      raise fmt.MultifaceFormatError(f"{self.root}: no readable tracked_mesh/<segment>/<frame>.obj")
    self.mesh = mesh
    self.num_verts = len(mesh.verts)
    self.vert_mean = fmt.read_mesh_bin(os.path.join(self.root, "vert_mean.bin"), self.num_verts)
    self.vert_std = float(
      np.sqrt(fmt.read_scalar(os.path.join(self.root, "vert_var.txt"), "vertex variance"))
    )
    tex_mean = fmt.read_texture(os.path.join(self.root, "tex_mean.png"), "mean texture")
    self.texture_size = o.texture_size or tex_mean.shape[0]
    self.tex_mean = (
      _resize(tex_mean, (self.texture_size,) * 2).astype(np.float32)
      if tex_mean.shape[0] != self.texture_size
      else tex_mean.astype(np.float32)
    )
    self.tex_std = float(
      np.sqrt(fmt.read_scalar(os.path.join(self.root, "tex_var.txt"), "texture variance"))
    )
    # Splits.
    tj = o.test_segment_json or os.path.join(self.root, fmt.TEST_SEGMENT_JSON)
    prefixes = (
      fmt.read_test_segments(tj)
      if (o.test_segment_json or os.path.exists(tj))
      else fmt.DEFAULT_TEST_PREFIXES
    )
    self.test_prefixes = prefixes
    self.test_segments = [s for s in self.segments if s.startswith(tuple(prefixes))]
    self.train_segments = [s for s in self.segments if s not in self.test_segments]
    cj = o.camera_split_json
    if cj is None:
      found = sorted(glob.glob(os.path.join(self.root, "camera-split-config*.json")))
      cj = found[0] if found else None
    if cj is not None:
      split = fmt.read_camera_split(cj)
      unknown = [c for c in split["train"] + split["test"] if c not in cams]
      if unknown:
        raise fmt.MultifaceFormatError(f"{cj}: cameras {unknown} are not in KRT")
      self.train_cameras = [c for c in split["train"] if c in names]
      self.test_cameras = [c for c in split["test"] if c in names and c not in self.train_cameras]
    else:
      self.train_cameras, self.test_cameras = list(names), []
    # Image sizes: from the first photo found (all cameras of a dome share one size).
    self.native_size = self._native_image_size()
    self.image_size = tuple(o.image_size) if o.image_size else self.native_size
    self.K = np.stack([_scale_K(k, self.native_size, self.image_size) for k in self.world_K])
    # The frame-0 pose (for choosing cameras and nominal HMC cameras).
    self.pose0 = self._first_pose()
    self.frontal_camera = o.frontal_camera or self._most_frontal_camera()
    if self.frontal_camera not in names:
      raise fmt.MultifaceFormatError(
        f"frontal camera {self.frontal_camera!r} is not among the cameras {names}"
      )
    self.frontal_index = names.index(self.frontal_camera)
    self.hmc_cameras = tuple(o.hmc_cameras or (self.frontal_camera,) * 3)
    for c in self.hmc_cameras:
      if c not in cams:
        raise fmt.MultifaceFormatError(f"HMC camera {c!r} is not in KRT")
    self.hmc_K_native = np.stack([np.asarray(cams[c].K, np.float32) for c in self.hmc_cameras])
    self.hmc_Rt_world = np.stack([np.asarray(cams[c].Rt, np.float32) for c in self.hmc_cameras])
    self._keypoints()

  # -------------------------------------------------------------------------------------- set-up
  def _native_image_size(self):
    for seg, fr in self.frames:
      for cam in self.camera_names:
        p = fmt.image_path(self.root, seg, cam, fr)
        if os.path.exists(p):
          try:
            return fmt.png_size(p)
          except fmt.MultifaceFormatError:
            if not self.options.skip_bad_frames:
              raise
    raise fmt.MultifaceMissingFileError(
      f"no photos found under {os.path.join(self.root, 'images')}"
    )

  def _first_pose(self):
    for seg, fr in self.frames:
      try:
        return fmt.read_transform(fmt.mesh_path(self.root, seg, fr, "transform"))
      except fmt.MultifaceFormatError:
        if not self.options.skip_bad_frames:
          raise
    raise fmt.MultifaceFormatError(f"{self.root}: no readable head pose")

  def _head_camera(self, K, Rt, pose):
    return geometry.Camera(
      K=jnp.asarray(K), Rt=geometry.compose_rigid(jnp.asarray(Rt), jnp.asarray(pose))
    )

  def _mean_normals(self):
    return np.asarray(
      geometry.vertex_normals(jnp.asarray(self.vert_mean), jnp.asarray(self.mesh.faces))
    )

  def _most_frontal_camera(self):
    n = self._mean_normals()
    face_dir = n.mean(0)
    face_dir /= max(np.linalg.norm(face_dir), 1e-9)
    best, name = -2.0, None
    for i, c in enumerate(self.camera_names):
      cam = self._head_camera(self.K[i], self.world_Rt[i], self.pose0)
      d = float(np.dot(np.asarray(geometry.view_direction(cam)), face_dir))
      if d > best:
        best, name = d, c
    return name

  def _keypoints(self):
    o = self.options
    path = os.path.join(self.root, fmt.KEYPOINT_IDS_TXT)
    where = ""  # the file the ids came from, for the error
    if o.keypoint_vertex_ids is not None:
      ids = np.asarray(o.keypoint_vertex_ids, np.int32)
      names = tuple(f"kp_{i}" for i in range(len(ids)))
    elif os.path.exists(path):
      names, ids = fmt.read_keypoint_ids(path)
      where = f"{path}: "
    else:
      cam = self._head_camera(
        self.K[self.frontal_index], self.world_Rt[self.frontal_index], self.pose0
      )
      n = self._mean_normals()
      towards = np.asarray(geometry.camera_center(cam))[None] - self.vert_mean
      facing = np.sum(n * towards, -1) / np.linalg.norm(towards, axis=-1) > 0.3
      cand = np.nonzero(facing)[0]
      pts = np.asarray(geometry.project(cam, jnp.asarray(self.vert_mean[cand])))
      start = int(np.argmin(np.linalg.norm(pts - pts.mean(0), axis=-1)))
      ids = cand[_farthest_points(pts, min(o.num_keypoints, len(cand)), start)].astype(np.int32)
      names = tuple(f"kp_{i}" for i in range(len(ids)))
    if ids.size == 0 or ids.min() < 0 or ids.max() >= self.num_verts:
      raise fmt.MultifaceFormatError(
        f"{where}keypoint vertex ids must lie in [0, {self.num_verts}), got "
        f"[{ids.min() if ids.size else None}, "
        f"{ids.max() if ids.size else None}]"
      )
    self.keypoint_ids, self.keypoint_names = ids, tuple(names)
    # HMC regions: keypoint groups when named like the synthetic head, else fixed fractions of the
    # frontal view of the mean face (a heuristic: pass named keypoints for real data).
    groups = sh.keypoint_groups(self.keypoint_names)
    if all(g in groups for g in ("eye_l", "eye_r", "mouth")):
      self.hmc_centres = np.stack(
        [self.vert_mean[ids[groups[g]]].mean(0) for g in ("eye_l", "eye_r", "mouth")]
      )
    else:
      cam = self._head_camera(
        self.K[self.frontal_index], self.world_Rt[self.frontal_index], self.pose0
      )
      pix, depth = (
        np.asarray(a) for a in geometry.project_with_depth(cam, jnp.asarray(self.vert_mean))
      )
      lo, hi = pix.min(0), pix.max(0)
      centres = []
      # The subject's left eye is on the image right.
      for fx, fy in ((0.65, 0.38), (0.35, 0.38), (0.5, 0.72)):
        target = lo + (hi - lo) * np.array([fx, fy])
        near = np.linalg.norm(pix - target, axis=-1)
        score = near + 1e-3 * (depth - depth.min())
        centres.append(self.vert_mean[int(np.argmin(score))])
      self.hmc_centres = np.stack(centres)

  # ----------------------------------------------------------------------------------- rendering
  def _renderer(self, size):
    """Hard render (depth [N,H,W], alpha [N,H,W]) of the tracked mesh into N cameras."""
    fn = _hard_render_fn(tuple(size))
    faces = jnp.asarray(self.mesh.faces)
    return lambda verts, K, Rt: fn(verts, faces, K, Rt)

  # -------------------------------------------------------------------------------------- frames
  def _bad(self, err, what):
    if not self.options.skip_bad_frames:
      raise err
    self.skipped += 1
    msg = f"skipped {what}: {err}"
    self.skipped_reasons.append(msg)
    logging.warning("multiface: %s", msg)

  def _hmc(self, seg, fr, pose, photos):
    """Grey crops [3, h, w, 1] uint8 and their cameras (head -> crop pixels)."""
    o = self.options
    h, w = o.hmc_size
    crops, Ks, Rts = [], [], []
    for v in range(3):
      cam_name = self.hmc_cameras[v]
      if cam_name not in photos:
        photos[cam_name] = self._photo(seg, cam_name, fr)
      img = photos[cam_name]
      K = self.hmc_K_native[v]
      Rt = np.asarray(geometry.compose_rigid(jnp.asarray(self.hmc_Rt_world[v]), jnp.asarray(pose)))
      pix, z = geometry.project_with_depth(
        geometry.Camera(K=jnp.asarray(K), Rt=jnp.asarray(Rt)),
        jnp.asarray(self.hmc_centres[v : v + 1]),
      )
      cx, cy = (float(a) for a in np.asarray(pix)[0])
      side = float(K[0, 0]) * o.hmc_crop_mm[v] / max(float(np.asarray(z)[0]), 1e-6)
      side = min(side, img.shape[0], img.shape[1])
      x0 = min(max(cx - side / 2, 0.0), img.shape[1] - side)
      y0 = min(max(cy - side / 2, 0.0), img.shape[0] - side)
      im = Image.fromarray(img).resize((w, h), Image.BOX, box=(x0, y0, x0 + side, y0 + side))
      rgb = np.asarray(im, np.float32)
      grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
      crops.append(np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None])
      S = np.array(
        [[w / side, 0, -w / side * x0], [0, h / side, -h / side * y0], [0, 0, 1]], np.float32
      )
      Ks.append(S @ K)
      Rts.append(Rt.astype(np.float32))
    return np.stack(crops), np.stack(Ks).astype(np.float32), np.stack(Rts)

  def _check_photo_size(self, photo, seg, cam, fr):
    if photo.shape[:2] != tuple(self.native_size):
      raise fmt.MultifaceFormatError(
        f"{fmt.image_path(self.root, seg, cam, fr)}: "
        f"photo is {photo.shape[:2]}, "
        f"expected {self.native_size}"
      )

  def _photo(self, seg, cam, fr):
    """This camera's photo of the frame, checked against the entity's native image size."""
    photo = fmt.read_png(fmt.image_path(self.root, seg, cam, fr), "photo")
    self._check_photo_size(photo, seg, cam, fr)
    return photo

  def frame_examples(
    self, frame_index: int, rng: np.random.RandomState
  ) -> Iterator[Tuple[int, dict]]:
    """Yields (camera_index, stored example) for one frame.

    Bad files raise or are skipped and counted.
    """
    o = self.options
    seg, fr = self.frames[frame_index]
    try:
      verts = fmt.read_mesh_bin(fmt.mesh_path(self.root, seg, fr), self.num_verts)
      pose = fmt.read_transform(fmt.mesh_path(self.root, seg, fr, "transform"))
      avg = fmt.read_texture(fmt.tex_path(self.root, seg, "average", fr), "average texture")
      avg = _resize_texture(avg, self.texture_size)
      photos = {}
      hmc, hmc_K, hmc_Rt = self._hmc(seg, fr, pose, photos)
      frontal_photo = photos.get(self.frontal_camera)  # checked by ``_photo`` when read
      if frontal_photo is None:
        frontal_photo = self._photo(seg, self.frontal_camera, fr)
    except (fmt.MultifaceFormatError, OSError) as e:
      self._bad(e, f"frame {seg}/{fr} (all cameras)")
      return
    # Keypoints in the frontal camera (image_size pixels); visibility from a hard render.
    fK = self.K[self.frontal_index]
    fRt = np.asarray(
      geometry.compose_rigid(jnp.asarray(self.world_Rt[self.frontal_index]), jnp.asarray(pose))
    )
    depth, alpha = self._renderer(tuple(self.image_size))(
      jnp.asarray(verts), jnp.asarray(fK[None]), jnp.asarray(fRt[None])
    )
    fcam = geometry.Camera(K=jnp.asarray(fK), Rt=jnp.asarray(fRt))
    normals = geometry.vertex_normals(jnp.asarray(verts), jnp.asarray(self.mesh.faces))
    kp3 = jnp.asarray(verts[self.keypoint_ids])
    clean = np.asarray(geometry.project(fcam, kp3), np.float32)
    geom_vis = np.asarray(
      capture_lib.visible(fcam, kp3, normals[self.keypoint_ids], depth[0], alpha[0], 3.0)
    )
    noise = 1.5 * self.image_size[0] / 128.0 if o.keypoint_noise_px is None else o.keypoint_noise_px
    kp, kp_vis = capture_lib.detect_keypoints(
      rng, clean, geom_vis, self.image_size, noise, o.keypoint_dropout
    )
    _, hmc_alpha = self._renderer(tuple(o.hmc_size))(
      jnp.asarray(verts), jnp.asarray(hmc_K), jnp.asarray(hmc_Rt)
    )
    per_frame = {
      schema.VERTS: verts,
      schema.AVG_TEX: avg,
      schema.KEYPOINTS: kp,
      schema.KEYPOINTS_VISIBLE: kp_vis.astype(np.uint8),
      schema.KEYPOINTS_CLEAN: clean,
      schema.FRONTAL_K: fK,
      schema.FRONTAL_RT: fRt.astype(np.float32),
      schema.IMAGE_FRONTAL: _resize(frontal_photo, o.image_frontal_size),
      schema.HMC: hmc,
      schema.HMC_MASK: (np.asarray(hmc_alpha) > 0.5).astype(np.uint8)[..., None],
      schema.HMC_K: hmc_K,
      schema.HMC_RT: hmc_Rt,
      schema.HEAD_POSE: pose,
      schema.FACTORS: np.zeros(o.num_factors, np.float32),
      schema.FRAME_INDEX: np.int32(frame_index),
      schema.SEGMENT_INDEX: np.int32(self.segments.index(seg)),
      schema.SEGMENT: seg,
      schema.FRAME: fr,
    }
    for c, cam in enumerate(self.camera_names):
      try:
        png = fmt.read_texture(fmt.tex_path(self.root, seg, cam, fr))
        tex = _resize_texture(png, self.texture_size)
        photo = self._photo(seg, cam, fr)
      except (fmt.MultifaceFormatError, OSError) as e:
        self._bad(e, f"frame {seg}/{fr} camera {cam}")
        continue
      Rt = np.asarray(
        geometry.compose_rigid(jnp.asarray(self.world_Rt[c]), jnp.asarray(pose)), np.float32
      )
      cam_h = geometry.Camera(K=jnp.asarray(self.K[c]), Rt=jnp.asarray(Rt))
      ex = dict(per_frame)
      ex.update(
        {
          schema.TEX: tex,
          schema.TEX_MASK: schema.texture_mask(tex),
          schema.VIEW: np.asarray(geometry.view_direction(cam_h), np.float32),
          schema.CAMERA_K: self.K[c],
          schema.CAMERA_RT: Rt,
          schema.CAMERA_INDEX: np.int32(c),
          schema.IMAGE: _resize(photo, self.image_size),
          schema.IMAGE_MASK: np.ones(tuple(self.image_size) + (1,), np.uint8),
          schema.CAMERA_ID: cam,
        }
      )
      yield c, ex

  def nominal_hmc_cameras(self):
    """HMC crop cameras of the first frame's pose: ([3, 3, 3], [3, 3, 4]) for the metadata."""
    h, w = self.options.hmc_size
    Ks, Rts = [], []
    for v in range(3):
      K = self.hmc_K_native[v]
      Rt = np.asarray(
        geometry.compose_rigid(jnp.asarray(self.hmc_Rt_world[v]), jnp.asarray(self.pose0))
      )
      pix, z = geometry.project_with_depth(
        geometry.Camera(K=jnp.asarray(K), Rt=jnp.asarray(Rt)),
        jnp.asarray(self.hmc_centres[v : v + 1]),
      )
      cx, cy = (float(a) for a in np.asarray(pix)[0])
      side = float(K[0, 0]) * self.options.hmc_crop_mm[v] / max(float(np.asarray(z)[0]), 1e-6)
      x0, y0 = cx - side / 2, cy - side / 2
      S = np.array(
        [[w / side, 0, -w / side * x0], [0, h / side, -h / side * y0], [0, 0, 1]], np.float32
      )
      Ks.append(S @ K)
      Rts.append(Rt)
    return np.stack(Ks).astype(np.float32), np.stack(Rts).astype(np.float32)
