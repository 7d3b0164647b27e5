"""Tests of the Multiface layout: synthetic -> entity directory -> multiface builder; bad input."""

import os
import shutil

import numpy as np
import pytest

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
