"""Rasterizer settings: a frozen, hashable dataclass that is static under ``jax.jit``."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

# Coverage below this probability counts as "not covered" when the blur radius is derived from
# sigma.
_AUTO_BLUR_EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class RasterSettings:
  """How to rasterize and shade. All lengths are in pixels.

  Attributes:
    image_size: (H, W) of the output image.
    faces_per_pixel: K, the number of faces kept per pixel among those within ``blur_radius`` of its
      centre: the nearest face covering the centre (or, where none covers it, the closest face),
        then the others in order of minimum vertex depth; sorted nearest first (see
        ``rasterize.select_faces``).
    sigma: width of the soft coverage in pixels; coverage of a face at signed pixel distance ``d``
      (positive inside) is ``p = 2 * sigmoid(min(d, 0) / sigma)``: exactly 1 on and inside the face,
      decaying outside it. ``sigma = 0`` gives hard (step) coverage.
    gamma: depth-blending temperature, in *relative* depth (scale free): a fragment that is a
      fraction ``r`` farther than the pixel's nearest fragment has its colour weight multiplied by
      ``exp(-r / gamma)``.
    blur_radius: faces farther than this from a pixel centre (from any of its edge lines or its
      bounding box) are not considered for that pixel. ``None`` derives it from sigma: ``sigma *
      log(2 / 1e-3)`` (coverage below 1e-3 is dropped); 0 when sigma = 0.
    tile_size: side of the square screen tiles used for binning.
    max_faces_per_tile: cap on the candidate faces per tile when K > 1. None (the default): no cap;
      every tile tests all of its candidates, 32 at a time, in a loop over blocks of tiles whose
      length is what the view holds (``rasterize.select_blocks``; nothing overflows, and
      ``tile_budget`` / ``heavy_tile_budget`` have no effect: empty tiles are skipped and crowded
      ones take more blocks). An integer M: every tile selects among at most M candidates (static
      shapes); a tile with more keeps the M with the smallest minimum vertex depth and is counted
      in ``overflow``; the cost of the selection grows linearly with M. With K = 1 it scales the
      budget of pixel chunks instead (None: as 64; see ``rasterize.select_nearest``).
    fragment_budget: fraction of the K * H * W fragment slots evaluated differentiably. Below 1,
      only the non-empty slots are evaluated (gathers, barycentrics, texture lookups and their
      gradients), compacted into a buffer of ``ceil(fragment_budget * K * H * W)`` fragments;
      usually most slots are empty (a head filling half of a 512 x 512 image at K = 8: ~35 %
      non-empty, ~18 % with back faces culled), so the evaluation costs that much less. Non-empty
      slots beyond the budget are dropped, farthest slot first (all pixels' slot K - 1, then slot K
      - 2, ...; within a slot, the last pixels in row-major / tile order first), and counted in
      ``overflow``. ``render.occupancy`` measures what a view needs. 1 evaluates every slot, empty
      or not (no compaction). None (the default): ``render_mesh`` picks, per call, the smallest of
      the budgets K * H * W, 1/2, 1/4, 1/8 of it (at least 4096 slots; for large views also 3/8
      and 3/16, see ``rasterize.fragment_ladder``) that holds the view's non-empty slots (under
      vmap the batch's largest), so nothing is dropped and the result equals that explicit
      budget's; its backward recomputes the branch's forward. ``rasterize`` evaluates every slot.
    tile_budget: fraction of the screen tiles that selection and shading run over when K > 1. Below
      1, only the tiles that hold candidate faces are processed (a head filling half of the image:
      about half of the tiles), compacted into ``ceil(tile_budget * n_tiles)`` tiles; tiles with
      faces beyond the budget (the last in row-major order) are dropped, rendered as background, and
      counted in ``overflow``. 1 (the default) processes every tile. No effect when K = 1 (see
      ``fragment_budget``).
    heavy_tile_budget: fraction of the screen tiles that may use all ``max_faces_per_tile``
      candidates when K > 1. Below 1, selection runs in two passes: every tile first among its first
      ``light_faces_per_tile`` (= max(K, max_faces_per_tile // 4)) candidates, then the tiles with
      more candidates ("heavy", e.g. where many small faces meet), compacted into
      ``ceil(heavy_tile_budget * n_tiles)`` tiles, again among all of theirs. The result is the same
      as one pass when the heavy tiles fit (a head at 512 x 512 with 15k faces: ~5 % of the tiles
      hold more than 32 candidates, a few over 100); heavy tiles beyond the budget (the last in
      row-major order) keep their first-pass selection and are counted in ``overflow``. So a cap
      high enough for the worst tile costs about a quarter of it elsewhere. ``render.occupancy``
      measures both. 1 (the default) runs one pass with all candidates.
    face_budget: which faces binning and selection run over. None (the default): only the faces
      that can touch the image (in front of ``znear``, front-facing when culling, grown box over a
      pixel centre), compacted per call into the smallest of a ladder of static sizes whose (face,
      tile) pair / chunk budget, halved at each rung, holds the view's (under vmap the largest the
      batch needs); exact (the same result as 1), so a small view of a large mesh costs a fraction
      of a full one, and a full view sorts and tests no more pairs / chunks than it has. A fraction
      in (0, 1): one compacted set of ``ceil(face_budget * F)`` faces (budgets scaled alike); faces
      beyond it (the last in face order) are dropped and counted in ``overflow``. 1: every face, no
      compaction (see ``rasterize._in_view``).
    background: colour of empty pixels; its length is the texture's channel count or 1 (broadcast).
    znear: faces with any vertex at camera depth ``<= znear`` (world units) are culled.
    cull_backfaces: also cull faces whose front side (counter-clockwise seen from outside, OBJ
      convention) points away from the camera.
  """

  image_size: Tuple[int, int]
  faces_per_pixel: int = 8
  sigma: float = 0.25
  gamma: float = 1e-4
  blur_radius: Optional[float] = None
  tile_size: int = 8
  max_faces_per_tile: Optional[int] = None
  fragment_budget: Optional[float] = None
  tile_budget: float = 1.0
  heavy_tile_budget: float = 1.0
  face_budget: Optional[float] = None
  background: Tuple[float, ...] = (0.0, 0.0, 0.0)
  znear: float = 1e-3
  cull_backfaces: bool = False

  def __post_init__(self):
    def fail(msg):
      raise ValueError(f"RasterSettings: {msg}")

    try:
      size = tuple(int(s) for s in self.image_size)
    except TypeError:
      fail(f"image_size must be (H, W), got {self.image_size!r}")
    if len(size) != 2 or min(size) < 1 or tuple(self.image_size) != size:
      fail(f"image_size must be two positive integers (H, W), got {self.image_size!r}")
    object.__setattr__(self, "image_size", size)
    if int(self.faces_per_pixel) != self.faces_per_pixel or self.faces_per_pixel < 1:
      fail(f"faces_per_pixel must be an integer >= 1, got {self.faces_per_pixel!r}")
    if not (math.isfinite(self.sigma) and self.sigma >= 0):
      fail(f"sigma must be finite and >= 0 (0 = hard coverage), got {self.sigma!r}")
    if not (math.isfinite(self.gamma) and self.gamma > 0):
      fail(f"gamma must be finite and > 0, got {self.gamma!r}")
    blur = self.blur_radius
    if blur is None:
      blur = self.sigma * math.log(2.0 / _AUTO_BLUR_EPS) if self.sigma > 0 else 0.0
    if not (math.isfinite(blur) and blur >= 0):
      fail(f"blur_radius must be finite and >= 0, got {self.blur_radius!r}")
    object.__setattr__(self, "blur_radius", float(blur))
    if int(self.tile_size) != self.tile_size or not 1 <= self.tile_size <= 256:
      fail(f"tile_size must be an integer in [1, 256], got {self.tile_size!r}")
    cap = self.max_faces_per_tile
    if cap is not None and (int(cap) != cap or cap < 1):
      fail(f"max_faces_per_tile must be None or an integer >= 1, got {cap!r}")
    if cap is not None and cap < self.faces_per_pixel:
      fail(
        f"max_faces_per_tile ({self.max_faces_per_tile}) must be >= faces_per_pixel "
        f"({self.faces_per_pixel})"
      )
    for name in ("fragment_budget", "tile_budget", "heavy_tile_budget"):
      value = getattr(self, name)
      if value is None and name == "fragment_budget":
        continue
      if not (math.isfinite(value) and 0 < value <= 1):
        fail(f"{name} must be a fraction in (0, 1], got {value!r}")
      object.__setattr__(self, name, float(value))
    if self.face_budget is not None:
      value = self.face_budget
      if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1):
        fail(f"face_budget must be None or a fraction in (0, 1], got {value!r}")
      object.__setattr__(self, "face_budget", float(value))
    try:
      bg = tuple(float(c) for c in self.background)
    except TypeError:
      fail(f"background must be a sequence of floats, got {self.background!r}")
    if not bg:
      fail("background must have at least one channel")
    object.__setattr__(self, "background", bg)
    if not (math.isfinite(self.znear) and self.znear > 0):
      fail(f"znear must be finite and > 0, got {self.znear!r}")
    object.__setattr__(self, "cull_backfaces", bool(self.cull_backfaces))

  @property
  def light_faces_per_tile(self) -> int:
    """Candidates per tile in the first selection pass when ``heavy_tile_budget`` < 1."""
    return max(self.faces_per_pixel, (self.max_faces_per_tile or 128) // 4)

  @property
  def is_hard(self) -> bool:
    """True for step coverage (sigma = 0): colour, depth and face id of the nearest covering
    face."""
    return self.sigma == 0.0

  @classmethod
  def hard(cls, image_size, **kwargs) -> "RasterSettings":
    """Hard rasterization for ground truth and visibility: K = 1, sigma = 0, no blur."""
    kwargs = {"faces_per_pixel": 1, "sigma": 0.0, "blur_radius": 0.0, **kwargs}
    return cls(image_size=image_size, **kwargs)

  def replace(self, **kwargs) -> "RasterSettings":
    """A copy with some fields changed (re-validated; ``blur_radius`` re-derived unless given)."""
    if "sigma" in kwargs and "blur_radius" not in kwargs:
      kwargs["blur_radius"] = None
    return dataclasses.replace(self, **kwargs)
