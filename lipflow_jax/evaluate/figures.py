"""Figures with PIL only: labelled image grids (PNG), keypoint overlays, and animated GIFs."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(image) -> np.ndarray:
  """[H, W, C] float in [0, 1] (C = 1 or 3) -> [H, W, 3] uint8."""
  a = np.asarray(image, np.float32)
  if a.ndim == 2:
    a = a[..., None]
  if a.shape[-1] == 1:
    a = np.repeat(a, 3, axis=-1)
  a = np.nan_to_num(a, nan=0.0)
  return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def resize(image: np.ndarray, height: int) -> np.ndarray:
  """Nearest-neighbour resize of a uint8 [H, W, 3] image to the given height (aspect kept)."""
  h, w = image.shape[:2]
  if h == height:
    return image
  width = max(1, int(round(w * height / h)))
  return np.asarray(Image.fromarray(image).resize((width, height), Image.NEAREST))


def draw_keypoints(
  image, keypoints, visible=None, color=(255, 40, 40), radius: int = 1, scale: float = 1.0
):
  """Draws visible (finite) keypoints [P, 2] (pixels of ``image`` before ``scale``) on a uint8
  image copy."""
  img = Image.fromarray(np.ascontiguousarray(image))
  draw = ImageDraw.Draw(img)
  kp = np.asarray(keypoints, np.float32) * scale
  vis = np.ones(len(kp), bool) if visible is None else np.asarray(visible) > 0.5
  for (x, y), v in zip(kp, vis):
    if v and np.isfinite(x) and np.isfinite(y):
      draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
  return np.asarray(img)


def grid(
  rows: Sequence[Sequence[np.ndarray]],
  row_labels: Optional[Sequence[str]] = None,
  col_labels: Optional[Sequence[str]] = None,
  cell_height: int = 96,
  pad: int = 2,
  label_width: int = 130,
  title: Optional[str] = None,
) -> np.ndarray:
  """A labelled grid of images.

  Args:
    rows: rows of images (float [H, W, C] in [0, 1] or uint8 [H, W, 3]); cells are resized to
      cell_height.
    row_labels: text left of each row. col_labels: text above each column.
  Returns:
    uint8 [H, W, 3].
  """
  cells = [
    [
      resize(
        c
        if np.asarray(c).dtype == np.uint8
        and np.asarray(c).ndim == 3
        and np.asarray(c).shape[-1] == 3
        else to_uint8(c),
        cell_height,
      )
      for c in row
    ]
    for row in rows
  ]
  ncol = max(len(r) for r in cells)
  col_w = [
    max((r[j].shape[1] for r in cells if j < len(r)), default=cell_height) for j in range(ncol)
  ]
  lw = label_width if row_labels else 0
  top = (14 if col_labels else 0) + (16 if title else 0)
  width = lw + sum(col_w) + pad * (ncol + 1)
  height = top + len(cells) * (cell_height + pad) + pad
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((pad, 2), title, fill=(0, 0, 0))
  if col_labels:
    x = lw + pad
    for j, label in enumerate(col_labels[:ncol]):
      draw.text((x, top - 13), str(label), fill=(0, 0, 0))
      x += col_w[j] + pad
  y = top + pad
  for i, row in enumerate(cells):
    if row_labels:
      draw.text((pad, y + cell_height // 2 - 6), str(row_labels[i]), fill=(0, 0, 0))
    x = lw + pad
    for j, c in enumerate(row):
      canvas.paste(Image.fromarray(c), (x, y))
      x += col_w[j] + pad
    y += cell_height + pad
  return np.asarray(canvas)


def save_png(image: np.ndarray, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(np.asarray(image, np.uint8)).save(path)
  return path


def save_gif(frames: Sequence[np.ndarray], path: str, duration_ms: int = 120) -> str:
  """Writes an animated GIF (looping) from uint8 [H, W, 3] frames of equal size."""
  if not frames:
    raise ValueError("save_gif: no frames")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  imgs = [
    Image.fromarray(np.asarray(f, np.uint8)).convert("P", palette=Image.ADAPTIVE, colors=255)
    for f in frames
  ]
  imgs[0].save(
    path, save_all=True, append_images=imgs[1:], duration=duration_ms, loop=0, optimize=False
  )
  return path


def line_plot(
  series: dict,
  hlines: Optional[dict] = None,
  title: str = "",
  x_label: str = "",
  y_label: str = "",
  size=(720, 360),
) -> np.ndarray:
  """A line chart as a uint8 [H, W, 3] image (PIL only).

  Args:
    series: {label: [N] y values} drawn against 0..N-1, one colour each (NaN values skipped).
    hlines: {label: y} dashed horizontal reference lines (e.g. frame-time budgets).
    title, x_label, y_label: text.
    size: (width, height) in pixels.
  """
  hlines = dict(hlines or {})
  w, h = size
  left, right, top, bottom = 60, 150, 30, 40
  img = Image.new("RGB", (w, h), (255, 255, 255))
  draw = ImageDraw.Draw(img)
  values = [np.asarray(v, np.float64) for v in series.values()]
  finite = np.concatenate([v[np.isfinite(v)] for v in values] + [np.asarray(list(hlines.values()))])
  y_max = float(np.max(finite)) * 1.1 if finite.size else 1.0
  n = max((len(v) for v in values), default=1)
  px = lambda i: left + (w - left - right) * i / max(n - 1, 1)
  py = lambda y: h - bottom - (h - top - bottom) * y / max(y_max, 1e-12)
  draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
  for k in range(5):
    y = y_max * k / 4
    draw.text((4, py(y) - 6), f"{y:.3g}", fill=(0, 0, 0))
  for i in sorted({round((n - 1) * k / 4) for k in range(5)}):  # x ticks: 0 .. N-1
    draw.line([px(i), h - bottom, px(i), h - bottom + 4], fill=(0, 0, 0))
    draw.text((px(i) - 4, h - bottom + 6), str(i), fill=(0, 0, 0))
  colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
  for j, (label, y) in enumerate(hlines.items()):
    c = (120, 120, 120) if j % 2 else (200, 60, 60)
    for x0 in range(left, w - right, 10):
      draw.line([x0, py(y), min(x0 + 5, w - right), py(y)], fill=c)
    draw.text((w - right + 6, py(y) - 6), label, fill=c)
  for j, (label, v) in enumerate(zip(series, values)):
    c = colors[j % len(colors)]
    pts = [(px(i), py(y)) for i, y in enumerate(v) if np.isfinite(y)]
    if len(pts) > 1:
      draw.line(pts, fill=c, width=2)
    draw.text((w - right + 6, top + 14 * j), label, fill=c)
  draw.text((left, 8), title, fill=(0, 0, 0))
  draw.text((left + (w - left - right) // 2 - 20, h - bottom + 22), x_label, fill=(0, 0, 0))
  draw.text((4, top - 24), y_label, fill=(0, 0, 0))
  return np.asarray(img)
