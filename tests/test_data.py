"""Tests of lipflow_jax.data: synthetic head, capture, synthetic_capture builder, grain pipeline."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from lipflow_jax import fit, geometry, render
from lipflow_jax.data import (
  capture,
  capture_script,
  contact_sheet,
  input_pipeline,
  schema,
  uv_raster,
)
from lipflow_jax.data import synthetic_head as sh


# -----------------------------------------------------------------------------------------------
# head model
@pytest.fixture(scope="module")
def head():
  return sh.make_head((22, 25))


def _deform(head, **factors):
  f = np.zeros(sh.NUM_FACTORS, np.float32)
  for k, v in factors.items():
    f[sh.FACTOR_NAMES.index(k)] = v
  return np.asarray(sh.deform(jnp.asarray(head.plane), jnp.asarray(f)))


def test_factors_visible_and_hidden():
  assert sh.NUM_FACTORS >= 10
  vis = [n for n, v in zip(sh.FACTOR_NAMES, sh.FACTOR_KEYPOINT_VISIBLE) if v]
  hidden = [n for n, v in zip(sh.FACTOR_NAMES, sh.FACTOR_KEYPOINT_VISIBLE) if not v]
  assert {
    "jaw_open",
    "lip_corner_l",
    "lip_corner_r",
    "pucker",
    "brow_raise_l",
    "brow_raise_r",
    "eyelid_close_l",
    "eyelid_close_r",
  } == set(vis)
  assert {"gaze_x", "gaze_y", "tongue", "cheek_puff", "wrinkles", "flush"} == set(hidden)


def test_mesh_topology(head):
  assert head.faces.dtype == np.int32 and head.faces.max() < len(head.plane)
  v = _deform(head)
  n = np.asarray(geometry.face_normals(jnp.asarray(v), jnp.asarray(head.faces)))
  centres = v[head.faces].mean(1)
  assert np.mean(np.sum(n * centres, -1) > 0) > 0.99  # counter-clockwise seen from outside
  assert np.all(np.isfinite(v))
  assert (
    len(set(head.keypoint_vertex_ids.tolist()))
    == len(head.keypoint_vertex_ids)
    == len(head.keypoint_names)
  )


def test_localised_effects(head):
  rest = _deform(head)
  groups = sh.keypoint_groups(head.keypoint_names)
  kp = head.keypoint_vertex_ids

  def moved(v, ids):
    return np.linalg.norm(v[ids] - rest[ids], axis=-1).max()

  jaw = _deform(head, jaw_open=1.0)
  assert moved(jaw, kp[groups["mouth"]]) > 5.0 and moved(jaw, kp[groups["brow_l"]]) < 1e-3
  brow = _deform(head, brow_raise_l=1.0)
  assert moved(brow, kp[groups["brow_l"]]) > 3.0 and moved(brow, kp[groups["mouth"]]) < 1e-2
  lid = _deform(head, eyelid_close_r=1.0)
  assert moved(lid, kp[groups["eye_r"]]) > 2.0 and moved(lid, kp[groups["eye_l"]]) < 1e-3
  # Hidden factors: texture only, or geometry away from the keypoints.
  for name in ("gaze_x", "gaze_y", "wrinkles", "flush"):
    np.testing.assert_array_equal(_deform(head, **{name: 1.0}), rest)
  puff = _deform(head, cheek_puff=1.0)
  # Cheek puff bulges the cheeks (along z) but hardly moves keypoints in the frontal image plane (x,
  # y).
  assert np.abs(puff - rest).max() > 5.0 and np.abs(puff[kp, :2] - rest[kp, :2]).max() < 1.0
  tp = sh.texel_plane(32)
  base = np.asarray(
    sh.albedo_texture(jnp.asarray(tp), jnp.zeros(sh.NUM_FACTORS), jnp.asarray(head.person))[0]
  )
  f = np.zeros(sh.NUM_FACTORS, np.float32)
  f[sh.FACTOR_NAMES.index("gaze_x")] = 1.0
  gaze = np.asarray(sh.albedo_texture(jnp.asarray(tp), jnp.asarray(f), jnp.asarray(head.person))[0])
  changed = np.abs(gaze - base).max(-1) > 0.02
  assert 0 < changed.mean() < 0.05  # only inside the eyes


def test_view_dependent_shading(head):
  v = jnp.asarray(_deform(head))
  n = geometry.vertex_normals(v, jnp.asarray(head.faces))
  rgb, ks, shin = sh.albedo(
    jnp.asarray(head.plane), jnp.zeros(sh.NUM_FACTORS), jnp.asarray(head.person)
  )
  a = sh.shade(rgb, ks, shin, v, n, jnp.array([0.0, 0.0, 600.0]))
  b = sh.shade(rgb, ks, shin, v, n, jnp.array([400.0, 0.0, 450.0]))
  assert float(jnp.abs(a - b).max()) > 0.05


def test_factor_correlations():
  s = capture_script.make_script(
    list(capture_script.SEGMENTS), capture_script.TEST_SEGMENTS, 12, 16, seed=0
  )
  f = {n: s.factors[:, i] for i, n in enumerate(sh.FACTOR_NAMES)}
  assert np.corrcoef(f["cheek_puff"], f["pucker"])[0, 1] > 0.4
  assert np.corrcoef(f["tongue"], f["jaw_open"])[0, 1] > 0.4
  assert np.corrcoef(f["cheek_puff"], f["pucker"])[0, 1] < 0.99  # plus an independent part
  # Smooth within segments: frame-to-frame steps are small compared with the range.
  seg = s.frame_segment
  same = seg[1:] == seg[:-1]
  span = np.array([sh.FACTOR_RANGES[n][1] - sh.FACTOR_RANGES[n][0] for n in sh.FACTOR_NAMES])
  assert (np.abs(np.diff(s.factors, axis=0))[same] / span).max() < 0.4
  assert np.abs(s.head_pose[:, :, 3]).max() < 20.0


def test_uv_raster_interpolates_uvs(head):
  m = uv_raster.rasterize_uv(head.uvs, head.faces, 32)
  assert (m.face_id >= 0).all()
  uv3 = np.concatenate([head.uvs, np.zeros((len(head.uvs), 1), np.float32)], 1)
  uvp = uv_raster.texel_points(m, head.faces, uv3)
  c = (np.arange(32) + 0.5) / 32
  np.testing.assert_allclose(uvp[..., 0], np.broadcast_to(c[None], (32, 32)), atol=1e-5)
  np.testing.assert_allclose(uvp[..., 1], np.broadcast_to(1.0 - c[:, None], (32, 32)), atol=1e-5)


# --------------------------------------------------------------------------------------------- the
# builder
def test_stored_schema(tiny_capture):
  meta = tiny_capture.meta
  shapes = schema.feature_shapes(
    meta.num_verts,
    meta.texture_size,
    meta.image_size,
    meta.num_keypoints,
    meta.image_frontal_size,
    meta.hmc_size,
    meta.num_factors,
  )
  src = tiny_capture.sources["train"]
  ex = src[0]
  assert set(ex) == set(shapes) | set(schema.STRING_KEYS)
  for k, (shape, dtype) in shapes.items():
    assert np.shape(ex[k]) == shape, k
    if shape:
      assert ex[k].dtype == dtype, k
  assert len(src) == len(meta.splits["train"]["frame_index"]) == 12 * 6
  assert len(tiny_capture.sources["test"]) == 4 * 6
  # Record order follows meta.splits.
  for r in (0, 5, 17, len(src) - 1):
    assert int(src[r]["frame_index"]) == meta.splits["train"]["frame_index"][r]
    assert int(src[r]["camera_index"]) == meta.splits["train"]["camera_index"][r]
  assert set(meta.train_cameras).isdisjoint(meta.test_cameras) and len(meta.test_cameras) == 2
  assert set(meta.test_segments) == {"EXP_ROM_01"}


def test_batch_contract(tiny_capture):
  meta = tiny_capture.meta
  b = tiny_capture.batch(batch_size=4)
  bsz, v, t, (h, w), p = 4, meta.num_verts, meta.texture_size, meta.image_size, meta.num_keypoints
  hh, hw = meta.hmc_size
  expected = {
    "verts": (bsz, v, 3),
    "avg_tex": (bsz, t, t, 3),
    "tex": (bsz, t, t, 3),
    "tex_mask": (bsz, t, t, 1),
    "view": (bsz, 3),
    "camera_K": (bsz, 3, 3),
    "camera_Rt": (bsz, 3, 4),
    "camera_index": (bsz,),
    "image": (bsz, h, w, 3),
    "image_mask": (bsz, h, w, 1),
    "keypoints": (bsz, p, 2),
    "keypoints_visible": (bsz, p),
    "frontal_K": (bsz, 3, 3),
    "frontal_Rt": (bsz, 3, 4),
    "hmc": (bsz, 3, hh, hw, 1),
    "hmc_mask": (bsz, 3, hh, hw, 1),
    "hmc_K": (bsz, 3, 3, 3),
    "hmc_Rt": (bsz, 3, 3, 4),
    "head_pose": (bsz, 3, 4),
    "factors": (bsz, meta.num_factors),
    "frame_index": (bsz,),
    "segment_index": (bsz,),
    "image_frontal": (bsz,) + tuple(meta.image_frontal_size) + (3,),
    "keypoints_clean": (bsz, p, 2),
  }
  assert set(b) == set(expected)
  for k, shape in expected.items():
    assert b[k].shape == shape, k
    assert b[k].dtype == (np.int32 if k in schema.INT_KEYS else np.float32), k
    assert np.all(np.isfinite(b[k])), k
  assert set(np.unique(b["tex_mask"])) <= {0.0, 1.0} and set(np.unique(b["keypoints_visible"])) <= {
    0.0,
    1.0,
  }
  assert np.all(b["tex"][np.broadcast_to(b["tex_mask"] == 0, b["tex"].shape)] == 0)
  assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0 and b["hmc"].max() <= 1.0
  np.testing.assert_allclose(np.linalg.norm(b["view"], axis=-1), 1.0, atol=1e-5)
  assert np.all(b["keypoints"][b["keypoints_visible"] == 0] == 0)
  assert set(b["camera_index"].tolist()) <= set(meta.camera_indices(meta.train_cameras))
  # Normalised verts round-trip to millimetres; camera_Rt maps head coordinates to this view.
  verts = schema.denormalize_verts(b["verts"], meta)
  assert np.abs(b["verts"]).mean() < 5.0 and 50.0 < np.abs(verts).max() < 200.0
  world = np.stack(
    [
      geometry.compose_rigid(meta.camera_Rt[c], hp)
      for c, hp in zip(b["camera_index"], b["head_pose"])
    ]
  )
  np.testing.assert_allclose(world, b["camera_Rt"], atol=1e-3)


def test_keypoints_fall_on_rendered_face(tiny_capture):
  meta = tiny_capture.meta
  src = tiny_capture.sources["train"]
  settings = render.RasterSettings.hard(
    tuple(meta.frontal_size), tile_size=4, max_faces_per_tile=128
  )
  fn = jax.jit(
    lambda v, K, Rt: render.render_mesh(
      v,
      meta.faces,
      meta.uvs,
      meta.uv_faces,
      jnp.ones((4, 4, 3)),
      geometry.Camera(K=K, Rt=Rt),
      settings,
    )
  )
  hits, total = 0, 0
  for r in range(0, len(src), 6 * 3):  # every third frame
    ex = src[r]
    out = fn(jnp.asarray(ex["verts"]), jnp.asarray(ex["frontal_K"]), jnp.asarray(ex["frontal_Rt"]))
    alpha = np.asarray(out.alpha[..., 0])
    vis = ex["keypoints_visible"] > 0
    for pts in (ex["keypoints_clean"][vis], ex["keypoints"][vis]):
      col = np.clip(np.floor(pts[:, 0]).astype(int), 0, alpha.shape[1] - 1)
      row = np.clip(np.floor(pts[:, 1]).astype(int), 0, alpha.shape[0] - 1)
      hits += int((alpha[row, col] > 0).sum())
      total += len(pts)
    # The clean keypoints are the projections of the keypoint vertices.
    proj = geometry.project(
      geometry.Camera(K=ex["frontal_K"], Rt=ex["frontal_Rt"]),
      jnp.asarray(ex["verts"][meta.keypoint_vertex_ids]),
    )
    np.testing.assert_allclose(np.asarray(proj), ex["keypoints_clean"], atol=1e-3)
    assert vis.mean() > 0.8
  assert hits >= 0.97 * total  # noisy ones may fall just off the silhouette


def _raycast_texture(verts, faces, uvs, uv_faces, texture, K, Rt, size):
  """Numpy reference renderer written from the documented conventions alone (float64): a ray
  through each pixel centre (x right, y down, origin at the top-left corner), the nearest
  front-facing triangle it hits (counter-clockwise seen from outside), its UV by barycentric
  interpolation in 3D, and a bilinear lookup with clamp-to-edge in which UV (0, 0) is the
  bottom-left of the texture image and texel (r, c) has its centre at ((c + .5) / T, 1 - (r + .5)
  / T). Returns rgb [H, W, 3], hit [H, W] bool and texels [H, W, 4, 2] (the rows and columns of
  the four texels each lookup reads)."""
  h, w = size
  cam = verts @ Rt[:, :3].T + Rt[:, 3]
  a, b, c = cam[faces[:, 0]], cam[faces[:, 1]], cam[faces[:, 2]]
  front = np.sum(np.cross(b - a, c - a) * -a, -1) > 0
  a, b, c = a[front], b[front], c[front]
  jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
  rays = np.stack([jj, ii, np.ones_like(jj)], -1).reshape(-1, 3) @ np.linalg.inv(K).T  # [N, 3]
  # Moller-Trumbore, every ray against every face.
  e1, e2 = b - a, c - a
  pvec = np.cross(rays[:, None], e2[None])  # [N, F, 3]
  det = np.sum(e1[None] * pvec, -1)
  safe = np.where(np.abs(det) > 1e-12, det, 1.0)
  tvec = -a[None]
  b1 = np.sum(tvec * pvec, -1) / safe
  qvec = np.cross(tvec, e1[None])
  b2 = np.sum(rays[:, None] * qvec, -1) / safe
  depth = np.sum(e2[None] * qvec, -1) / safe
  hit = (np.abs(det) > 1e-12) & (b1 >= 0) & (b2 >= 0) & (b1 + b2 <= 1) & (depth > 0)
  depth = np.where(hit, depth, np.inf)
  nearest = np.argmin(depth, -1)
  any_hit = np.isfinite(depth.min(-1))
  n = np.arange(len(rays))
  bary = np.stack([1 - b1[n, nearest] - b2[n, nearest], b1[n, nearest], b2[n, nearest]], -1)
  uv = np.sum(uvs[uv_faces[front][nearest]] * bary[..., None], 1)  # [N, 2]
  th, tw = texture.shape[:2]
  x, y = uv[:, 0] * tw - 0.5, (1.0 - uv[:, 1]) * th - 0.5
  x0, y0 = np.floor(x), np.floor(y)
  fx, fy = x - x0, y - y0
  cols = np.clip(np.stack([x0, x0 + 1], -1), 0, tw - 1).astype(int)
  rows = np.clip(np.stack([y0, y0 + 1], -1), 0, th - 1).astype(int)
  t = texture.astype(np.float64)
  rgb = (1 - fy)[:, None] * (
    (1 - fx)[:, None] * t[rows[:, 0], cols[:, 0]] + fx[:, None] * t[rows[:, 0], cols[:, 1]]
  ) + fy[:, None] * (
    (1 - fx)[:, None] * t[rows[:, 1], cols[:, 0]] + fx[:, None] * t[rows[:, 1], cols[:, 1]]
  )
  texels = np.stack(
    [np.stack([rows[:, r], cols[:, q]], -1) for r in (0, 1) for q in (0, 1)], 1
  )  # [N, 4, 2]
  rgb = np.where(any_hit[:, None], rgb, 0.0)
  return rgb.reshape(h, w, -1), any_hit.reshape(h, w), texels.reshape(h, w, 4, 2)


def test_image_is_the_texture_rendered(tiny_capture):
  """The stored photo is the stored (observed) texture seen through the stored camera, by a numpy
  ray caster written from the documented conventions (not by lipflow_jax.render, which made the
  photo): orientation of the texture, pixel origin, camera convention."""
  meta = tiny_capture.meta
  ex = tiny_capture.sources["train"][3]
  args = (
    np.asarray(ex["verts"], np.float64),
    np.asarray(meta.faces),
    np.asarray(meta.uvs, np.float64),
    np.asarray(meta.uv_faces),
  )
  cam = (np.asarray(ex["camera_K"], np.float64), np.asarray(ex["camera_Rt"], np.float64))
  tex = ex["tex"] / 255.0
  rgb, hit, texels = _raycast_texture(*args, tex, *cam, tuple(meta.image_size))
  stored = ex["image_mask"][..., 0] > 0
  assert hit.mean() > 0.2 and np.mean(hit == stored) > 0.98  # only silhouette pixels may differ
  # Pixels whose four texels were all observed (the photo was rendered from the unmasked texture).
  observed = ex["tex_mask"][..., 0][texels[..., 0], texels[..., 1]].all(-1)
  both = hit & stored & observed
  assert both.mean() > 0.15
  img = ex["image"] / 255.0
  err = np.abs(rgb - img)[both]
  assert np.median(err) < 1.5 / 255 and np.quantile(err, 0.95) < 0.03, (
    np.median(err),
    np.quantile(err, 0.95),
  )
  # Rows flipped (the convention Multiface's reference loader converts from) is far off.
  flipped, _, _ = _raycast_texture(*args, tex[::-1], *cam, tuple(meta.image_size))
  assert np.median(np.abs(flipped - img)[both]) > 10 * max(np.median(err), 1 / 255)


def test_meta_round_trip(tiny_capture, tmp_path):
  meta = tiny_capture.meta
  schema.save_meta(meta, tmp_path)
  again = schema.load_meta(tmp_path)
  for k in ("uvs", "faces", "vert_mean", "tex_mean", "camera_K", "hmc_Rt"):
    np.testing.assert_array_equal(getattr(again, k), getattr(meta, k))
  assert again.camera_names == meta.camera_names and again.frames == meta.frames
  np.testing.assert_array_equal(
    again.splits["test"]["camera_index"], meta.splits["test"]["camera_index"]
  )
  t = np.random.RandomState(0).randn(2, meta.texture_size, meta.texture_size, 3).astype(np.float32)
  d = schema.denormalize_tex(t, meta)
  assert d.min() >= 0.0 and d.max() <= 1.0
  v = np.random.RandomState(1).randn(meta.num_verts, 3).astype(np.float32)
  np.testing.assert_allclose(
    schema.normalize_verts(schema.denormalize_verts(v, meta), meta), v, atol=1e-4
  )
  assert meta.tex_mean.max() > 100 and meta.tex_std > 1 and meta.vert_std > 0.1


# -------------------------------------------------------------------------------------------- the
# pipeline
def _ids(batch):
  return list(zip(batch["frame_index"].tolist(), batch["camera_index"].tolist()))


@pytest.mark.parametrize("shards", [2, 3])
def test_shards_cover_the_data_exactly_once(tiny_capture, shards):
  meta = tiny_capture.meta
  seen = []
  for s in range(shards):
    it = tiny_capture.iterator(
      "train",
      batch_size=5,
      seed=7,
      num_epochs=1,
      shard_index=s,
      shard_count=shards,
      drop_remainder=False,
      cameras=meta.train_cameras,
    )
    seen += [x for b in it for x in _ids(b)]
  expected = input_pipeline.select_records(meta, "train", cameras=meta.train_cameras)
  cols = meta.splits["train"]
  want = sorted(
    zip(cols["frame_index"][expected].tolist(), cols["camera_index"][expected].tolist())
  )
  assert sorted(seen) == want and len(set(seen)) == len(seen)


def _train_records(meta):
  expected = input_pipeline.select_records(meta, "train", cameras=meta.train_cameras)
  cols = meta.splits["train"]
  return list(zip(cols["frame_index"][expected].tolist(), cols["camera_index"][expected].tolist()))


@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_shards_of_an_uneven_record_count_read_no_record_twice(
  tiny_capture, shards, drop_remainder
):
  """An epoch over a record count that no global batch divides: no record is yielded twice over the
  shards;
  with drop_remainder only the last N mod G records of the epoch's order are left out."""
  meta = tiny_capture.meta
  records = _train_records(meta)
  batch_size = 5
  global_batch = batch_size * shards
  assert len(records) % global_batch and len(records) > global_batch
  for epochs in (1, 2):
    seen = [[] for _ in range(epochs)]
    for s in range(shards):
      it = tiny_capture.iterator(
        "train",
        batch_size=batch_size,
        seed=7,
        num_epochs=epochs,
        shard_index=s,
        shard_count=shards,
        drop_remainder=drop_remainder,
        cameras=meta.train_cameras,
      )
      batches = [_ids(b) for b in it]
      per_epoch = len(batches) // epochs
      assert per_epoch * epochs == len(batches)
      for e in range(epochs):
        seen[e] += [x for b in batches[e * per_epoch : (e + 1) * per_epoch] for x in b]
    for e in range(epochs):
      assert len(set(seen[e])) == len(seen[e]), f"a record read twice in epoch {e}"
      assert set(seen[e]) <= set(records)
      kept = len(records) - len(records) % global_batch if drop_remainder else len(records)
      assert len(seen[e]) == kept


