"""The capture script: segments of smoothly varying expression and the head pose of every frame.

Like a real capture session, each segment has a theme (``SEGMENTS``: which visible factors it
exercises); its factor trajectory interpolates random key poses (cosine easing, so it is smooth)
that start and end near neutral. Hidden factors are partly tied to visible ones plus an independent
part of their own:

    cheek_puff = clip(0.6 * pucker + 0.4 * own)        tongue = clip(0.5 * jaw_open + 0.5 * own)
    wrinkles   = clip(0.7 * mean(brow_raise) + 0.3 * own)
    gaze, flush: independent

so keypoints predict them only in part. The held-out segments (``EXP_ROM*``, ``EXP_free_face``,
named as in Multiface's test split) mix every factor at random. The head pose jitters smoothly (a
few degrees, a few mm).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import numpy as np

from lipflow_jax.data import synthetic_head as sh

# name -> factors the segment exercises (visible ones and the independent parts of hidden ones).
SEGMENTS = {
  "E001_Neutral_Eyes_Open": ("gaze",),
  "E002_Jaw_Open": ("jaw_open",),
  "E003_Smile": ("lip_corner_l+r",),
  "E004_Smirk_Left": ("lip_corner_l",),
  "E005_Smirk_Right": ("lip_corner_r",),
  "E006_Pucker": ("pucker",),
  "E007_Brows_Up": ("brow_raise_l+r",),
  "E008_Brow_Left": ("brow_raise_l",),
  "E009_Blink": ("eyelid_close_l+r",),
  "E010_Wink_Left": ("eyelid_close_l",),
  "E011_Wink_Right": ("eyelid_close_r",),
  "E012_Tongue_Out": ("jaw_open", "tongue"),
  "E013_Cheeks_Puffed": ("cheek_puff",),
  "E014_Look_Around": ("gaze",),
  "E015_Forehead_Wrinkle": ("brow_raise_l+r", "wrinkles"),
  "E016_Speech": ("jaw_open", "pucker", "lip_corner_l+r", "tongue"),
  "E017_Flush": ("flush",),
  "E018_Mixed": ("all",),
}
TEST_SEGMENTS = ("EXP_ROM_01", "EXP_free_face")
# Capture v2: four held-out test segments (more frames for the paired comparisons, and from more
# than two trajectories, since frames within a segment are correlated).
TEST_SEGMENTS_V2 = ("EXP_ROM_01", "EXP_ROM_02", "EXP_ROM_03", "EXP_free_face")
# Held out like the test segments (all factors at random) but used only to choose fitting settings.
VALIDATION_SEGMENTS = ("V001_free_face",)
TEST_SEGMENT_PREFIXES = ("EXP_ROM", "EXP_free_face")


class Script(NamedTuple):
  """Per-frame ground truth of a capture.

  Attributes:
    segments: segment names (segment_index -> name).
    frame_segment: [N] int32 segment index of every frame.
    frame_names: N six-digit frame names (unique over the capture, increasing like Multiface's).
    factors: [N, N_f] float32 expression factors.
    head_pose: [N, 3, 4] float32 head-to-world transforms.
  """

  segments: Tuple[str, ...]
  frame_segment: np.ndarray
  frame_names: Tuple[str, ...]
  factors: np.ndarray
  head_pose: np.ndarray


def _keys(rng, n_frames, n_keys, lo, hi, rest=0.0, active=True):
  """Key values at ``n_keys`` evenly spaced frames; first and last at rest for active factors."""
  k = rng.uniform(lo, hi, n_keys)
  if active:
    k[0] = rest
    k[-1] = rest if n_keys > 2 else k[-1]
  return k


def _ease(keys, n_frames):
  """Cosine-eased interpolation of ``keys`` over ``n_frames`` frames (C1, flat at the keys)."""
  n_keys = len(keys)
  if n_keys == 1:
    return np.full(n_frames, keys[0])
  t = np.linspace(0.0, n_keys - 1, n_frames)
  i = np.minimum(np.floor(t).astype(int), n_keys - 2)
  a = t - i
  w = 0.5 - 0.5 * np.cos(np.pi * a)
  return keys[i] * (1.0 - w) + keys[i + 1] * w


def segment_factors(rng: np.random.RandomState, theme: Sequence[str], n_frames: int) -> np.ndarray:
  """[n_frames, N_f] smooth factor trajectory for a segment with the given theme."""
  n_keys = max(2, min(n_frames, 2 + n_frames // 5))
  names = sh.FACTOR_NAMES
  lo = np.array([sh.FACTOR_RANGES[n][0] for n in names])
  hi = np.array([sh.FACTOR_RANGES[n][1] for n in names])
  mixed = "all" in theme
  active = set()
  for t in theme:
    if t == "gaze":
      active |= {"gaze_x", "gaze_y"}
    elif t.endswith("_l+r"):
      active |= {t[:-4] + "_l", t[:-4] + "_r"}
    else:
      active.add(t)
  paired = [t[:-4] for t in theme if t.endswith("_l+r")]
  out = np.zeros((n_frames, len(names)))
  own = {}
  for j, n in enumerate(names):
    is_active = mixed or n in active
    if n in ("tongue", "cheek_puff", "wrinkles"):  # independent part, tied below
      amp = 1.0 if is_active else 0.25
      own[n] = _ease(_keys(rng, n_frames, n_keys, 0.0, amp, active=False), n_frames)
      continue
    if n.startswith("gaze"):
      amp = 0.9 if is_active else 0.35
      out[:, j] = _ease(_keys(rng, n_frames, n_keys, -amp, amp, active=False), n_frames)
      continue
    if n == "flush":
      amp = 1.0 if is_active else 0.3
      out[:, j] = _ease(
        _keys(rng, n_frames, max(2, n_keys // 2), -amp, amp, active=False), n_frames
      )
      continue
    if is_active:
      keys = _keys(rng, n_frames, n_keys, 0.5 * hi[j], hi[j])
      # Alternate high and low keys so that the segment sweeps the range.
      keys[2:-1:2] = rng.uniform(lo[j], 0.4 * hi[j], len(keys[2:-1:2]))
    else:
      keys = _keys(rng, n_frames, n_keys, max(lo[j], -0.05), 0.08, active=False)
    out[:, j] = _ease(keys, n_frames)
  for p in paired:  # both sides together, with a small asymmetry
    jl, jr = names.index(p + "_l"), names.index(p + "_r")
    out[:, jr] = out[:, jl] * rng.uniform(0.85, 1.0) + rng.uniform(-0.05, 0.05)
  f = {n: out[:, j] for j, n in enumerate(names)}
  out[:, names.index("cheek_puff")] = 0.6 * f["pucker"] + 0.4 * own["cheek_puff"]
  out[:, names.index("tongue")] = 0.5 * f["jaw_open"] + 0.5 * own["tongue"]
  out[:, names.index("wrinkles")] = (
    0.7 * np.maximum(0.5 * (f["brow_raise_l"] + f["brow_raise_r"]), 0.0) + 0.3 * own["wrinkles"]
  )
  return np.clip(out, lo, hi).astype(np.float32)


def _rotation(yaw, pitch, roll):
  cy, sy, cp, sp, cr, sr = (
    np.cos(yaw),
    np.sin(yaw),
    np.cos(pitch),
    np.sin(pitch),
    np.cos(roll),
    np.sin(roll),
  )
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
  rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
  return ry @ rx @ rz


def head_poses(
  rng: np.random.RandomState, n_frames: int, jitter_deg: float, jitter_mm: float
) -> np.ndarray:
  """[n_frames, 3, 4] smooth head-to-world poses around the identity (a segment's worth)."""
  t = np.arange(n_frames)
  offs = rng.uniform(-0.5, 0.5, 6)
  ang = np.zeros((n_frames, 3))
  trans = np.zeros((n_frames, 3))
  for k in range(3):
    f1, f2, ph1, ph2 = (
      rng.uniform(0.05, 0.2),
      rng.uniform(0.2, 0.45),
      rng.uniform(0, 6.3),
      rng.uniform(0, 6.3),
    )
    wave = 0.7 * np.sin(f1 * t + ph1) + 0.3 * np.sin(f2 * t + ph2)
    ang[:, k] = np.deg2rad(jitter_deg) * (offs[k] + 0.6 * wave + 0.1 * rng.randn(n_frames))
    trans[:, k] = jitter_mm * (offs[3 + k] + 0.6 * np.sin(f1 * t + ph2) + 0.1 * rng.randn(n_frames))
  poses = np.zeros((n_frames, 3, 4))
  for i in range(n_frames):
    poses[i, :, :3] = _rotation(*ang[i])
    poses[i, :, 3] = trans[i]
  return poses.astype(np.float32)


def make_script(
  train_segments: Sequence[str],
  test_segments: Sequence[str],
  frames_per_segment: int,
  test_frames_per_segment: int,
  seed: int,
  jitter_deg: float = 2.5,
  jitter_mm: float = 4.0,
  validation_segments: Sequence[str] = (),
) -> Script:
  """The whole capture: train segments (themes from ``SEGMENTS``), then test segments, then
  validation segments (both held out: all factors, ``test_frames_per_segment`` frames each)."""
  rng = np.random.RandomState(seed)
  held_out = tuple(test_segments) + tuple(validation_segments)
  segs = tuple(train_segments) + held_out
  factors, poses, seg_idx, names = [], [], [], []
  frame = 100
  for s, name in enumerate(segs):
    n = test_frames_per_segment if name in held_out else frames_per_segment
    theme = SEGMENTS.get(name, ("all",))
    factors.append(segment_factors(rng, theme, n))
    poses.append(head_poses(rng, n, jitter_deg, jitter_mm))
    seg_idx += [s] * n
    names += [f"{frame + 3 * k:06d}" for k in range(n)]
    frame += 3 * n + 30
  return Script(
    segs,
    np.asarray(seg_idx, np.int32),
    tuple(names),
    np.concatenate(factors),
    np.concatenate(poses),
  )
