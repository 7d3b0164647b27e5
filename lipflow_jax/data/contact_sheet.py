"""A contact sheet of a built dataset: dome views, headset crops, keypoints on the frontal view,
textures."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from lipflow_jax.data import input_pipeline, schema

_BG = (40, 40, 40)


def _up(a, size):
  """uint8/float image [H, W, C] -> PIL RGB image of ``size`` (w, h), nearest."""
  a = np.asarray(a)
  if a.dtype != np.uint8:
    a = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
  if a.shape[-1] == 1:
    a = np.repeat(a, 3, -1)
  return Image.fromarray(a).resize(size, Image.NEAREST)


def _row(tiles, gap=4):
  w = sum(t.size[0] for t in tiles) + gap * (len(tiles) - 1)
  h = max(t.size[1] for t in tiles)
  row = Image.new("RGB", (w, h), _BG)
  x = 0
  for t in tiles:
    row.paste(t, (x, 0))
    x += t.size[0] + gap
  return row


def frame_panel(
  ev, n: int, meta: schema.DatasetMeta, tile: int = 128, max_views: int = 8
) -> Image.Image:
  """One frame ``n`` of an evaluation set (``input_pipeline.load_frames``) as a block of rows."""
  c = ev["image"].shape[1]
  views = np.unique(np.linspace(0, c - 1, min(max_views, c)).round().astype(int))
  dome = [_up(ev["image"][n, v], (tile, tile)) for v in views]
  # Frontal view with keypoints (green: visible detections, red crosses: clean projections of
  # invisible ones).
  big = 2 * tile
  front = _up(ev["image_frontal"][n], (big, big))
  draw = ImageDraw.Draw(front)
  fh, fw = meta.frontal_size
  sx, sy = big / fw, big / fh
  kp, vis = ev["keypoints"][n], ev["keypoints_visible"][n]
  clean = ev.get("keypoints_clean", ev["keypoints"])[n]
  for (x, y), v, (cx, cy) in zip(kp, vis, clean):
    if v > 0.5:
      draw.ellipse([x * sx - 2, y * sy - 2, x * sx + 2, y * sy + 2], fill=(0, 255, 0))
    else:
      draw.line([cx * sx - 3, cy * sy - 3, cx * sx + 3, cy * sy + 3], fill=(255, 0, 0))
      draw.line([cx * sx - 3, cy * sy + 3, cx * sx + 3, cy * sy - 3], fill=(255, 0, 0))
  hmc = [_up(ev["hmc"][n, i], (tile, tile)) for i in range(ev["hmc"].shape[1])]
  tex_views = views[:: max(1, len(views) // 4)][:4]
  texs = [
    _up(schema.denormalize_tex(ev["tex"][n, v], meta) * ev["tex_mask"][n, v], (tile, tile))
    for v in tex_views
  ]
  masks = [_up(ev["tex_mask"][n, v], (tile, tile)) for v in tex_views]
  avg_mask = np.abs(ev["avg_tex"][n]).sum(-1, keepdims=True) > 0
  avg = _up(schema.denormalize_tex(ev["avg_tex"][n], meta) * avg_mask, (big, big))
  rows = [_row(dome), _row([front, _row(hmc), avg]), _row(texs + masks)]
  w = max(r.size[0] for r in rows)
  h = sum(r.size[1] for r in rows) + 4 * (len(rows) - 1) + 18
  panel = Image.new("RGB", (w, h), _BG)
  seg = meta.segments[int(ev["segment_index"][n])]
  ImageDraw.Draw(panel).text(
    (2, 2),
    f"frame {int(ev['frame_index'][n])}  {seg}   dome views | frontal + keypoints,"
    f" HMC crops, average texture | unwrapped textures, masks",
    fill=(230, 230, 230),
  )
  y = 18
  for r in rows:
    panel.paste(r, (0, y))
    y += r.size[1] + 4
  return panel


def make_contact_sheet(
  sources,
  meta: schema.DatasetMeta,
  path,
  frames_per_split: int = 1,
  splits: Sequence[str] = ("train", "test"),
  tile: int = 128,
) -> Optional[str]:
  """Writes a PNG with ``frames_per_split`` frames (the middle of each split) of each split."""
  panels = []
  for split in splits:
    if split not in sources or split not in meta.splits:
      continue
    frames = np.unique(meta.splits[split]["frame_index"])
    pick = frames[np.linspace(0, len(frames) - 1, frames_per_split + 2).round().astype(int)[1:-1]]
    cols = meta.splits[split]
    for f in pick:  # the views stored for this frame (a training frame may keep only some)
      cams = np.unique(cols["camera_index"][cols["frame_index"] == f])
      names = [meta.camera_names[int(c)] for c in cams]
      ev = input_pipeline.load_frames(sources[split], meta, split=split, frames=[f], cameras=names)
      panels.append(frame_panel(ev, 0, meta, tile))
  if not panels:
    return None
  w = max(p.size[0] for p in panels)
  sheet = Image.new("RGB", (w, sum(p.size[1] + 8 for p in panels)), (20, 20, 20))
  y = 0
  for p in panels:
    sheet.paste(p, (0, y))
    y += p.size[1] + 8
  sheet.save(path)
  return str(path)