@pytest.mark.parametrize("shards", [2, 3])
def test_shards_concatenate_to_the_one_shard_batches(tiny_capture, shards):
  """Step k: the shards' batches of B, concatenated in shard order, are the one-shard batch of n * B
  (same seed), across epoch boundaries (the order is reshuffled every epoch, the same way for every
  shard count)."""
  meta = tiny_capture.meta
  batch_size, steps = 3, 12  # > 2 epochs of 48 training records
  one = tiny_capture.iterator(
    "train", batch_size=batch_size * shards, seed=5, cameras=meta.train_cameras
  )
  per_shard = [
    tiny_capture.iterator(
      "train",
      batch_size=batch_size,
      seed=5,
      shard_index=s,
      shard_count=shards,
      cameras=meta.train_cameras,
    )
    for s in range(shards)
  ]
  for _ in range(steps):
    want = next(one)
    got = [next(it) for it in per_shard]
    assert all(len(g["frame_index"]) == batch_size for g in got)
    for key in ("frame_index", "camera_index"):
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key], err_msg=key)


def test_shuffle_is_deterministic_and_epochs_differ(tiny_capture):
  a = [_ids(b) for b, _ in zip(tiny_capture.iterator("test", batch_size=8, seed=3), range(6))]
  b = [_ids(b) for b, _ in zip(tiny_capture.iterator("test", batch_size=8, seed=3), range(6))]
  c = [_ids(b) for b, _ in zip(tiny_capture.iterator("test", batch_size=8, seed=4), range(6))]
  assert a == b and a != c
  assert (
    sorted(sum(a[:3], [])) == sorted(sum(a[3:], [])) and a[:3] != a[3:]
  )  # 24 records = 3 batches/epoch


