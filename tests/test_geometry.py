"""Tests of lipflow_jax.geometry: cameras, KRT and OBJ I/O, normals."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lipflow_jax import geometry
from lipflow_jax.geometry import Camera, KRTFormatError


def _random_camera(seed=0, size=(48, 64)):
  rng = np.random.default_rng(seed)
  eye = rng.normal(size=3) * 2.0 + np.array([0.0, 0.0, 6.0])
  rt = geometry.look_at(eye, rng.normal(size=3) * 0.2)
  k = geometry.intrinsics((70.0, 66.0), size, principal=(30.5, 25.0))
  return Camera(K=k, Rt=rt)


def test_project_unproject_round_trip():
  cam = _random_camera()
  pts = jnp.asarray(np.random.default_rng(1).normal(size=(20, 3)), jnp.float32)
  pix, depth = geometry.project_with_depth(cam, pts)
  np.testing.assert_allclose(geometry.project(cam, pts), pix, rtol=1e-6)
  back = geometry.unproject(cam, pix, depth)
  np.testing.assert_allclose(back, pts, atol=1e-4)
  assert np.all(np.asarray(depth) > 0)


def test_camera_center_and_view_direction_hand_computed():
  # Camera at (0, 0, 5) looking at the origin: centre (0, 0, 5), view direction +z (head origin ->
  # camera).
  cam = Camera(
    K=geometry.intrinsics(10.0, (8, 8)), Rt=geometry.look_at((0.0, 0.0, 5.0), (0.0, 0.0, 0.0))
  )
  np.testing.assert_allclose(geometry.camera_center(cam), [0, 0, 5], atol=1e-6)
  np.testing.assert_allclose(geometry.view_direction(cam), [0, 0, 1], atol=1e-6)
  # R = identity, t = (1, 2, 3): centre = -t.
  cam2 = Camera(K=cam.K, Rt=jnp.concatenate([jnp.eye(3), jnp.array([[1.0], [2.0], [3.0]])], 1))
  np.testing.assert_allclose(geometry.camera_center(cam2), [-1, -2, -3], atol=1e-6)
  # With a head pose translated by (0, 0, 2) and rotated 90 degrees about y, the camera at (0, 0, 5)
  # is 3 units in front of the head along world +z, i.e. along head -x (R^T (0, 0, 3)).
  c, s = 0.0, 1.0
  rot = jnp.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], jnp.float32)
  pose = jnp.concatenate([rot, jnp.array([[0.0], [0.0], [2.0]])], 1)
  np.testing.assert_allclose(geometry.view_direction(cam, pose), [-1, 0, 0], atol=1e-6)
  composed = geometry.compose_head_pose(cam, pose)
  np.testing.assert_allclose(geometry.view_direction(composed), [-1, 0, 0], atol=1e-6)


def test_look_at_orientation():
  """World up appears at the top of the image, the viewer's right at the right."""
  cam = Camera(
    K=geometry.intrinsics(100.0, (64, 64)), Rt=geometry.look_at((0.0, 0.0, 5.0), (0.0, 0.0, 0.0))
  )
  pix = np.asarray(
    geometry.project(cam, jnp.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
  )
  np.testing.assert_allclose(pix[2], [32, 32], atol=1e-5)
  assert pix[0, 1] < 32 and abs(pix[0, 0] - 32) < 1e-4  # up -> smaller row
  assert pix[1, 0] > 32 and abs(pix[1, 1] - 32) < 1e-4  # +x seen from +z -> right
  np.testing.assert_allclose(np.linalg.det(np.asarray(cam.Rt[:, :3])), 1.0, atol=1e-5)


def test_compose_head_pose_equals_transform_then_project():
  cam = _random_camera(2)
  rng = np.random.default_rng(3)
  q = rng.normal(size=4)
  q /= np.linalg.norm(q)
  w, x, y, z = q
  rot = np.array(
    [
      [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
      [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
      [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
  )
  pose = jnp.asarray(np.concatenate([rot, rng.normal(size=(3, 1)) * 0.3], 1), jnp.float32)
  pts = jnp.asarray(rng.normal(size=(10, 3)) * 0.5, jnp.float32)
  world = geometry.transform_points(pose, pts)
  np.testing.assert_allclose(
    geometry.project(geometry.compose_head_pose(cam, pose), pts),
    geometry.project(cam, world),
    rtol=1e-4,
    atol=1e-3,
  )
  np.testing.assert_allclose(
    geometry.compose_rigid(pose, geometry.rigid_inverse(pose)), jnp.eye(3, 4), atol=1e-5
  )


def test_dome_cameras_look_at_target():
  target = (0.1, -0.2, 0.3)
  cams = geometry.dome_cameras(7, 4.0, (40, 60), target=target)
  assert cams.K.shape == (7, 3, 3) and cams.Rt.shape == (7, 3, 4)
  for i in range(7):
    cam = geometry.index_camera(cams, i)
    pix, depth = geometry.project_with_depth(cam, jnp.asarray([target], jnp.float32))
    np.testing.assert_allclose(pix[0], [30, 20], atol=1e-3)
    np.testing.assert_allclose(depth[0], 4.0, rtol=1e-5)
    np.testing.assert_allclose(
      jnp.linalg.norm(geometry.camera_center(cam) - jnp.asarray(target)), 4.0, rtol=1e-5
    )
  with pytest.raises(ValueError, match="num_cameras"):
    geometry.dome_cameras(0, 4.0, (40, 60))


def test_krt_round_trip_and_errors(tmp_path):
  cams = {"400067": _random_camera(4), "400068": _random_camera(5)}
  cams = {k: Camera(K=np.asarray(c.K), Rt=np.asarray(c.Rt)) for k, c in cams.items()}
  dist = {"400067": np.arange(5, dtype=np.float32) * 0.01, "400068": np.zeros(5, np.float32)}
  path = os.path.join(tmp_path, "KRT")
  geometry.write_krt(path, cams, dist)
  back, back_dist = geometry.read_krt(path)
  assert list(back) == ["400067", "400068"]
  for name in cams:
    np.testing.assert_allclose(back[name].K, cams[name].K, rtol=1e-6)
    np.testing.assert_allclose(back[name].Rt, cams[name].Rt, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(back_dist[name], dist[name], atol=1e-8)
  # A block with a missing line: the error names the file and the line of the camera's name.
  lines = open(path).read().split("\n")
  del lines[9 + 4]  # the second camera (name on line 10) loses its distortion line
  bad = os.path.join(tmp_path, "KRT_bad")
  open(bad, "w").write("\n".join(lines))
  with pytest.raises(KRTFormatError, match=r"KRT_bad:10:.*400068"):
    geometry.read_krt(bad)
  with pytest.raises(FileNotFoundError):
    geometry.read_krt(os.path.join(tmp_path, "missing"))


def test_obj_round_trip_with_separate_uv_indices(tmp_path):
  verts = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], np.float32)
  faces = np.array([[0, 1, 2], [0, 2, 3]], np.int32)
  uvs = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5]], np.float32)
  uv_faces = np.array([[0, 1, 4], [0, 4, 3]], np.int32)  # different from the vertex indices
  path = os.path.join(tmp_path, "m.obj")
  geometry.write_obj(path, geometry.Mesh(verts, faces, uvs, uv_faces))
  m = geometry.read_obj(path)
  np.testing.assert_allclose(m.verts, verts)
  np.testing.assert_array_equal(m.faces, faces)
  np.testing.assert_allclose(m.uvs, uvs)
  np.testing.assert_array_equal(m.uv_faces, uv_faces)
  # Quads are fan-triangulated; vn indices are ignored.
  quad = os.path.join(tmp_path, "q.obj")
  open(quad, "w").write(
    "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\n"
    "vn 0 0 1\nf 1/1/1 2/2/1 3/3/1 4/4/1\n"
  )
  q = geometry.read_obj(quad)
  np.testing.assert_array_equal(q.faces, [[0, 1, 2], [0, 2, 3]])
  bad = os.path.join(tmp_path, "bad.obj")
  open(bad, "w").write("v 0 0 0\nf 1 2 x\n")
  with pytest.raises(geometry.OBJFormatError, match="bad.obj:2"):
    geometry.read_obj(bad)


def _icosphere(subdivisions=2):
  """Unit icosphere with counter-clockwise (outward) faces."""
  t = (1.0 + 5**0.5) / 2.0
  v = [
    [-1, t, 0],
    [1, t, 0],
    [-1, -t, 0],
    [1, -t, 0],
    [0, -1, t],
    [0, 1, t],
    [0, -1, -t],
    [0, 1, -t],
    [t, 0, -1],
    [t, 0, 1],
    [-t, 0, -1],
    [-t, 0, 1],
  ]
  f = [
    [0, 11, 5],
    [0, 5, 1],
    [0, 1, 7],
    [0, 7, 10],
    [0, 10, 11],
    [1, 5, 9],
    [5, 11, 4],
    [11, 10, 2],
    [10, 7, 6],
    [7, 1, 8],
    [3, 9, 4],
    [3, 4, 2],
    [3, 2, 6],
    [3, 6, 8],
    [3, 8, 9],
    [4, 9, 5],
    [2, 4, 11],
    [6, 2, 10],
    [8, 6, 7],
    [9, 8, 1],
  ]
  v = [list(np.asarray(p) / np.linalg.norm(p)) for p in v]
  for _ in range(subdivisions):
    cache, nf = {}, []

    def mid(a, b):
      key = (min(a, b), max(a, b))
      if key not in cache:
        m = (np.asarray(v[a]) + np.asarray(v[b])) / 2.0
        v.append(list(m / np.linalg.norm(m)))
        cache[key] = len(v) - 1
      return cache[key]

    for a, b, c in f:
      ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
      nf += [[a, ab, ca], [b, bc, ab], [c, ca, bc], [ab, bc, ca]]
    f = nf
  return np.asarray(v, np.float32), np.asarray(f, np.int32)


def test_vertex_normals_of_sphere_are_radial():
  verts, faces = _icosphere(2)
  verts = verts * np.float32(2.5) + np.float32(0.0)  # radius does not matter
  normals = np.asarray(geometry.vertex_normals(jnp.asarray(verts), jnp.asarray(faces)))
  radial = verts / np.linalg.norm(verts, axis=-1, keepdims=True)
  cos = np.sum(normals * radial, -1)
  assert np.min(cos) > 0.99  # outward for counter-clockwise faces
  np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-5)
  fn = np.asarray(geometry.face_normals(jnp.asarray(verts), jnp.asarray(faces)))
  centres = verts[faces].mean(1)
  assert np.all(np.sum(fn * centres, -1) > 0)


