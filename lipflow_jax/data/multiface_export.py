"""Writes a synthetic capture as a Multiface entity directory (the layout of ``multiface_format``).

The exporter writes textures at the synthetic texture size (e.g. 64 x 64) under the directory
name ``unwrapped_uv_1024`` and images at the synthetic image size; the reader
(``multiface.MultifaceEntity``) takes whatever size it finds and resizes to the requested one.
Besides the published files it writes ``keypoint_vertex_ids.txt`` and the split JSONs inside the
entity directory.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import tqdm

from lipflow_jax import geometry
from lipflow_jax.data import capture as capture_lib
from lipflow_jax.data import multiface_format as fmt
from lipflow_jax.data import stats as stats_lib
from lipflow_jax.data import synthetic_head as sh


def export_multiface(
  capture: capture_lib.Capture,
  out_dir,
  frames: Optional[Sequence[int]] = None,
  progress: bool = False,
) -> Dict[str, object]:
  """Writes a synthetic capture as a Multiface entity directory (all files of the layout).

  Statistics files (tex_mean.png, tex_var.txt, vert_mean.bin, vert_var.txt) hold the training
  frames' ``stats.NormStats`` (tex_mean rounded to uint8 by the PNG). Also writes
  ``test_segment.json`` (the test prefixes), ``camera-split-config.json`` (train: training cameras,
  test: held-out cameras) and ``keypoint_vertex_ids.txt``.

  Args:
    capture: ``capture.Capture``; out_dir: the entity directory to create.
    frames: frame indices to export (default: the train and test frames; Multiface's layout has no
      validation split, so validation frames are left out unless listed).
    progress: show a progress bar.
  Returns:
    {'frames': [(segment, frame)] written, i.e. the lines of ``frame_list.txt``,
     'left_out': {split: [(segment, frame)]}, the capture's frames not written,
     'renders': {frame_index: render dict}} for checking.
  """
  os.makedirs(out_dir, exist_ok=True)
  head, rig, script = capture.head, capture.rig, capture.script
  if frames is None:
    frames = [i for i in range(capture.num_frames) if capture.split_of(i) != "validation"]
  frames = list(frames)
  left_out = {}
  for i in sorted(set(range(capture.num_frames)) - set(frames)):
    left_out.setdefault(capture.split_of(i), []).append(
      (capture.segment_name(i), script.frame_names[i])
    )
  cams = {n: geometry.Camera(K=rig.K[i], Rt=rig.Rt[i]) for i, n in enumerate(rig.names)}
  geometry.write_krt(os.path.join(out_dir, "KRT"), cams)
  listed, renders = [], {}
  norm = stats_lib.NormStats()
  it = frames
  if progress:
    it = tqdm.tqdm(frames, desc="export multiface")
  for i in it:
    seg, name = capture.segment_name(i), script.frame_names[i]
    fr = capture.render(i)
    renders[i] = fr
    listed.append((seg, name))
    os.makedirs(os.path.join(out_dir, "tracked_mesh", seg), exist_ok=True)
    fr["verts"].astype("<f4").tofile(fmt.mesh_path(out_dir, seg, name))
    geometry.write_obj(fmt.mesh_path(out_dir, seg, name, ".obj"), sh.head_mesh(head, fr["verts"]))
    np.savetxt(fmt.mesh_path(out_dir, seg, name, "transform"), fr["head_pose"], fmt="%.9g")
    for c, cam in enumerate(rig.names):
      fmt.write_png(fmt.tex_path(out_dir, seg, cam, name), fmt.texture_to_png(fr["tex"][c]))
      fmt.write_png(fmt.image_path(out_dir, seg, cam, name), fr["image"][c])
    fmt.write_png(fmt.tex_path(out_dir, seg, "average", name), fmt.texture_to_png(fr["avg_tex"]))
    if capture.split_of(i) != "test":
      tc = capture.train_cameras
      norm.add(fr["verts"], fr["avg_tex"], fr["tex"][tc], fr["tex_mask"][tc])
  with open(os.path.join(out_dir, "frame_list.txt"), "w") as f:
    f.write("\n".join(f"{s} {n}" for s, n in listed))  # no final newline, as published
  vm, vs, tm, ts = norm.result()
  vm.astype("<f4").tofile(os.path.join(out_dir, "vert_mean.bin"))
  with open(os.path.join(out_dir, "vert_var.txt"), "w") as f:
    f.write(f"{vs * vs:.9g}\n")
  fmt.write_png(
    os.path.join(out_dir, "tex_mean.png"), fmt.texture_to_png(np.clip(np.round(tm), 0, 255))
  )
  with open(os.path.join(out_dir, "tex_var.txt"), "w") as f:
    f.write(f"{ts * ts:.9g}\n")
  with open(os.path.join(out_dir, fmt.TEST_SEGMENT_JSON), "w") as f:
    json.dump({"segment": list(capture_script_prefixes(capture))}, f)
  with open(os.path.join(out_dir, fmt.CAMERA_SPLIT_JSON), "w") as f:
    json.dump(
      {
        "full": {
          "train": [rig.names[i] for i in capture.train_cameras],
          "test": [rig.names[i] for i in capture.test_cameras],
          "visual": [rig.names[i] for i in capture.test_cameras[:2]],
        }
      },
      f,
      indent=1,
    )
  with open(os.path.join(out_dir, fmt.KEYPOINT_IDS_TXT), "w") as f:
    f.write("".join(f"{n} {k}\n" for n, k in zip(head.keypoint_names, head.keypoint_vertex_ids)))
  return {"frames": listed, "left_out": left_out, "renders": renders}


def describe_export(result: Dict[str, object]) -> str:
  """What ``export_multiface`` wrote, e.g. '16 frames (4 validation frames left out: ...)'."""
  text = f"{len(result['frames'])} frames"
  left_out = result["left_out"]
  if left_out:
    why = "; the Multiface layout has no validation split" if "validation" in left_out else ""
    counts = ", ".join(f"{len(v)} {split}" for split, v in left_out.items())
    text += f" ({counts} frames left out{why})"
  return text


def capture_script_prefixes(capture: capture_lib.Capture) -> Tuple[str, ...]:
  """Test-segment prefixes that select exactly the capture's test segments."""
  out = []
  for s in capture.config.test_segments:
    p = next((p for p in fmt.DEFAULT_TEST_PREFIXES if s.startswith(p)), s)
    if p not in out:
      out.append(p)
  for p in out:
    for s in capture.config.train_segments:
      if s.startswith(p):
        raise ValueError(f"test prefix {p!r} also matches the training segment {s!r}")
  return tuple(out)