def test_restored_iterator_continues_with_the_same_batches(tiny_capture):
  it = tiny_capture.iterator("train", batch_size=4, seed=11)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  fresh = tiny_capture.iterator("train", batch_size=4, seed=11)
  fresh.set_state(state)
  for e in expected:
    got = next(fresh)
    assert set(got) == set(e)
    for k in e:
      np.testing.assert_array_equal(got[k], e[k])


def test_camera_filter_and_eval_frames(tiny_capture):
  meta = tiny_capture.meta
  it = tiny_capture.iterator("train", batch_size=6, seed=0, num_epochs=1, cameras=meta.test_cameras)
  cams = {c for b in it for c in b["camera_index"].tolist()}
  assert cams == set(meta.camera_indices(meta.test_cameras))
  ev = tiny_capture.eval_set("test")
  n, c = 4, meta.num_cameras
  assert ev["verts"].shape == (n, meta.num_verts, 3) and ev["image"].shape == (n, c) + tuple(
    meta.image_size
  ) + (3,)
  assert ev["camera_Rt"].shape == (n, c, 3, 4) and ev["keypoints"].shape == (
    n,
    meta.num_keypoints,
    2,
  )
  np.testing.assert_array_equal(ev["camera_index"], np.broadcast_to(np.arange(c), (n, c)))
  assert len(set(ev["frame_index"].tolist())) == n
  assert {meta.segments[s] for s in ev["segment_index"]} == set(meta.test_segments)


