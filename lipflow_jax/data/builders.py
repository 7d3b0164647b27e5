"""TFDS builders (array_record, no TensorFlow needed): ``synthetic_capture`` and ``multiface``.

    builder = SyntheticCapture(data_dir=DIR, config="tiny")      # or "default"
    builder.download_and_prepare(file_format="array_record")
    sources = builder.as_data_source()                           # {'train': ..., 'test': ...}
    meta = schema.load_meta(builder.data_dir)

    builder = Multiface(data_dir=DIR, entity_dir=ENTITY,
    options=multiface.MultifaceOptions(texture_size=256))

Splits: ``train`` = training segments x all dome cameras, ``test`` = held-out segments x all dome
cameras. Held-out (novel-view) cameras are in every split; the input pipeline filters by camera
(``DatasetMeta`` lists ``train_cameras`` / ``test_cameras``). Records are stored in (frame, camera)
order (TFDS shuffling is off; grain shuffles), and ``DatasetMeta.splits`` maps record index ->
(frame, camera, segment) index. ``meta.json`` / ``meta.npz`` are written into the versioned data
directory beside the array_record files.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import logging
import os
from typing import Dict, List, Optional

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from lipflow_jax.data import capture as capture_lib
from lipflow_jax.data import multiface as mf
from lipflow_jax.data import multiface_format as fmt
from lipflow_jax.data import schema
from lipflow_jax.data import stats as stats_lib
from lipflow_jax.data import synthetic_head as sh

FILE_FORMAT = "array_record"
NUM_KEYPOINTS = len(sh._keypoint_targets()[0])  # pylint: disable=protected-access


def make_features(shapes) -> tfds.features.FeaturesDict:
  """TFDS features for ``schema.feature_shapes(...)``: uint8 images zlib-compressed, strings as
  Text."""
  feats = {}
  for key, (shape, dtype) in shapes.items():
    big_u8 = dtype == np.uint8 and int(np.prod(shape)) >= 256
    enc = tfds.features.Encoding.ZLIB if big_u8 else tfds.features.Encoding.NONE
    feats[key] = tfds.features.Tensor(shape=shape, dtype=dtype, encoding=enc)
  for key in schema.STRING_KEYS:
    feats[key] = tfds.features.Text()
  return tfds.features.FeaturesDict(feats)


def _split_index(keys: List[int], num_cameras: int, frame_segment) -> Dict[str, np.ndarray]:
  keys = np.sort(np.asarray(keys, np.int64))
  frame = (keys // num_cameras).astype(np.int32)
  return {
    "frame_index": frame,
    "camera_index": (keys % num_cameras).astype(np.int32),
    "segment_index": np.asarray(frame_segment, np.int32)[frame],
  }


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base: ``code_path`` without ``importlib_resources`` (TFDS looks for it when the builder
  lives in a package)."""

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))


# -----------------------------------------------------------------------------------------
# synthetic
@dataclasses.dataclass(eq=False)
class SyntheticCaptureConfig(tfds.core.BuilderConfig):
  """``capture``: the ``capture.CaptureConfig`` (sizes of everything)."""

  capture: capture_lib.CaptureConfig = dataclasses.field(default_factory=capture_lib.CaptureConfig)


