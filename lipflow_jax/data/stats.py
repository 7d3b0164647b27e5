"""Normalisation statistics of a capture (vertex and texture mean / std), accumulated frame by
frame.

Definitions (Multiface's: one scalar std for vertices, one for textures):
  vert_mean [V, 3] = mean over training frames; vert_std = sqrt(mean((v - vert_mean)^2)) over
  frames, vertices and coordinates.
  tex_mean [T, T, 3] = per-texel mean of the average textures over training frames where observed (0
  where never observed); tex_std = sqrt(mean((t - tex_mean)^2)) over the observed texels of the
  per-camera textures of the training (frame, camera) pairs, 0..255 units.
"""

from __future__ import annotations

import numpy as np


class NormStats:
  """Accumulates sums in float64; ``add`` per training frame, then ``result``."""

  def __init__(self):
    self.n = 0
    self.v1 = self.v2 = None
    self.a0 = self.a1 = None
    self.t0 = self.t1 = self.t2 = None

  def add(self, verts, avg_tex, tex=None, tex_mask=None):
    """verts [V, 3]; avg_tex [T, T, 3] 0..255 (0 = unobserved); tex [C, T, T, 3], tex_mask [C, T,
    T, 1]."""
    v = np.asarray(verts, np.float64)
    a = np.asarray(avg_tex, np.float64)
    am = np.any(a > 0, -1, keepdims=True).astype(np.float64)
    if self.v1 is None:
      self.v1, self.v2 = np.zeros_like(v), np.zeros_like(v)
      self.a0, self.a1 = np.zeros(a.shape[:2] + (1,)), np.zeros_like(a)
      self.t0, self.t1, self.t2 = np.zeros(a.shape[:2] + (1,)), np.zeros_like(a), np.zeros_like(a)
    self.n += 1
    self.v1 += v
    self.v2 += v * v
    self.a0 += am
    self.a1 += a * am
    if tex is not None:
      t = np.asarray(tex, np.float64)
      m = np.asarray(tex_mask, np.float64)
      self.t0 += m.sum(0)
      self.t1 += (t * m).sum(0)
      self.t2 += (t * t * m).sum(0)

  def result(self):
    """(vert_mean [V,3] f32, vert_std float, tex_mean [T,T,3] f32, tex_std float)."""
    if not self.n:
      raise ValueError("no training frames: cannot compute normalisation statistics")
    vm = self.v1 / self.n
    vvar = float(np.sum(self.v2 - self.n * vm * vm) / (self.n * vm.size))
    tm = np.where(self.a0 > 0, self.a1 / np.maximum(self.a0, 1), 0.0)
    if self.t0 is not None and self.t0.sum() > 0:
      # sum over observed (t - m)^2 = S2 - 2 m S1 + m^2 S0, per texel and channel.
      sq = self.t2 - 2.0 * tm * self.t1 + tm * tm * self.t0
      tvar = float(sq.sum() / (3.0 * self.t0.sum()))
    else:
      tvar = 1.0
    return (
      vm.astype(np.float32),
      float(np.sqrt(max(vvar, 1e-12))),
      tm.astype(np.float32),
      float(np.sqrt(max(tvar, 1e-12))),
    )
