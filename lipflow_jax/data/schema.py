"""Example and batch keys, normalisation, and the per-dataset metadata (``DatasetMeta``).

One example = one (frame, dome camera) pair. What the input pipeline yields (leading batch axis B;
float32 unless said; per-frame fields repeat for every camera of the frame):

| key | shape | meaning |
|---|---|---|
| ``verts`` | [B, V, 3] | tracked mesh, head coordinates, normalised: (v - vert_mean) / vert_std |
| ``avg_tex`` | [B, T, T, 3] | mean unwrapped texture over cameras, (t - tex_mean) / tex_std; |
| | | on 0..255, unobserved texels 0 |
| ``tex`` | [B, T, T, 3] | this camera's unwrapped texture, normalised like ``avg_tex`` |
| ``tex_mask`` | [B, T, T, 1] | {0, 1}: texel observed by this camera |
| ``view`` | [B, 3] | unit direction from the head origin to this camera, head coordinates |
| ``camera_K``, ``camera_Rt`` | [B, 3, 3], [B, 3, 4] | the camera with the head pose: head -> px |
| ``camera_index`` | [B] int32 | index into ``DatasetMeta.camera_names`` (colour gain/bias) |
| ``image``, ``image_mask`` | [B, H, W, 3], [B, H, W, 1] | the photo in [0, 1]; {0, 1} foreground |
| ``keypoints`` | [B, P, 2] | detected 2D keypoints, frontal camera pixels; invisible ones 0 |
| ``keypoints_visible`` | [B, P] | {0, 1} |
| ``frontal_K``, ``frontal_Rt`` | [B, 3, 3], [B, 3, 4] | frontal camera with the head pose |
| ``image_frontal`` | [B, hf, wf, 3] | low-resolution frontal photo in [0, 1] |
| ``hmc``, ``hmc_mask`` | [B, 3, h, w, 1] | headset crops (left eye, right eye, mouth), grey in |
| | | [0, 1]; {0, 1} face pixels |
| ``hmc_K``, ``hmc_Rt`` | [B, 3, 3, 3], [B, 3, 3, 4] | head coords -> each headset crop |
| ``head_pose`` | [B, 3, 4] | head -> world, x_world = R x_head + t |
| ``factors`` | [B, N_f] | ground-truth expression factors (zeros for Multiface) |
| ``frame_index``, ``segment_index`` | [B] int32 | ids in ``DatasetMeta.frames`` / ``.segments`` |

Extra numeric keys kept by the pipeline: ``keypoints_clean`` [B, P, 2] (noise-free projections of
the keypoint vertices, synthetic only; equal to the noisy ones where the source has none). Strings
stored in the examples (``segment``, ``frame``, ``camera_id``) are dropped by the pipeline.

Stored (on disk) dtypes differ: pixels and textures are uint8 0..255, masks uint8 {0, 1}, vertices
float32 in dataset units (mm); ``normalize_example`` converts a stored example into the batch form
above.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Sequence, Tuple

import flax.struct
import jax.numpy as jnp
import numpy as np

# ------------------------------------------------------------------------------------------------
# keys
VERTS = "verts"
AVG_TEX = "avg_tex"
TEX = "tex"
TEX_MASK = "tex_mask"
VIEW = "view"
CAMERA_K = "camera_K"
CAMERA_RT = "camera_Rt"
CAMERA_INDEX = "camera_index"
IMAGE = "image"
IMAGE_MASK = "image_mask"
KEYPOINTS = "keypoints"
KEYPOINTS_VISIBLE = "keypoints_visible"
KEYPOINTS_CLEAN = "keypoints_clean"
FRONTAL_K = "frontal_K"
FRONTAL_RT = "frontal_Rt"
IMAGE_FRONTAL = "image_frontal"
HMC = "hmc"
HMC_MASK = "hmc_mask"
HMC_K = "hmc_K"
HMC_RT = "hmc_Rt"
HEAD_POSE = "head_pose"
FACTORS = "factors"
FRAME_INDEX = "frame_index"
SEGMENT_INDEX = "segment_index"
SEGMENT = "segment"
FRAME = "frame"
CAMERA_ID = "camera_id"

HMC_VIEWS = ("left_eye", "right_eye", "mouth")
STRING_KEYS = (SEGMENT, FRAME, CAMERA_ID)
INT_KEYS = (CAMERA_INDEX, FRAME_INDEX, SEGMENT_INDEX)
# Stored uint8 pixels in 0..255 -> [0, 1] in the batch.
UNIT_IMAGE_KEYS = (IMAGE, IMAGE_FRONTAL, HMC)
MASK_KEYS = (TEX_MASK, IMAGE_MASK, HMC_MASK)
TEXTURE_KEYS = (AVG_TEX, TEX)
# Keys that are per frame (identical for every camera of a frame) vs per (frame, camera).
FRAME_KEYS = (
  VERTS,
  AVG_TEX,
  KEYPOINTS,
  KEYPOINTS_VISIBLE,
  KEYPOINTS_CLEAN,
  FRONTAL_K,
  FRONTAL_RT,
  IMAGE_FRONTAL,
  HMC,
  HMC_MASK,
  HMC_K,
  HMC_RT,
  HEAD_POSE,
  FACTORS,
  FRAME_INDEX,
  SEGMENT_INDEX,
)
CAMERA_KEYS = (TEX, TEX_MASK, VIEW, CAMERA_K, CAMERA_RT, CAMERA_INDEX, IMAGE, IMAGE_MASK)
BATCH_KEYS = FRAME_KEYS + CAMERA_KEYS


def feature_shapes(
  num_verts: int,
  texture_size: int,
  image_size,
  num_keypoints: int,
  image_frontal_size,
  hmc_size,
  num_factors: int,
) -> Dict[str, Tuple[Tuple[int, ...], Any]]:
  """{key: (shape, stored numpy dtype)} of one stored example (strings excluded)."""
  t, (h, w), (hf, wf), (hh, hw) = texture_size, image_size, image_frontal_size, hmc_size
  p, u8, f32, i32 = num_keypoints, np.uint8, np.float32, np.int32
  return {
    VERTS: ((num_verts, 3), f32),
    AVG_TEX: ((t, t, 3), u8),
    TEX: ((t, t, 3), u8),
    TEX_MASK: ((t, t, 1), u8),
    VIEW: ((3,), f32),
    CAMERA_K: ((3, 3), f32),
    CAMERA_RT: ((3, 4), f32),
    CAMERA_INDEX: ((), i32),
    IMAGE: ((h, w, 3), u8),
    IMAGE_MASK: ((h, w, 1), u8),
    KEYPOINTS: ((p, 2), f32),
    KEYPOINTS_VISIBLE: ((p,), u8),
    KEYPOINTS_CLEAN: ((p, 2), f32),
    FRONTAL_K: ((3, 3), f32),
    FRONTAL_RT: ((3, 4), f32),
    IMAGE_FRONTAL: ((hf, wf, 3), u8),
    HMC: ((3, hh, hw, 1), u8),
    HMC_MASK: ((3, hh, hw, 1), u8),
    HMC_K: ((3, 3, 3), f32),
    HMC_RT: ((3, 3, 4), f32),
    HEAD_POSE: ((3, 4), f32),
    FACTORS: ((num_factors,), f32),
    FRAME_INDEX: ((), i32),
    SEGMENT_INDEX: ((), i32),
  }


# ----------------------------------------------------------------------------------------------
# metadata
@dataclasses.dataclass
class DatasetMeta:
  """Everything shared by the examples of one dataset (saved as ``meta.npz`` + ``meta.json``).

  Arrays are numpy; cameras of the dome and the frontal camera are in world coordinates (compose
  them with an example's ``head_pose``, or use the example's own ``camera_*`` / ``frontal_*`` which
  already are); headset cameras are in head coordinates (synthetic: rigid; Multiface: the crop
  cameras of the mean pose, each example carries its own ``hmc_K``/``hmc_Rt``).

  Attributes:
    name: dataset name and config, e.g. 'synthetic_capture/default'.
    uvs [U, 2], faces [F, 3] int32, uv_faces [F, 3] int32: topology (UV (0, 0) = bottom-left).
    keypoint_vertex_ids [P] int32; keypoint_names: P strings.
    vert_mean [V, 3], vert_std (scalar): vertex normalisation (dataset units, mm).
    tex_mean [T, T, 3] (0..255 float), tex_std (scalar): texture normalisation.
    camera_names: C dome camera names; camera_K [C, 3, 3], camera_Rt [C, 3, 4] (world); image_size
      (H, W).
    frontal_camera: its name; frontal_K, frontal_Rt (world); frontal_size (H, W) (keypoint pixels);
      image_frontal_size (h, w).
    hmc_K [3, 3, 3], hmc_Rt [3, 3, 4] (head coordinates); hmc_size (h, w); hmc_views.
    segments: all segment names (``segment_index``); frames: all (segment, frame) pairs
      (``frame_index``).
    train_segments / test_segments; train_cameras / test_cameras (names; test = held out from
    training). factor_names; factor_keypoint_visible, factor_hmc_visible (bools); has_factors.
    splits: {split: {'frame_index', 'camera_index', 'segment_index': [N] int32}} in record order.
    skipped: number of (frame, camera) examples skipped as bad input; skipped_reasons: their
      messages.
    extra: free-form JSON-able info (the builder config, build statistics).
  """

  name: str
  uvs: np.ndarray
  faces: np.ndarray
  uv_faces: np.ndarray
  keypoint_vertex_ids: np.ndarray
  keypoint_names: List[str]
  vert_mean: np.ndarray
  vert_std: float
  tex_mean: np.ndarray
  tex_std: float
  camera_names: List[str]
  camera_K: np.ndarray
  camera_Rt: np.ndarray
  image_size: Tuple[int, int]
  frontal_camera: str
  frontal_K: np.ndarray
  frontal_Rt: np.ndarray
  frontal_size: Tuple[int, int]
  image_frontal_size: Tuple[int, int]
  hmc_K: np.ndarray
  hmc_Rt: np.ndarray
  hmc_size: Tuple[int, int]
  segments: List[str]
  frames: List[Tuple[str, str]]
  train_segments: List[str]
  test_segments: List[str]
  train_cameras: List[str]
  test_cameras: List[str]
  factor_names: List[str]
  factor_keypoint_visible: List[bool]
  factor_hmc_visible: List[bool]
  has_factors: bool
  splits: Dict[str, Dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
  skipped: int = 0
  skipped_reasons: List[str] = dataclasses.field(default_factory=list)
  hmc_views: Tuple[str, ...] = HMC_VIEWS
  extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_verts(self) -> int:
    return int(self.vert_mean.shape[0])

  @property
  def texture_size(self) -> int:
    return int(self.tex_mean.shape[0])

  @property
  def num_keypoints(self) -> int:
    return int(len(self.keypoint_vertex_ids))

  @property
  def num_cameras(self) -> int:
    return len(self.camera_names)

  @property
  def num_factors(self) -> int:
    return len(self.factor_names)

  def camera_indices(self, names: Sequence[str]) -> List[int]:
    """Indices into ``camera_names`` (raises KeyError naming an unknown camera)."""
    lookup = {n: i for i, n in enumerate(self.camera_names)}
    missing = [n for n in names if n not in lookup]
    if missing:
      raise KeyError(f"unknown cameras {missing}; the dataset has {self.camera_names}")
    return [lookup[n] for n in names]

  def segment_indices(self, names: Sequence[str]) -> List[int]:
    lookup = {n: i for i, n in enumerate(self.segments)}
    return [lookup[n] for n in names if n in lookup]


_ARRAY_FIELDS = (
  "uvs",
  "faces",
  "uv_faces",
  "keypoint_vertex_ids",
  "vert_mean",
  "tex_mean",
  "camera_K",
  "camera_Rt",
  "frontal_K",
  "frontal_Rt",
  "hmc_K",
  "hmc_Rt",
)
META_NPZ, META_JSON = "meta.npz", "meta.json"


def save_meta(meta: DatasetMeta, directory) -> None:
  """Writes ``meta.npz`` (arrays, split indices) and ``meta.json`` (the rest) into ``directory``."""
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  arrays = {k: np.asarray(getattr(meta, k)) for k in _ARRAY_FIELDS}
  for split, cols in meta.splits.items():
    for col, a in cols.items():
      arrays[f"split/{split}/{col}"] = np.asarray(a, np.int32)
  with open(os.path.join(directory, META_NPZ), "wb") as f:
    np.savez(f, **arrays)
  rest = {
    f.name: getattr(meta, f.name)
    for f in dataclasses.fields(meta)
    if f.name not in _ARRAY_FIELDS and f.name != "splits"
  }
  rest["frames"] = [list(x) for x in meta.frames]
  rest["split_names"] = sorted(meta.splits)
  with open(os.path.join(directory, META_JSON), "w") as f:
    json.dump(rest, f, indent=1, default=_json_default)


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f"not JSON serialisable: {type(x)}")


def meta_dir(source) -> str:
  """The directory holding ``meta.json`` for a path, a TFDS builder or a TFDS data source."""
  if isinstance(source, (str, os.PathLike)):
    return os.fspath(source)
  for attr in ("data_dir",):  # tfds builder
    if hasattr(source, attr) and not callable(getattr(source, attr)):
      return os.fspath(getattr(source, attr))
  info = getattr(source, "dataset_info", None)  # tfds ArrayRecordDataSource
  if info is not None:
    return os.fspath(info.data_dir)
  raise TypeError(f"cannot find the dataset directory of {type(source)}")


def load_meta(source) -> DatasetMeta:
  """Loads the ``DatasetMeta`` saved beside a dataset.

  Args:
    source: the directory with ``meta.json`` / ``meta.npz`` (a TFDS builder's versioned data dir), a
      TFDS builder, or one of its data sources.
  """
  d = meta_dir(source)
  path_json, path_npz = os.path.join(d, META_JSON), os.path.join(d, META_NPZ)
  for p in (path_json, path_npz):
    if not os.path.exists(p):
      raise FileNotFoundError(f"dataset metadata not found: {p} (build the dataset first)")
  with open(path_json) as f:
    rest = json.load(f)
  with np.load(path_npz) as z:
    arrays = {k: z[k] for k in z.files}
  splits = {}
  for key, a in arrays.items():
    if key.startswith("split/"):
      _, split, col = key.split("/")
      splits.setdefault(split, {})[col] = a
  rest.pop("split_names", None)
  kwargs = {k: arrays[k] for k in _ARRAY_FIELDS}
  names = {f.name for f in dataclasses.fields(DatasetMeta)}
  kwargs.update({k: v for k, v in rest.items() if k in names})
  for k in ("image_size", "frontal_size", "image_frontal_size", "hmc_size", "hmc_views"):
    kwargs[k] = tuple(kwargs[k])
  kwargs["frames"] = [tuple(x) for x in kwargs["frames"]]
  kwargs["splits"] = splits
  return DatasetMeta(**kwargs)


# -----------------------------------------------------------------------------------------
# normalisation
def normalize_verts(verts, meta: DatasetMeta):
  """[..., V, 3] dataset units -> normalised."""
  return (np.asarray(verts, np.float32) - meta.vert_mean) / np.float32(meta.vert_std)


def denormalize_verts(verts, meta):
  """[..., V, 3] normalised -> dataset units (numpy or jax arrays; ``meta``: ``DatasetMeta`` or
  ``MeshMeta``)."""
  return verts * meta.vert_std + meta.vert_mean


def normalize_tex(tex, mask, meta: DatasetMeta):
  """[..., T, T, 3] 0..255 texture and [..., T, T, 1] {0,1} mask -> normalised, unobserved texels
  0."""
  t = (np.asarray(tex, np.float32) - meta.tex_mean) / np.float32(meta.tex_std)
  return np.where(np.asarray(mask) > 0, t, 0.0).astype(np.float32)


def denormalize_tex(tex, meta):
  """[..., T, T, 3] normalised -> colours in [0, 1] (clipped; numpy or jax arrays; ``meta``:
  ``DatasetMeta`` or ``MeshMeta``)."""
  x = (tex * meta.tex_std + meta.tex_mean) / 255.0
  return np.clip(x, 0.0, 1.0) if isinstance(x, np.ndarray) else jnp.clip(x, 0.0, 1.0)


@flax.struct.dataclass
class MeshMeta:
  """The dataset's mesh constants as a pytree of jax arrays: what train, fit and evaluate need to
  turn the model's normalised output into a textured mesh (``denormalize_verts`` /
  ``denormalize_tex`` accept it like a ``DatasetMeta``). Passed into jitted functions as an
  argument, not baked in as constants.

  Attributes:
    faces: [F, 3] int32 vertex indices.
    uvs: [U, 2] float32 texture coordinates (UV (0, 0) = bottom-left).
    uv_faces: [F, 3] int32 UV indices.
    keypoint_vertex_ids: [P] int32 vertices whose projections are the 2D keypoints.
    vert_mean: [V, 3] float32; vert_std: scalar or broadcastable float32 (verts = n * std + mean).
    tex_mean: [T, T, 3] float32 in 0..255; tex_std: scalar or broadcastable (tex = n * std + mean).
  """

  faces: Any
  uvs: Any
  uv_faces: Any
  keypoint_vertex_ids: Any
  vert_mean: Any
  vert_std: Any
  tex_mean: Any
  tex_std: Any

  @classmethod
  def from_dataset_meta(cls, meta: DatasetMeta) -> "MeshMeta":
    """The mesh constants of a ``DatasetMeta`` (or any object with those fields)."""
    f32 = lambda x: jnp.asarray(np.asarray(x, np.float32))
    i32 = lambda x: jnp.asarray(np.asarray(x, np.int32))
    return cls(
      faces=i32(meta.faces),
      uvs=f32(meta.uvs),
      uv_faces=i32(meta.uv_faces),
      keypoint_vertex_ids=i32(meta.keypoint_vertex_ids),
      vert_mean=f32(meta.vert_mean),
      vert_std=f32(meta.vert_std),
      tex_mean=f32(meta.tex_mean),
      tex_std=f32(meta.tex_std),
    )


def texture_mask(tex) -> np.ndarray:
  """[..., T, T, 1] uint8: texels that are not black (Multiface's rule for unobserved texels)."""
  return np.any(np.asarray(tex) > 0, axis=-1, keepdims=True).astype(np.uint8)


def normalize_example(example: Dict[str, Any], meta: DatasetMeta) -> Dict[str, np.ndarray]:
  """A stored example (or a batch of them) -> the batch form of the module docstring; strings
  dropped."""
  out = {}
  for k, v in example.items():
    if k in STRING_KEYS or isinstance(v, (str, bytes)):
      continue
    v = np.asarray(v)
    if v.dtype.kind in "SUO":
      continue
    if k == VERTS:
      out[k] = normalize_verts(v, meta)
    elif k == AVG_TEX:
      out[k] = normalize_tex(v, texture_mask(v), meta)
    elif k == TEX:
      mask = example.get(TEX_MASK)
      out[k] = normalize_tex(v, texture_mask(v) if mask is None else mask, meta)
    elif k in UNIT_IMAGE_KEYS:
      out[k] = v.astype(np.float32) / 255.0
    elif k in INT_KEYS:
      out[k] = v.astype(np.int32)
    else:
      out[k] = v.astype(np.float32)
  return out