class SyntheticCapture(_Builder):
  """A procedural person captured in a virtual dome (no download). Configs: ``tiny`` (tests),
  ``default``."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "A validation split (held-out segment); default: all 18 train segments and "
    "0.5 px keypoint noise.",
    "2.0.0": "default: 1,512 training frames (18 x 84) with 8 of the 36 training cameras stored "
    "per frame, 4 test segments x 24 frames, 24 validation frames.",
  }
  BUILDER_CONFIGS = [
    SyntheticCaptureConfig(
      name=name,
      capture=cfg,
      description=f"{cfg.num_frames} frames x {cfg.num_cameras} cameras, "
      f"V={cfg.grid[0] * cfg.grid[1]}, T={cfg.texture_size}, "
      f"images {cfg.image_size}",
    )
    for name, cfg in capture_lib.CONFIGS.items()
  ]
  DEFAULT_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config.capture
    shapes = schema.feature_shapes(
      c.grid[0] * c.grid[1],
      c.texture_size,
      c.image_size,
      NUM_KEYPOINTS,
      c.image_frontal_size,
      c.hmc_size,
      sh.NUM_FACTORS,
    )
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=make_features(shapes),
      disable_shuffling=True,
      homepage="https://github.com/facebookresearch/multiface",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    self._capture = capture_lib.get_capture(self.builder_config.capture)
    self._stats = stats_lib.NormStats()
    self._keys = {}
    self._overflow = 0
    splits = ("train", "test") + (
      ("validation",) if self.builder_config.capture.validation_segments else ()
    )
    return {s: self._generate_examples(split=s) for s in splits}

  def _generate_examples(self, split):
    cap = self._capture
    frames = [i for i in range(cap.num_frames) if cap.split_of(i) == split]
    names = cap.rig.names
    keys = self._keys.setdefault(split, [])
    # Render the next frame on a worker thread while this one is serialised (JAX releases the GIL).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      future = pool.submit(cap.render, frames[0]) if frames else None
      for n, i in enumerate(frames):
        fr = future.result()
        if n + 1 < len(frames):
          future = pool.submit(cap.render, frames[n + 1])
        self._overflow += fr["overflow"]
        if split == "train":
          tc = cap.train_cameras
          self._stats.add(fr["verts"], fr["avg_tex"], fr["tex"][tc], fr["tex_mask"][tc])
        for ex in capture_examples(cap, fr, i):
          key = i * len(names) + int(ex[schema.CAMERA_INDEX])
          keys.append(key)
          yield key, ex

  # pylint: disable=arguments-differ
  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    if self._overflow:
      logging.warning(
        "synthetic_capture: %d rasteriser tile overflows (faces dropped)", self._overflow
      )
    meta = synthetic_meta(
      self._capture, self._stats, self._keys, name=f"synthetic_capture/{self.builder_config.name}"
    )
    meta.extra["tile_overflows"] = int(self._overflow)
    schema.save_meta(meta, self.data_dir)


def capture_examples(cap: capture_lib.Capture, fr: dict, frame_index: int):
  """The stored examples (one per dome camera) of a rendered frame ``fr =
  cap.render(frame_index)``."""
  seg_index = int(cap.script.frame_segment[frame_index])
  per_frame = {
    schema.VERTS: fr["verts"],
    schema.AVG_TEX: fr["avg_tex"],
    schema.KEYPOINTS: fr["keypoints"],
    schema.KEYPOINTS_VISIBLE: fr["keypoints_visible"].astype(np.uint8),
    schema.KEYPOINTS_CLEAN: fr["keypoints_clean"],
    schema.FRONTAL_K: fr["frontal_K"],
    schema.FRONTAL_RT: fr["frontal_Rt"],
    schema.IMAGE_FRONTAL: fr["image_frontal"],
    schema.HMC: fr["hmc"],
    schema.HMC_MASK: fr["hmc_mask"],
    schema.HMC_K: fr["hmc_K"],
    schema.HMC_RT: fr["hmc_Rt"],
    schema.HEAD_POSE: fr["head_pose"],
    schema.FACTORS: fr["factors"],
    schema.FRAME_INDEX: np.int32(frame_index),
    schema.SEGMENT_INDEX: np.int32(seg_index),
    schema.SEGMENT: cap.script.segments[seg_index],
    schema.FRAME: cap.script.frame_names[frame_index],
  }
  for c in cap.stored_cameras(frame_index):
    name = cap.rig.names[c]
    ex = dict(per_frame)
    ex.update(
      {
        schema.TEX: fr["tex"][c],
        schema.TEX_MASK: fr["tex_mask"][c],
        schema.VIEW: fr["view"][c],
        schema.CAMERA_K: fr["camera_K"][c],
        schema.CAMERA_RT: fr["camera_Rt"][c],
        schema.CAMERA_INDEX: np.int32(c),
        schema.IMAGE: fr["image"][c],
        schema.IMAGE_MASK: fr["image_mask"][c],
        schema.CAMERA_ID: name,
      }
    )
    yield ex


def synthetic_meta(
  cap: capture_lib.Capture, norm: stats_lib.NormStats, keys: Dict[str, List[int]], name: str
) -> schema.DatasetMeta:
  """``DatasetMeta`` of a synthetic capture (statistics from ``norm``, split indices from
  ``keys``)."""
  head, rig, script, c = cap.head, cap.rig, cap.script, cap.config
  vm, vs, tm, ts = norm.result()
  return schema.DatasetMeta(
    name=name,
    uvs=head.uvs,
    faces=head.faces,
    uv_faces=head.faces,
    keypoint_vertex_ids=head.keypoint_vertex_ids,
    keypoint_names=list(head.keypoint_names),
    vert_mean=vm,
    vert_std=vs,
    tex_mean=tm,
    tex_std=ts,
    camera_names=list(rig.names),
    camera_K=rig.K,
    camera_Rt=rig.Rt,
    image_size=tuple(c.image_size),
    frontal_camera="frontal",
    frontal_K=rig.frontal_K,
    frontal_Rt=rig.frontal_Rt,
    frontal_size=tuple(c.frontal_size),
    image_frontal_size=tuple(c.image_frontal_size),
    hmc_K=rig.hmc_K,
    hmc_Rt=rig.hmc_Rt,
    hmc_size=tuple(c.hmc_size),
    segments=list(script.segments),
    frames=[(script.segments[s], n) for s, n in zip(script.frame_segment, script.frame_names)],
    train_segments=list(c.train_segments),
    test_segments=list(c.test_segments),
    train_cameras=[rig.names[i] for i in cap.train_cameras],
    test_cameras=[rig.names[i] for i in cap.test_cameras],
    factor_names=list(sh.FACTOR_NAMES),
    factor_keypoint_visible=list(sh.FACTOR_KEYPOINT_VISIBLE),
    factor_hmc_visible=list(sh.FACTOR_HMC_VISIBLE),
    has_factors=True,
    splits={s: _split_index(k, len(rig.names), script.frame_segment) for s, k in keys.items()},
    extra={
      "capture_config": dataclasses.asdict(c),
      "dome_gain": rig.gain.tolist(),
      "dome_bias": rig.bias.tolist(),
    },
  )


# -----------------------------------------------------------------------------------------
# multiface
@dataclasses.dataclass(eq=False)
class MultifaceConfig(tfds.core.BuilderConfig):
  """``entity_dir``: the Multiface entity directory (None: the TFDS manual dir); ``options``:
  sizes etc."""

  entity_dir: Optional[str] = None
  options: mf.MultifaceOptions = dataclasses.field(default_factory=mf.MultifaceOptions)


class Multiface(_Builder):
  """One Multiface entity directory in its published layout (see ``multiface`` module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download one Multiface entity (https://github.com/facebookresearch/multiface) and pass "
    "entity_dir=... (or place the entity directory's contents in the manual dir)."
  )
  BUILDER_CONFIGS = [MultifaceConfig(name="default", description="native sizes")]
  DEFAULT_CONFIG_NAME = "default"

  def __init__(
    self, *, entity_dir=None, options: Optional[mf.MultifaceOptions] = None, config=None, **kwargs
  ):
    """Either ``config`` (a ``MultifaceConfig`` or a config name) or ``entity_dir`` /
    ``options``."""
    if entity_dir is not None or options is not None:
      if config is not None and not isinstance(config, str):
        raise ValueError("Multiface: pass either a MultifaceConfig or entity_dir/options, not both")
      entity_dir = None if entity_dir is None else os.fspath(entity_dir)
      config = MultifaceConfig(
        name=config or "custom", entity_dir=entity_dir, options=options or mf.MultifaceOptions()
      )
    self._entity_cache = None
    super().__init__(config=config, **kwargs)

  def _entity_dir(self):
    d = self.builder_config.entity_dir
    if d is None:
      d = os.path.join(os.fspath(self._data_dir_root), "downloads", "manual")
    return d

  def entity(self) -> mf.MultifaceEntity:
    if self._entity_cache is None:
      self._entity_cache = mf.MultifaceEntity(self._entity_dir(), self.builder_config.options)
    return self._entity_cache

  def _info(self) -> tfds.core.DatasetInfo:
    d = self._entity_dir()
    if os.path.isdir(d):
      e = self.entity()
      shapes = schema.feature_shapes(
        e.num_verts,
        e.texture_size,
        e.image_size,
        len(e.keypoint_ids),
        e.options.image_frontal_size,
        e.options.hmc_size,
        e.options.num_factors,
      )
      features = make_features(shapes)
    elif os.path.exists(os.path.join(os.fspath(self.data_path), "features.json")):
      features = tfds.features.FeatureConnector.from_config(os.fspath(self.data_path))
    else:
      raise fmt.MultifaceMissingFileError(
        f"Multiface entity directory not found: {d} (pass entity_dir=... or build the dataset "
        "first)"
      )
    return tfds.core.DatasetInfo(
      builder=self,
      description=Multiface.__doc__,
      features=features,
      disable_shuffling=True,
      homepage="https://github.com/facebookresearch/multiface",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    e = self.entity()
    self._keys = {}
    train = [i for i, (s, _) in enumerate(e.frames) if s in e.train_segments]
    test = [i for i, (s, _) in enumerate(e.frames) if s in e.test_segments]
    gens = {}
    if train:
      gens["train"] = self._generate_examples(split="train", frames=train)
    if test:
      gens["test"] = self._generate_examples(split="test", frames=test)
    return gens

  def _generate_examples(self, split, frames):
    e = self.entity()
    keys = self._keys.setdefault(split, [])
    n = 0
    for i in frames:
      rng = np.random.RandomState((e.options.seed * 1000003 + i * 7919 + 17) % (2**31))
      for c, ex in e.frame_examples(i, rng):
        key = i * len(e.camera_names) + c
        keys.append(key)
        n += 1
        yield key, ex
    if n == 0:
      raise fmt.MultifaceFormatError(
        f"{e.root}: every example of split {split!r} was skipped as bad input ({e.skipped} skipped)"
      )

  # pylint: disable=arguments-differ
  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    e = self.entity()
    if e.skipped:
      logging.warning("multiface: skipped %d bad (frame, camera) examples or frames", e.skipped)
    hmc_K, hmc_Rt = e.nominal_hmc_cameras()
    frame_segment = [e.segments.index(s) for s, _ in e.frames]
    meta = schema.DatasetMeta(
      name=f"multiface/{self.builder_config.name}",
      uvs=e.mesh.uvs,
      faces=e.mesh.faces,
      uv_faces=e.mesh.uv_faces,
      keypoint_vertex_ids=e.keypoint_ids,
      keypoint_names=list(e.keypoint_names),
      vert_mean=e.vert_mean,
      vert_std=e.vert_std,
      tex_mean=e.tex_mean,
      tex_std=e.tex_std,
      camera_names=list(e.camera_names),
      camera_K=e.K,
      camera_Rt=e.world_Rt,
      image_size=tuple(e.image_size),
      frontal_camera=e.frontal_camera,
      frontal_K=e.K[e.frontal_index],
      frontal_Rt=e.world_Rt[e.frontal_index],
      frontal_size=tuple(e.image_size),
      image_frontal_size=tuple(e.options.image_frontal_size),
      hmc_K=hmc_K,
      hmc_Rt=hmc_Rt,
      hmc_size=tuple(e.options.hmc_size),
      segments=list(e.segments),
      frames=list(e.frames),
      train_segments=list(e.train_segments),
      test_segments=list(e.test_segments),
      train_cameras=list(e.train_cameras),
      test_cameras=list(e.test_cameras),
      factor_names=list(sh.FACTOR_NAMES[: e.options.num_factors])
      + [f"factor_{i}" for i in range(len(sh.FACTOR_NAMES), e.options.num_factors)],
      factor_keypoint_visible=[False] * e.options.num_factors,
      factor_hmc_visible=[False] * e.options.num_factors,
      has_factors=False,
      splits={
        s: _split_index(k, len(e.camera_names), frame_segment) for s, k in self._keys.items()
      },
      skipped=e.skipped,
      skipped_reasons=list(e.skipped_reasons),
      extra={
        "entity_dir": e.root,
        "hmc_cameras": list(e.hmc_cameras),
        "test_prefixes": list(e.test_prefixes),
        "native_image_size": list(e.native_size),
        "options": dataclasses.asdict(e.options),
      },
    )
    schema.save_meta(meta, self.data_dir)
