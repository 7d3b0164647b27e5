"""Tests of the Multiface layout: an entity written by hand from the published layout facts ->
multiface builder; synthetic -> exporter -> builder round trip; bad input."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from lipflow_jax import render
from lipflow_jax.data import builders, capture, input_pipeline, multiface_export, schema
from lipflow_jax.data import multiface as mf
from lipflow_jax.data import multiface_format as fmt
from lipflow_jax.geometry import KRTFormatError


@pytest.fixture(scope="module")
def exported(tiny_capture, tmp_path_factory):
  """The tiny synthetic capture exported as a Multiface entity: (directory, exporter's result)."""
  root = str(tmp_path_factory.mktemp("entity") / "m--synthetic--GHS")
  result = multiface_export.export_multiface(capture.get_capture(capture.CONFIGS["tiny"]), root)
  return root, result


@pytest.fixture(scope="module")
def entity(exported):
  return exported[0]


@pytest.fixture(scope="module")
def roundtrip(entity, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("mf"))
  b = builders.Multiface(data_dir=root, entity_dir=entity, config="roundtrip")
  b.download_and_prepare(file_format=builders.FILE_FORMAT)
  # Reopened from disk alone (no entity directory, no builder code), as training does.
  sources, meta = input_pipeline.load_dataset(root, "multiface", "roundtrip")
  built = b.as_data_source()
  assert {k: len(v) for k, v in sources.items()} == {k: len(v) for k, v in built.items()}
  return sources, meta


def test_layout_files(entity, tiny_capture):
  meta = tiny_capture.meta
  seg, frame = meta.frames[0]
  for rel in (
    "KRT",
    "frame_list.txt",
    "tex_mean.png",
    "tex_var.txt",
    "vert_mean.bin",
    "vert_var.txt",
    f"tracked_mesh/{seg}/{frame}.bin",
    f"tracked_mesh/{seg}/{frame}.obj",
    f"tracked_mesh/{seg}/{frame}_transform.txt",
    f"unwrapped_uv_1024/{seg}/average/{frame}.png",
    f"unwrapped_uv_1024/{seg}/{meta.camera_names[0]}/{frame}.png",
    f"images/{seg}/{meta.camera_names[0]}/{frame}.png",
    "test_segment.json",
    "camera-split-config.json",
  ):
    assert os.path.exists(os.path.join(entity, rel)), rel
  with open(os.path.join(entity, "frame_list.txt")) as f:
    text = f.read()
  assert not text.endswith("\n") and text.split("\n")[0] == f"{seg} {frame}" and len(frame) == 6
  assert fmt.read_test_segments(os.path.join(entity, "test_segment.json")) == ("EXP_ROM",)


def test_export_counts_what_it_wrote(exported, tiny_capture):
  root, result = exported
  listed = fmt.read_frame_list(os.path.join(root, "frame_list.txt"))
  validation = set(tiny_capture.meta.extra["capture_config"]["validation_segments"])
  left = [f for f in tiny_capture.meta.frames if f[0] in validation]
  assert result["frames"] == listed and left
  assert result["left_out"] == {"validation": left}
  assert len(listed) + len(left) == len(tiny_capture.meta.frames)
  text = multiface_export.describe_export(result)
  assert text.startswith(f"{len(listed)} frames ({len(left)} validation frames left out"), text


def test_roundtrip_same_meshes_cameras_textures(roundtrip, tiny_capture):
  src, meta = roundtrip
  ref, rmeta = tiny_capture.sources, tiny_capture.meta
  np.testing.assert_array_equal(meta.faces, rmeta.faces)
  np.testing.assert_array_equal(meta.uv_faces, rmeta.uv_faces)
  np.testing.assert_allclose(meta.uvs, rmeta.uvs, atol=1e-6)
  np.testing.assert_array_equal(meta.vert_mean, rmeta.vert_mean)
  np.testing.assert_allclose(meta.vert_std, rmeta.vert_std, rtol=1e-6)
  np.testing.assert_allclose(meta.tex_mean, rmeta.tex_mean, atol=0.5 + 1e-4)  # PNG rounding
  np.testing.assert_allclose(meta.tex_std, rmeta.tex_std, rtol=1e-6)
  np.testing.assert_allclose(meta.camera_K, rmeta.camera_K, rtol=1e-6)
  np.testing.assert_allclose(meta.camera_Rt, rmeta.camera_Rt, atol=1e-4)
  # The Multiface layout has no validation split: the exporter leaves the validation frames out.
  validation = set(rmeta.extra["capture_config"]["validation_segments"])
  assert validation and meta.camera_names == rmeta.camera_names
  assert meta.frames == [f for f in rmeta.frames if f[0] not in validation]
  assert meta.train_segments == rmeta.train_segments and meta.test_segments == rmeta.test_segments
  assert meta.train_cameras == rmeta.train_cameras and meta.test_cameras == rmeta.test_cameras
  np.testing.assert_array_equal(meta.keypoint_vertex_ids, rmeta.keypoint_vertex_ids)
  assert meta.skipped == 0 and not meta.has_factors
  for split in ("train", "test"):
    assert len(src[split]) == len(ref[split])
    for k in ("frame_index", "camera_index", "segment_index"):
      np.testing.assert_array_equal(meta.splits[split][k], rmeta.splits[split][k])
    for r in range(0, len(src[split]), 5):
      a, b = src[split][r], ref[split][r]
      for k in ("verts", "tex", "tex_mask", "avg_tex", "image", "frame_index", "camera_index"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
      for k in ("camera_K", "camera_Rt", "view", "head_pose"):
        np.testing.assert_allclose(a[k], b[k], atol=1e-4, err_msg=k)
      assert a["camera_id"] == b["camera_id"] and a["segment"] == b["segment"]
      np.testing.assert_array_equal(a["factors"], 0.0)


def test_multiface_keypoints_and_hmc(roundtrip):
  src, meta = roundtrip
  ex = src["train"][3]
  assert meta.frontal_camera in meta.camera_names
  assert tuple(meta.frontal_size) == tuple(meta.image_size)
  vis = ex["keypoints_visible"] > 0
  assert vis.mean() > 0.7
  h, w = meta.frontal_size
  kp = ex["keypoints_clean"][vis]
  assert np.all((kp >= 0) & (kp <= [w, h]))
  assert ex["hmc"].shape == (3,) + tuple(meta.hmc_size) + (1,)
  assert ex["hmc_mask"].mean() > 0.3 and ex["hmc"].std() > 5  # crops show the face
  batch = schema.normalize_example(ex, meta)
  assert batch["verts"].dtype == np.float32 and np.abs(batch["verts"]).max() < 50


# ---------------------------------------------------------------- an entity written from the facts
# Written by this file from DESIGN section 4 alone (no exporter, no writer of the library): KRT is
# world -> camera (mm), ``<frame>_transform.txt`` head -> world (x_world = R x_head + t), ``.bin``
# vertices in head coordinates, texture PNGs with the top row at v = 1 (the reference loader flips
# the rows so that row 0 is v = 0).
HAND_T = 16  # texture size
HAND_SIZE = (48, 40)  # photos: H x W (not square: a swapped axis shows)
HAND_FRAMES = [("E001_neutral", "000100"), ("E001_neutral", "000104"), ("EXP_ROM", "000230")]
HAND_CAMERAS = ("400011", "400012", "400013")
HAND_KEYPOINTS = (0, 7, 14, 21, 28, 35)


def _rot(axis, degrees):
  a = np.deg2rad(degrees)
  c, s = np.cos(a), np.sin(a)
  i, j = [(1, 2), (2, 0), (0, 1)][axis]
  r = np.eye(3)
  r[i, i] = r[j, j] = c
  r[i, j], r[j, i] = -s, s
  return r


def _hand_texture_value(u, v, scale=1.0):
  """The colour of texture coordinate (u, v) (any arrays): red follows u, green follows v."""
  return np.stack([20 + 220 * u, 20 + 220 * v, np.full_like(u, 128.0)], -1) * scale


def _hand_scene():
  """A 6 x 6 vertex patch of a sphere (mm, head coordinates, facing +z), per-vertex UVs, three
  head poses and three cameras around +z (world -> camera)."""
  yy, xx = np.meshgrid(np.linspace(-1, 1, 6), np.linspace(-1, 1, 6), indexing="ij")
  head = np.stack([60 * xx, -60 * yy, 40 * np.cos(0.6 * xx) * np.cos(0.6 * yy)], -1).reshape(-1, 3)
  uvs = np.stack([(xx.ravel() + 1) / 2, (1 - yy.ravel()) / 2], -1)
  faces = []
  for r in range(5):
    for c in range(5):
      a, b, d, e = 6 * r + c, 6 * r + c + 1, 6 * (r + 1) + c, 6 * (r + 1) + c + 1
      faces += [[a, d, b], [b, d, e]]  # counter-clockwise seen from +z (outside)
  poses = [
    (_rot(1, 8.0) @ _rot(0, -5.0), np.array([5.0, -3.0, 20.0])),
    (_rot(1, -6.0), np.array([-4.0, 2.0, 10.0])),
    (_rot(2, 4.0), np.array([0.0, 6.0, 0.0])),
  ]
  cams = {}
  for name, azimuth in zip(HAND_CAMERAS, (-20.0, 0.0, 25.0)):
    # Camera axes (x right, y down, z forward) at 700 mm from the origin, looking at it.
    R = np.diag([1.0, -1.0, -1.0]) @ _rot(1, -azimuth)  # world -> camera rotation
    centre = _rot(1, azimuth) @ np.array([0.0, 0.0, 700.0])
    K = np.array(
      [[300.0, 0, HAND_SIZE[1] / 2 + 1.5], [0, 310.0, HAND_SIZE[0] / 2 - 2.0], [0, 0, 1]]
    )
    cams[name] = (K, np.concatenate([R, (-R @ centre)[:, None]], 1))
  return head, uvs, np.asarray(faces), poses, cams


@pytest.fixture(scope="module")
def hand_entity(tmp_path_factory):
  """(entity directory, ground truth) of the hand-written entity."""
  root = str(tmp_path_factory.mktemp("hand") / "m--hand--GHS")
  head, uvs, faces, poses, cams = _hand_scene()
  os.makedirs(root)
  with open(os.path.join(root, "KRT"), "w") as f:
    for name, (K, Rt) in cams.items():
      rows = [name] + [" ".join(f"{x:.10g}" for x in row) for row in K]
      rows += ["0 0 0 0 0"] + [" ".join(f"{x:.10g}" for x in row) for row in Rt] + [""]
      f.write("\n".join(rows) + "\n")
  with open(os.path.join(root, "frame_list.txt"), "w") as f:
    f.write("\n".join(f"{s} {n}" for s, n in HAND_FRAMES))  # no final newline
  with open(os.path.join(root, "test_segment.json"), "w") as f:
    json.dump({"segment": ["EXP_ROM"]}, f)
  with open(os.path.join(root, "camera-split-config.json"), "w") as f:
    json.dump(
      {"full": {"train": list(HAND_CAMERAS[:2]), "test": [HAND_CAMERAS[2]], "visual": []}}, f
    )
  # Textures: the top row of the file is v = 1; black texels are unobserved.
  rows, cols = np.mgrid[0:HAND_T, 0:HAND_T]
  u, v = (cols + 0.5) / HAND_T, 1.0 - (rows + 0.5) / HAND_T

  def png(path, a):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).save(path)

  png(os.path.join(root, "tex_mean.png"), _hand_texture_value(u, v, 0.5))
  with open(os.path.join(root, "tex_var.txt"), "w") as f:
    f.write("2500.0\n")
  mean = head.astype("<f4")
  mean.tofile(os.path.join(root, "vert_mean.bin"))
  with open(os.path.join(root, "vert_var.txt"), "w") as f:
    f.write("400.0\n")
  truth = dict(
    head=[], poses=poses, cams=cams, uvs=uvs, faces=faces, unobserved=(slice(0, 3), slice(0, 4))
  )
  for i, ((seg, frame), (R, t)) in enumerate(zip(HAND_FRAMES, poses)):
    verts = (head + np.array([0.0, 0.0, 3.0 * i]) * (head[:, :1] > 0)).astype("<f4")
    truth["head"].append(verts)
    mesh_dir = os.path.join(root, "tracked_mesh", seg)
    os.makedirs(mesh_dir, exist_ok=True)
    verts.tofile(os.path.join(mesh_dir, f"{frame}.bin"))
    with open(os.path.join(mesh_dir, f"{frame}.obj"), "w") as f:
      f.write("".join(f"v {x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in verts))
      f.write("".join(f"vt {a:.6f} {b:.6f}\n" for a, b in uvs))
      f.write("".join(f"f {a + 1}/{a + 1} {b + 1}/{b + 1} {c + 1}/{c + 1}\n" for a, b, c in faces))
    np.savetxt(os.path.join(mesh_dir, f"{frame}_transform.txt"), np.concatenate([R, t[:, None]], 1))
    for c, cam in enumerate(HAND_CAMERAS + ("average",)):
      tex = _hand_texture_value(u, v, 1.0 - 0.1 * c)
      tex[truth["unobserved"]] = 0
      png(os.path.join(root, "unwrapped_uv_1024", seg, cam, f"{frame}.png"), tex)
    for c, cam in enumerate(HAND_CAMERAS):
      photo = np.zeros(HAND_SIZE + (3,))
      photo[..., 0] = np.arange(HAND_SIZE[1])[None] * 5 + 10 * i
      photo[..., 1] = np.arange(HAND_SIZE[0])[:, None] * 4 + 30 * c
      png(os.path.join(root, "images", seg, cam, f"{frame}.png"), photo)
  return root, truth


@pytest.fixture(scope="module")
def hand_built(hand_entity, tmp_path_factory):
  root, _ = hand_entity
  b = builders.Multiface(
    data_dir=str(tmp_path_factory.mktemp("hand_data")),
    entity_dir=root,
    config="hand",
    options=mf.MultifaceOptions(
      frontal_camera=HAND_CAMERAS[1], keypoint_vertex_ids=HAND_KEYPOINTS, hmc_size=(8, 8)
    ),
  )
  b.download_and_prepare(file_format=builders.FILE_FORMAT)
  return b.as_data_source(), schema.load_meta(b.data_dir)


def test_hand_written_entity_conventions(hand_entity, hand_built):
  """What the builder stores, against values computed here from the published layout facts."""
  root, truth = hand_entity
  src, meta = hand_built
  assert meta.camera_names == list(HAND_CAMERAS) and meta.test_cameras == [HAND_CAMERAS[2]]
  assert meta.test_segments == ["EXP_ROM"] and meta.train_segments == ["E001_neutral"]
  assert {k: len(v) for k, v in src.items()} == {"train": 2 * 3, "test": 3}
  np.testing.assert_allclose(meta.vert_std, 20.0, rtol=1e-6)  # sqrt(vert_var)
  np.testing.assert_allclose(meta.tex_std, 50.0, rtol=1e-6)  # sqrt(tex_var)
  assert tuple(meta.image_size) == HAND_SIZE
  for split in ("train", "test"):
    for r in range(len(src[split])):
      ex = src[split][r]
      i, c = int(ex["frame_index"]), int(ex["camera_index"])  # frame list and KRT order
      ids = tuple(ex[k].decode() for k in ("segment", "frame", "camera_id"))
      assert ids == HAND_FRAMES[i] + (HAND_CAMERAS[c],)
      head, (Rp, tp) = truth["head"][i], truth["poses"][i]
      K, Rt = truth["cams"][HAND_CAMERAS[c]]
      np.testing.assert_array_equal(ex["verts"], head)
      np.testing.assert_allclose(ex["head_pose"], np.concatenate([Rp, tp[:, None]], 1), atol=1e-6)
      # camera_Rt takes head coordinates into this camera: head -> world (pose), world -> camera.
      world = head @ Rp.T + tp
      in_cam = world @ Rt[:, :3].T + Rt[:, 3]
      np.testing.assert_allclose(
        head @ ex["camera_Rt"][:, :3].T + ex["camera_Rt"][:, 3], in_cam, atol=1e-3
      )
      np.testing.assert_allclose(ex["camera_K"], K, rtol=1e-6)
      # The view direction: normalize(R_pose^T (camera centre - t_pose)).
      centre = -Rt[:, :3].T @ Rt[:, 3]
      view = Rp.T @ (centre - tp)
      np.testing.assert_allclose(ex["view"], view / np.linalg.norm(view), atol=1e-5)
      # Keypoints: the keypoint vertices seen by the frontal camera, in pixels.
      fK, fRt = truth["cams"][HAND_CAMERAS[1]]
      p = (world[list(HAND_KEYPOINTS)] @ fRt[:, :3].T + fRt[:, 3]) @ fK.T
      np.testing.assert_allclose(ex["keypoints_clean"], p[:, :2] / p[:, 2:], atol=1e-3)
      # Textures: stored as the renderer samples them (UV (0, 0) at the bottom-left): the texel at
      # (u, v) has the colour written for (u, v).
      rows, cols = np.mgrid[0:HAND_T, 0:HAND_T]
      uv = np.stack([(cols + 0.5) / HAND_T, 1.0 - (rows + 0.5) / HAND_T], -1)
      want = np.round(_hand_texture_value(uv[..., 0], uv[..., 1], 1.0 - 0.1 * c))
      got = np.asarray(render.sample_texture(jnp.asarray(ex["tex"], jnp.float32), jnp.asarray(uv)))
      observed = np.ones((HAND_T, HAND_T), bool)
      observed[truth["unobserved"]] = False
      np.testing.assert_allclose(got[observed], want[observed], atol=1e-3)
      np.testing.assert_array_equal(ex["tex_mask"][..., 0], observed)
      avg = np.round(_hand_texture_value(uv[..., 0], uv[..., 1], 1.0 - 0.1 * 3))
      np.testing.assert_array_equal(ex["avg_tex"][observed], avg[observed])
      # Normalisation as the reference loader does it.
      batch = schema.normalize_example(ex, meta)
      np.testing.assert_allclose(batch["verts"], (head - head_mean(root)) / 20.0, atol=1e-5)
      tex_mean = np.round(_hand_texture_value(uv[..., 0], uv[..., 1], 0.5))
      np.testing.assert_allclose(
        batch["tex"][observed], ((want - tex_mean) / 50.0)[observed], atol=1e-5
      )
      assert np.all(batch["tex"][~observed] == 0)


def head_mean(root):
  return np.fromfile(os.path.join(root, "vert_mean.bin"), "<f4").reshape(-1, 3)


# ------------------------------------------------------------------------------------- bad input
def _copy(entity, tmp_path, frames=3):
  """A copy of the entity with a short frame list (2 training frames and 1 test frame)."""
  root = str(tmp_path / "entity")
  shutil.copytree(entity, root)
  lines = fmt.read_frame_list(os.path.join(root, "frame_list.txt"))
  train = [e for e in lines if not e[0].startswith("EXP")][: frames - 1]
  test = [e for e in lines if e[0].startswith("EXP")][:1]
  with open(os.path.join(root, "frame_list.txt"), "w") as f:
    f.write("\n".join(f"{s} {n}" for s, n in train + test))
  return root, train[0]


def _build(root, tmp_path, skip=False):
  b = builders.Multiface(
    data_dir=str(tmp_path / "data"),
    entity_dir=root,
    config="bad",
    options=mf.MultifaceOptions(skip_bad_frames=skip),
  )
  b.download_and_prepare(file_format=builders.FILE_FORMAT)
  return b, schema.load_meta(b.data_dir)


def _break_missing_png(root, seg, frame, cam):
  path = fmt.image_path(root, seg, cam, frame)
  os.remove(path)
  return path, fmt.MultifaceMissingFileError, "photo not found"


def _break_unreadable_png(root, seg, frame, cam):
  path = fmt.tex_path(root, seg, cam, frame)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n this is not a png")
  return path, fmt.MultifaceFormatError, "unreadable texture PNG"


def _break_bin(root, seg, frame, cam):
  del cam
  path = fmt.mesh_path(root, seg, frame)
  v = np.fromfile(path, "<f4")
  v[:-3].tofile(path)  # one vertex short
  return path, fmt.MultifaceFormatError, r"has \d+ vertices, expected \d+"


@pytest.mark.parametrize(
  "breaker,examples_lost", [(_break_missing_png, 1), (_break_unreadable_png, 1), (_break_bin, 6)]
)
def test_bad_frame_files_raise_or_are_skipped(entity, tmp_path, breaker, examples_lost):
  root, (seg, frame) = _copy(entity, tmp_path)
  path, err, pattern = breaker(root, seg, frame, "400001")
  with pytest.raises(err, match=pattern) as info:
    _build(root, tmp_path / "strict")
  assert path in str(info.value)
  b, meta = _build(root, tmp_path / "skip", skip=True)
  assert meta.skipped == 1 and path in meta.skipped_reasons[0]
  n = {k: len(v) for k, v in b.as_data_source().items()}
  assert n == {"train": 2 * 6 - examples_lost, "test": 6}
  assert len(meta.splits["train"]["frame_index"]) == n["train"]


def test_krt_with_a_missing_line(entity, tmp_path):
  root, _ = _copy(entity, tmp_path)
  path = os.path.join(root, "KRT")
  with open(path) as f:
    lines = f.read().split("\n")
  del lines[12]  # a line of the second camera's K
  with open(path, "w") as f:
    f.write("\n".join(lines))
  for skip in (False, True):  # global files are never skipped
    with pytest.raises(KRTFormatError, match="expected 7") as info:
      _build(root, tmp_path / f"k{skip}", skip=skip)
    assert path in str(info.value)


def test_empty_frame_list(entity, tmp_path):
  root, _ = _copy(entity, tmp_path)
  path = os.path.join(root, "frame_list.txt")
  with open(path, "w") as f:
    f.write("\n")
  with pytest.raises(fmt.MultifaceFormatError, match="empty frame list") as info:
    _build(root, tmp_path, skip=True)
  assert path in str(info.value)


def test_readers_name_the_file(tmp_path):
  p = str(tmp_path / "frame_list.txt")
  with open(p, "w") as f:
    f.write("E001 000102\nE001\n")
  with pytest.raises(fmt.MultifaceFormatError, match=r"frame_list.txt:2: expected 'segment frame'"):
    fmt.read_frame_list(p)
  with pytest.raises(fmt.MultifaceMissingFileError, match="mesh not found: .*nope.bin"):
    fmt.read_mesh_bin(str(tmp_path / "nope.bin"), 10)
  q = str(tmp_path / "t.txt")
  np.savetxt(q, np.eye(3))
  with pytest.raises(fmt.MultifaceFormatError, match="t.txt: head pose must be a finite 3x4"):
    fmt.read_transform(q)
  with open(q, "w") as f:
    f.write("1.0 2.0\n")
  with pytest.raises(fmt.MultifaceFormatError, match="exactly one number"):
    fmt.read_scalar(q, "texture variance")
