"""Cameras (KRT, projection, view directions), mesh I/O (OBJ) and topology."""

from lipflow_jax.geometry.camera import (
  Camera,
  camera_center,
  compose_head_pose,
  compose_rigid,
  dome_cameras,
  focal_for_fov,
  index_camera,
  intrinsics,
  look_at,
  project,
  project_with_depth,
  rigid_inverse,
  stack_cameras,
  transform_points,
  unproject,
  view_direction,
  world_to_camera,
)
from lipflow_jax.geometry.krt import KRTFormatError, read_krt, write_krt
from lipflow_jax.geometry.mesh import (
  Mesh,
  OBJFormatError,
  face_normals,
  read_obj,
  vertex_normals,
  write_obj,
)