def test_camera_positional_equals_keyword_under_jit_and_vmap():
  k = geometry.intrinsics(50.0, (32, 32))
  rt = geometry.look_at((0.3, 0.2, 4.0), (0.0, 0.0, 0.0))
  pos, kw = Camera(k, rt), Camera(K=k, Rt=rt)
  assert jax.tree_util.tree_structure(pos) == jax.tree_util.tree_structure(kw)
  jax.tree_util.tree_map(np.testing.assert_array_equal, pos, kw)
  np.testing.assert_array_equal(pos.K, k)
  np.testing.assert_array_equal(pos.Rt, rt)
  assert [np.asarray(x).shape for x in jax.tree_util.tree_leaves(pos)] == [(3, 3), (3, 4)]
  pts = jnp.array([[0.1, -0.2, 0.3], [0.0, 0.4, -0.1]])
  project = jax.jit(lambda K, Rt: geometry.project(Camera(K, Rt), pts))
  np.testing.assert_allclose(project(k, rt), geometry.project(kw, pts), rtol=1e-6)
  # A camera returned from jit and a batch of cameras built positionally inside vmap.
  cam = jax.jit(lambda K, Rt: Camera(K, Rt))(k, rt)
  assert isinstance(cam, Camera)
  np.testing.assert_array_equal(cam.Rt, rt)
  batch = Camera(jnp.stack([k, 2.0 * k]), jnp.stack([rt, rt]))
  pix = jax.vmap(lambda c: geometry.project(c, pts))(batch)
  np.testing.assert_allclose(pix[0], geometry.project(kw, pts), rtol=1e-6)
  built = jax.vmap(Camera)(batch.K, batch.Rt)
  np.testing.assert_array_equal(built.K, batch.K)