def test_contact_sheet(tiny_capture, tmp_path):
  path = contact_sheet.make_contact_sheet(
    tiny_capture.sources, tiny_capture.meta, tmp_path / "sheet.png"
  )
  with Image.open(path) as im:
    assert im.size[0] > 500 and im.size[1] > 500


def test_stored_cameras_rotate_over_the_training_cameras():
  cfg = dataclasses.replace(capture.CONFIGS["tiny"], train_views_per_frame=3)
  cap = capture.Capture(cfg)
  train = [i for i in range(cap.num_frames) if cap.split_of(i) == "train"]
  held_out = [i for i in range(cap.num_frames) if cap.split_of(i) != "train"]
  per_frame = [set(cap.stored_cameras(i)) for i in train]
  assert all(len(c) == 3 and c <= set(cap.train_cameras) for c in per_frame)
  assert set().union(*per_frame) == set(cap.train_cameras)  # consecutive frames cover the dome
  assert all(cap.stored_cameras(i) == list(range(cfg.num_cameras)) for i in held_out)
  assert capture.Capture(capture.CONFIGS["tiny"]).stored_cameras(train[0]) == list(range(6))


def test_test_camera_indices():
  """What 'evenly spread, never the first or the last' means, checked as properties for every dome
  of 3 to 60 cameras and every count that leaves a training camera: exactly ``num_test`` distinct
  sorted indices strictly inside the dome, each within one camera of the even spread
  (C - 1) k / (n + 1), k = 1..n."""
  for num_cameras in range(3, 61):
    for num_test in range(1, num_cameras - 1):
      held = capture.test_camera_indices(num_cameras, num_test)
      where = (num_cameras, num_test, held)
      assert len(held) == num_test and held == sorted(set(held)), where
      assert 0 < held[0] and held[-1] < num_cameras - 1, where
      even = (num_cameras - 1) * np.arange(1, num_test + 1) / (num_test + 1)
      assert np.all(np.abs(np.asarray(held) - even) <= 1.0), where
  # The capture configs in use keep their held-out cameras.
  assert capture.test_camera_indices(40, 4) == [8, 16, 23, 31]
  assert capture.test_camera_indices(6, 2) == [2, 3]


