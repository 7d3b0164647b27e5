"""Virtual capture of the synthetic head: dome images, unwrapped textures, keypoints and headset
crops.

``Capture(config)`` holds everything static (head, rig, script, texel map) and renders a frame with
one jitted function (vmap over the dome cameras, hard rasterisation by ``lipflow_jax.render``):

  1. verts = deform(factors) (head coordinates); texel surface points/normals from the fixed UV
  raster.
  2. Per dome camera: the view-dependent shaded texture (specular + rim), times the camera's colour
     gain/bias; the image is that texture rendered into the camera (composed with the head pose);
     the unwrapped texture is the same texture masked by visibility (facing the camera, inside the
     image and passing a depth test against the camera's hard-render depth).
  3. The average texture over cameras (texels seen by none stay 0).
  4. Frontal camera: image, keypoints (fixed vertices projected; detector noise, dropout and
  self-occlusion
     make them visible or not) and a low-resolution copy of the image (``image_frontal``).
  5. Headset cameras (rigid in head coordinates): grey (BT.601) renders with sensor noise.

Textures and images are quantised to uint8 (textures 0..255 with 0 = unobserved; observed texels are
>= 2).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lipflow_jax import geometry, render
from lipflow_jax.data import capture_script, uv_raster
from lipflow_jax.data import rig as rig_lib
from lipflow_jax.data import synthetic_head as sh


@dataclasses.dataclass(frozen=True)
class CaptureConfig:
  """Sizes and knobs of a synthetic capture (all plain values).

  Attributes:
    grid: (rows, cols) of the face mesh's vertex grid (V = rows * cols).
    texture_size: T of the unwrapped textures.
    num_cameras: dome cameras; ``num_test_cameras`` of them are held out (novel-view evaluation).
    image_size: (H, W) of the dome images; ``frontal_size`` of the keypoint camera;
      ``image_frontal_size`` of the stored low-resolution frontal image; ``hmc_size`` (h, w) of the
      headset crops.
    train_segments / test_segments / validation_segments: segment names (train themes in
      ``capture_script.SEGMENTS``; held-out segments mix every factor). The validation segments form
      a third split for choosing fitting settings (e.g. the prior weight) without looking at the
      test split.
    frames_per_segment / test_frames_per_segment: frames of each train / held-out segment.
    train_views_per_frame: dome views stored per training frame (0 = every camera). Every camera is
      still rendered (the average texture needs them all); a training frame keeps this many of the
      training cameras, rotating with the frame so that consecutive frames cover the dome.
      Held-out frames keep every camera (the evaluation renders all of them).
    keypoint_noise_px: std of the keypoint detector noise (pixels of the frontal camera).
    keypoint_dropout: probability that a keypoint is missed by the detector.
    hmc_noise: std of the headset sensor noise (on [0, 1] grey values).
    pose_jitter_deg / pose_jitter_mm: head pose jitter.
    dome_radius, fov_degrees, max_azimuth_degrees: dome geometry (mm, degrees); the frontal camera
      shares the radius and field of view.
    seed: everything random (person, script, noise) derives from it.
  """

  grid: Tuple[int, int] = (48, 53)
  texture_size: int = 64
  num_cameras: int = 40
  num_test_cameras: int = 4
  image_size: Tuple[int, int] = (64, 64)
  frontal_size: Tuple[int, int] = (128, 128)
  image_frontal_size: Tuple[int, int] = (64, 64)
  hmc_size: Tuple[int, int] = (32, 32)
  train_segments: Tuple[str, ...] = tuple(capture_script.SEGMENTS)
  test_segments: Tuple[str, ...] = capture_script.TEST_SEGMENTS_V2
  validation_segments: Tuple[str, ...] = capture_script.VALIDATION_SEGMENTS
  # v2: 18 x 84 = 1,512 training frames (a real capture has thousands per person), 4 test segments
  # x 24 = 96 held-out test frames, 24 validation frames.
  frames_per_segment: int = 84
  test_frames_per_segment: int = 24
  train_views_per_frame: int = 8
  # Keypoints of the 128-px frontal camera move ~1.6 px (std over frames) with expression and head
  # jitter: 0.5 px of noise corresponds to ~2 px on a 512-px detector image (1.5 px left them with a
  # SNR near 1).
  keypoint_noise_px: float = 0.5
  keypoint_dropout: float = 0.03
  hmc_noise: float = 0.02
  pose_jitter_deg: float = 2.5
  pose_jitter_mm: float = 4.0
  dome_radius: float = 650.0
  fov_degrees: float = 24.0
  max_azimuth_degrees: float = 80.0
  seed: int = 0

  @property
  def num_frames(self) -> int:
    return (
      len(self.train_segments) * self.frames_per_segment
      + (len(self.test_segments) + len(self.validation_segments)) * self.test_frames_per_segment
    )


CONFIGS = {
  # Unit tests: builds in a few seconds.
  "tiny": CaptureConfig(
    grid=(22, 25),
    texture_size=32,
    num_cameras=6,
    num_test_cameras=2,
    image_size=(32, 32),
    frontal_size=(32, 32),
    image_frontal_size=(16, 16),
    hmc_size=(32, 32),
    train_segments=("E002_Jaw_Open", "E006_Pucker", "E009_Blink"),
    test_segments=("EXP_ROM_01",),
    validation_segments=("V001_free_face",),
    frames_per_segment=4,
    test_frames_per_segment=4,
    keypoint_noise_px=0.5,
    max_azimuth_degrees=50.0,
  ),
  # CPU default (v2): 1,632 frames (18 train segments x 84, 4 test + 1 validation segment x 24) x
  # 40 cameras, 8 of the 36 training cameras stored per training frame (the build writes 1/5 of
  # the bytes of all 40, and 12k training examples are plenty for the batch-16 training of the
  # demo); about six minutes to build on 2 CPU cores.
  "default": CaptureConfig(),
}


def test_camera_indices(num_cameras: int, num_test: int):
  """Held-out dome cameras: evenly spread over the dome (never the first or the last).

  The nearest cameras to ``num_test`` points that split [0, num_cameras - 1] into equal parts; they
  are at least one camera apart, so there are exactly ``num_test`` of them.
  """
  if num_test <= 0:
    return []
  if num_test >= num_cameras - 1:
    raise ValueError(f"num_test_cameras={num_test} leaves no training camera of {num_cameras}")
  step = (num_cameras - 1) / (num_test + 1)
  return [int(round(step * k)) for k in range(1, num_test + 1)]


def _max3x3(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (3, 3), (1, 1), "SAME")


def visible(camera, points, normals, depth, alpha, tol):
  """Texel/vertex visibility in a camera: facing it, inside the image, passing the depth test.

  points, normals: [..., 3]; depth, alpha: [H, W] hard render. Returns [...] bool.
  """
  h, w = depth.shape
  shape = points.shape[:-1]
  pts = points.reshape(-1, 3)
  px, z = geometry.project_with_depth(camera, pts)
  col = jnp.floor(px[:, 0]).astype(jnp.int32)
  row = jnp.floor(px[:, 1]).astype(jnp.int32)
  inside = (col >= 0) & (col < w) & (row >= 0) & (row < h) & (z > 0)
  dmax = _max3x3(jnp.where(alpha > 0, depth, jnp.inf))
  dz = dmax[jnp.clip(row, 0, h - 1), jnp.clip(col, 0, w - 1)]
  centre = geometry.camera_center(camera)
  facing = jnp.sum(normals.reshape(-1, 3) * (centre - pts), -1) > 0
  return (inside & facing & (z <= dz + tol)).reshape(shape)


def _texel_surface(texel_map, faces, verts, normals):
  pts = uv_raster.texel_points(texel_map, faces, verts)
  nrm = uv_raster.texel_points(texel_map, faces, normals)
  nrm = nrm / jnp.maximum(jnp.linalg.norm(nrm, axis=-1, keepdims=True), 1e-8)
  return pts, nrm


def camera_groups(image_size, frontal_size, hmc_size):
  """Cameras of equal image size are rendered by one vmapped call (one compilation).

  Returns a tuple of (size, members) with members a tuple of camera kinds among 'dome', 'frontal',
  'hmc'.
  """
  groups = {}
  for kind, size in (("dome", image_size), ("frontal", frontal_size), ("hmc", hmc_size)):
    groups.setdefault(tuple(size), []).append(kind)
  return tuple((size, tuple(kinds)) for size, kinds in groups.items())


def render_frame(
  consts,
  factors,
  head_pose,
  *,
  faces,
  texel_map,
  groups,
  settings_fn,
  depth_tol=3.0,
  camera_chunk=4,
):
  """Renders one frame from every camera (pure; jit with the keyword arguments bound).

  Args:
    consts: dict of arrays: plane [V,2], uvs [V,2], person, texel_plane_ss [2T,2T,2], dome_K
      [C,3,3], dome_Rt [C,3,4] (world), gain/bias [C,3], frontal_K [1,3,3], frontal_Rt [1,3,4]
      (world), hmc_K [3,3,3], hmc_Rt [3,3,4] (head), keypoint_ids [P].
    factors: [N_f]; head_pose: [3, 4] head-to-world.
    faces: [F, 3] int32 numpy; texel_map: ``uv_raster.TexelMap`` (static numpy).
    groups: ``camera_groups(...)``; settings_fn: size -> ``render.RasterSettings`` (hard).
    depth_tol: depth-test tolerance (mm).
    camera_chunk: cameras rendered together (vmap) per step of a sequential loop.
  Returns:
    dict of arrays, per camera kind (see the end of the function).
  """
  verts = sh.deform(consts["plane"], factors)
  normals = geometry.vertex_normals(verts, jnp.asarray(faces))
  rgb_a, ks, shin = sh.albedo_texture(consts["texel_plane_ss"], factors, consts["person"])
  pts, nrm = _texel_surface(texel_map, faces, verts, normals)
  has_face = jnp.asarray(texel_map.face_id >= 0)
  uvs = consts["uvs"]
  compose = jax.vmap(lambda rt: geometry.compose_rigid(rt, head_pose))
  cams = {  # K, Rt (head coordinates -> camera), gain, bias
    "dome": (consts["dome_K"], compose(consts["dome_Rt"]), consts["gain"], consts["bias"]),
    "frontal": (
      consts["frontal_K"],
      compose(consts["frontal_Rt"]),
      jnp.ones((1, 3)),
      jnp.zeros((1, 3)),
    ),
    "hmc": (consts["hmc_K"], consts["hmc_Rt"], jnp.ones((3, 3)), jnp.zeros((3, 3))),
  }

  def one(K, Rt, gain, bias, settings):
    cam = geometry.Camera(K=K, Rt=Rt)
    tex = jnp.clip(
      sh.shade(rgb_a, ks, shin, pts, nrm, geometry.camera_center(cam)) * gain + bias,
      2.0 / 255.0,
      1.0,
    )
    out = render.render_mesh(verts, faces, uvs, faces, tex, cam, settings)
    alpha = out.alpha[..., 0]
    vis = visible(cam, pts, nrm, out.depth, alpha, depth_tol) & has_face
    return dict(
      tex=tex * vis[..., None],
      mask=vis,
      image=out.rgb,
      alpha=alpha,
      depth=out.depth,
      overflow=out.overflow,
      K=K,
      Rt=Rt,
      view=geometry.view_direction(cam),
    )

  res = {}
  for size, kinds in groups:
    n = [cams[k][0].shape[0] for k in kinds]
    args = [jnp.concatenate([cams[k][i] for k in kinds]) for i in range(4)]
    settings = settings_fn(size)
    # Chunks of cameras in sequence keep the rasteriser's intermediates small (fewer page faults on
    # CPU).
    out = jax.lax.map(
      lambda a: one(*a, settings), tuple(args), batch_size=min(camera_chunk, len(args[0]))
    )
    offsets = np.cumsum([0] + n)
    for k, a, b in zip(kinds, offsets[:-1], offsets[1:]):
      res[k] = jax.tree_util.tree_map(lambda x: x[a:b], out)
  dome, fr, hm = res["dome"], jax.tree_util.tree_map(lambda x: x[0], res["frontal"]), res["hmc"]
  m = dome["mask"].astype(jnp.float32)[..., None]
  avg = jnp.sum(dome["tex"], 0) / jnp.maximum(jnp.sum(m, 0), 1.0)
  fcam = geometry.Camera(K=fr["K"], Rt=fr["Rt"])
  kp3 = verts[consts["keypoint_ids"]]
  kp_clean = geometry.project(fcam, kp3)
  kp_vis = visible(fcam, kp3, normals[consts["keypoint_ids"]], fr["depth"], fr["alpha"], depth_tol)
  grey = jnp.sum(hm["image"] * jnp.array([0.299, 0.587, 0.114]), -1)
  return dict(
    verts=verts,
    tex=dome["tex"],
    tex_mask=dome["mask"],
    avg_tex=avg,
    image=dome["image"],
    image_mask=dome["alpha"],
    camera_K=dome["K"],
    camera_Rt=dome["Rt"],
    view=dome["view"],
    frontal_image=fr["image"],
    frontal_mask=fr["alpha"],
    frontal_K=fr["K"],
    frontal_Rt=fr["Rt"],
    keypoints_clean=kp_clean,
    keypoints_geom_visible=kp_vis,
    hmc=grey,
    hmc_mask=hm["alpha"],
    overflow=jnp.sum(dome["overflow"]) + fr["overflow"] + jnp.sum(hm["overflow"]),
  )


def to_uint8(x):
  """[0, 1] floats -> uint8 (rounded)."""
  return np.clip(np.round(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)


def downsample(img, size):
  """[H, W, C] float -> [h, w, C] by area averaging (H, W multiples of h, w) or bilinear
  otherwise."""
  img = np.asarray(img, np.float32)
  h, w = size
  if img.shape[0] % h == 0 and img.shape[1] % w == 0:
    fh, fw = img.shape[0] // h, img.shape[1] // w
    return img.reshape(h, fh, w, fw, -1).mean(axis=(1, 3))
  return np.asarray(jax.image.resize(img, (h, w, img.shape[-1]), "linear"))


def detect_keypoints(
  rng: np.random.RandomState, clean, geom_visible, image_size, noise_px: float, dropout: float
):
  """Detector model: Gaussian pixel noise, random misses, self-occlusion and out-of-image misses.

  Args:
    clean: [P, 2] exact projections; geom_visible: [P] bool (facing and not occluded).
  Returns:
    (keypoints [P, 2] float32 finite, invisible ones set to 0; visible [P] float32 {0, 1}).
  """
  h, w = image_size
  noisy = clean + noise_px * rng.randn(*clean.shape)
  vis = (
    np.asarray(geom_visible)
    & (rng.uniform(size=len(clean)) >= dropout)
    & (noisy[:, 0] >= 0)
    & (noisy[:, 0] < w)
    & (noisy[:, 1] >= 0)
    & (noisy[:, 1] < h)
  )
  kp = np.where(vis[:, None], noisy, 0.0)
  return kp.astype(np.float32), vis.astype(np.float32)


def raster_settings(image_size):
  """Hard settings of the ground-truth renders (K = 1, no blur, back faces culled: the head is
  open).

  Tiles of 4 pixels with 128 candidates do not overflow on the default mesh at the default sizes
  (checked against 1024 candidates); ``Capture.render`` reports overflows.
  """
  return render.RasterSettings.hard(
    tuple(image_size), tile_size=4, max_faces_per_tile=128, cull_backfaces=True
  )


class Capture:
  """A synthetic capture session: static data plus a jitted per-frame renderer.

  Attributes:
    config: ``CaptureConfig``; head: ``synthetic_head.Head``; rig: ``rig.Rig``; script:
      ``capture_script.Script``; texel_map: ``uv_raster.TexelMap``.
    train_cameras / test_cameras: dome camera indices.
  """

  def __init__(self, config: CaptureConfig):
    self.config = config
    c = config
    self.head = sh.make_head(tuple(c.grid), seed=c.seed)
    self.rig = rig_lib.make_rig(
      c.num_cameras,
      c.image_size,
      c.frontal_size,
      c.hmc_size,
      radius=c.dome_radius,
      fov_degrees=c.fov_degrees,
      max_azimuth_degrees=c.max_azimuth_degrees,
      seed=c.seed,
    )
    self.script = capture_script.make_script(
      c.train_segments,
      c.test_segments,
      c.frames_per_segment,
      c.test_frames_per_segment,
      seed=c.seed + 1,
      jitter_deg=c.pose_jitter_deg,
      jitter_mm=c.pose_jitter_mm,
      validation_segments=c.validation_segments,
    )
    self.texel_map = uv_raster.rasterize_uv(self.head.uvs, self.head.faces, c.texture_size)
    self.test_cameras = test_camera_indices(c.num_cameras, c.num_test_cameras)
    self.train_cameras = [i for i in range(c.num_cameras) if i not in self.test_cameras]
    self._consts = dict(
      plane=self.head.plane,
      uvs=self.head.uvs,
      person=self.head.person,
      texel_plane_ss=sh.texel_plane(c.texture_size, 2),
      dome_K=self.rig.K,
      dome_Rt=self.rig.Rt,
      gain=self.rig.gain,
      bias=self.rig.bias,
      frontal_K=self.rig.frontal_K[None],
      frontal_Rt=self.rig.frontal_Rt[None],
      hmc_K=self.rig.hmc_K,
      hmc_Rt=self.rig.hmc_Rt,
      keypoint_ids=self.head.keypoint_vertex_ids,
    )
    self._consts = jax.tree_util.tree_map(jnp.asarray, self._consts)
    self._render = jax.jit(
      functools.partial(
        render_frame,
        faces=self.head.faces,
        texel_map=self.texel_map,
        groups=camera_groups(c.image_size, c.frontal_size, c.hmc_size),
        settings_fn=raster_settings,
      )
    )

  @property
  def num_frames(self) -> int:
    return len(self.script.frame_names)

  def segment_name(self, frame_index: int) -> str:
    return self.script.segments[self.script.frame_segment[frame_index]]

  def split_of(self, frame_index: int) -> str:
    """'train', 'test' or 'validation'."""
    name = self.segment_name(frame_index)
    if name in self.config.test_segments:
      return "test"
    return "validation" if name in self.config.validation_segments else "train"

  def stored_cameras(self, frame_index: int) -> List[int]:
    """Dome camera indices stored for a frame (``CaptureConfig.train_views_per_frame``)."""
    k, n = self.config.train_views_per_frame, len(self.train_cameras)
    if self.split_of(frame_index) != "train" or k <= 0 or k >= n:
      return list(range(self.config.num_cameras))
    return sorted(self.train_cameras[(frame_index + j * n // k) % n] for j in range(k))

  def render(self, frame_index: int) -> Dict[str, np.ndarray]:
    """Renders frame ``frame_index`` from every camera and applies the run-time signal models.

    Returns a dict of numpy arrays: float ground truth (``verts`` [V,3], ``keypoints_clean`` [P,2],
    camera matrices, ``head_pose``, ``factors``) and uint8 pixels: ``tex`` [C,T,T,3], ``tex_mask``
    [C,T,T,1], ``avg_tex`` [T,T,3], ``image`` [C,H,W,3], ``image_mask`` [C,H,W,1], ``image_frontal``
    [h,w,3], ``hmc`` [3,h,w,1], ``hmc_mask`` [3,h,w,1]; plus noisy ``keypoints`` [P,2],
    ``keypoints_visible`` [P]; not stored in the dataset: ``frontal_image_full`` [Hf,Wf,3] and
    ``frontal_mask`` [Hf,Wf,1] (frontal camera at keypoint resolution), ``overflow`` (rasteriser
    tile overflows, 0 when exact).
    """
    c = self.config
    factors = self.script.factors[frame_index]
    pose = self.script.head_pose[frame_index]
    out = jax.device_get(self._render(self._consts, jnp.asarray(factors), jnp.asarray(pose)))
    rng = np.random.RandomState((c.seed * 1000003 + frame_index * 7919 + 17) % (2**31))
    kp, kp_vis = detect_keypoints(
      rng,
      out["keypoints_clean"],
      out["keypoints_geom_visible"],
      c.frontal_size,
      c.keypoint_noise_px,
      c.keypoint_dropout,
    )
    hmc = out["hmc"] + c.hmc_noise * rng.randn(*out["hmc"].shape)
    f32 = lambda a: np.asarray(a, np.float32)
    return dict(
      verts=f32(out["verts"]),
      head_pose=f32(pose),
      factors=f32(factors),
      tex=to_uint8(out["tex"]),
      tex_mask=np.asarray(out["tex_mask"], np.uint8)[..., None],
      avg_tex=to_uint8(out["avg_tex"]),
      image=to_uint8(out["image"]),
      image_mask=to_uint8(out["image_mask"])[..., None] // 255,
      camera_K=f32(out["camera_K"]),
      camera_Rt=f32(out["camera_Rt"]),
      view=f32(out["view"]),
      frontal_K=f32(out["frontal_K"]),
      frontal_Rt=f32(out["frontal_Rt"]),
      image_frontal=to_uint8(downsample(out["frontal_image"], c.image_frontal_size)),
      frontal_image_full=to_uint8(out["frontal_image"]),
      keypoints=kp,
      keypoints_visible=kp_vis,
      keypoints_clean=f32(out["keypoints_clean"]),
      frontal_mask=np.asarray(out["frontal_mask"] > 0.5, np.uint8)[..., None],
      hmc=to_uint8(np.clip(hmc, 0.0, 1.0))[..., None],
      hmc_mask=to_uint8(out["hmc_mask"])[..., None] // 255,
      hmc_K=f32(self.rig.hmc_K),
      hmc_Rt=f32(self.rig.hmc_Rt),
      overflow=int(out["overflow"]),
    )


@functools.lru_cache(maxsize=4)
def get_capture(config: CaptureConfig) -> Capture:
  """A shared ``Capture`` per config, so that its jitted renderer compiles once per process."""
  return Capture(config)