def test_test_camera_indices_bad_counts():
  assert capture.test_camera_indices(40, 0) == []
  with pytest.raises(ValueError, match="no training camera"):
    capture.test_camera_indices(3, 2)


def _holes(mask):
  """Background pixels whose 4 neighbours are all foreground (cracks of a broken rasteriser)."""
  a = mask[..., 0] > 0
  inner = a[:-2, 1:-1] & a[2:, 1:-1] & a[1:-1, :-2] & a[1:-1, 2:]
  return int((inner & ~a[1:-1, 1:-1]).sum())


def test_ground_truth_renders_have_no_cracks(tiny_capture):
  for split in ("train", "test"):
    src = tiny_capture.sources[split]
    for r in range(0, len(src), 5):
      ex = src[r]
      assert _holes(ex["image_mask"]) == 0
      assert all(_holes(m) == 0 for m in ex["hmc_mask"])
      assert ex["hmc_mask"].mean() > 0.3


class _GroundTruthDecoder(nn.Module):
  """Stands in for a trained decoder: ignores z and returns one frame's ground-truth mesh, and the
  texture shaded for the camera nearest to the view direction it is asked for (the capture's
  appearance is view-dependent). verts: [V, 3], textures: [C, T, T, 3] (both normalised); views:
  [C, 3]."""

  verts: np.ndarray
  textures: np.ndarray
  views: np.ndarray

  def decode(self, z, view):
    nearest = jnp.argmax(jnp.asarray(self.views) @ view[0])
    return jnp.asarray(self.textures)[nearest][None], jnp.asarray(self.verts)[None]


def test_stored_keypoints_and_headset_crops_are_the_fitting_objectives_renders(tiny_capture):
  """The fitting objectives' own projection (``fit.project_keypoints``) and rendering
  (``fit.render_hmc``), given a frame's ground-truth mesh and texture, reproduce the stored
  keypoints and headset crops: the data and the objectives agree on every convention between them
  (vertex ids, cameras, pixel origin, texture orientation, grey conversion)."""
  meta = tiny_capture.meta
  cap = capture.get_capture(capture.CONFIGS["tiny"])
  ex = tiny_capture.sources["train"][3 * meta.num_cameras + 1]
  frame = int(ex["frame_index"])
  # The frame's texture as the capture shades it for each headset camera (no gain or bias).
  hmc_cams = [geometry.Camera(K=k, Rt=rt) for k, rt in zip(ex["hmc_K"], ex["hmc_Rt"])]

  @jax.jit
  def shaded(factors, verts, eyes):
    rgb_a, ks, shin = sh.albedo_texture(
      jnp.asarray(sh.texel_plane(meta.texture_size, 2)), factors, jnp.asarray(cap.head.person)
    )
    normals = geometry.vertex_normals(verts, jnp.asarray(cap.head.faces))
    pts = uv_raster.texel_points(cap.texel_map, cap.head.faces, verts)
    nrm = uv_raster.texel_points(cap.texel_map, cap.head.faces, normals)
    nrm = nrm / jnp.linalg.norm(nrm, axis=-1, keepdims=True).clip(1e-8)
    shade = lambda eye: jnp.clip(sh.shade(rgb_a, ks, shin, pts, nrm, eye), 2 / 255, 1)
    return jax.vmap(shade)(eyes)

  eyes = jnp.stack([geometry.camera_center(c) for c in hmc_cams])
  textures = np.asarray(
    shaded(jnp.asarray(cap.script.factors[frame]), jnp.asarray(ex["verts"]), eyes)
  )
  mesh = schema.MeshMeta.from_dataset_meta(meta)
  model = _GroundTruthDecoder(
    verts=(ex["verts"] - meta.vert_mean) / meta.vert_std,
    textures=(255.0 * textures - meta.tex_mean) / meta.tex_std,
    views=np.stack([np.asarray(geometry.view_direction(c)) for c in hmc_cams]),
  )
  bundle = fit.ModelBundle(
    model=model,
    variables={},
    meta=mesh,
    hmc_settings=capture.raster_settings(meta.hmc_size),
    latent_dim=1,
  )
  z = jnp.zeros((1,))

  # Keypoints: the exact projections, and the noisy detections within 5 sigma of them.
  frontal = geometry.Camera(K=ex["frontal_K"], Rt=ex["frontal_Rt"])
  projected = np.asarray(jax.jit(fit.project_keypoints)(bundle, z, frontal))
  np.testing.assert_allclose(projected, ex["keypoints_clean"], atol=1e-3)
  vis = ex["keypoints_visible"] > 0
  noise = np.abs(projected[vis] - ex["keypoints"][vis])
  assert vis.mean() > 0.8 and noise.max() < 5 * cap.config.keypoint_noise_px

  # Headset crops: the same coverage, and the same grey values up to the sensor noise.
  grey, alpha = jax.jit(fit.render_hmc)(bundle, z, ex["hmc_K"], ex["hmc_Rt"])
  mask = ex["hmc_mask"] > 0
  assert mask.mean() > 0.3
  np.testing.assert_array_equal(np.asarray(alpha) > 0, mask)
  err = (np.asarray(grey) - ex["hmc"] / 255.0)[mask]
  noise = cap.config.hmc_noise
  assert abs(err.mean()) < 0.1 * noise and abs(err.std() - noise) < 0.15 * noise, (
    err.mean(),
    err.std(),
  )
