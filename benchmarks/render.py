"""Throughput of ``lipflow_jax.render.render_mesh``: one JSON line per case.

    python benchmarks/render.py          # 256 and 512 px, 5k and 15k faces, K = 1 (hard), 8 (soft)
    python benchmarks/render.py --quick          # one small case
    python benchmarks/render.py --sizes 512 --faces 15000 --k 1,8 --cull-backfaces \
        --png /tmp/bench.png
    python benchmarks/render.py --crops-only      # the headset crops case only

The mesh is ``lipflow_jax.render.demo.head_mesh`` (a UV sphere shaped like a head, seam vertices
duplicated), its texture ``demo_texture`` at ``--texture`` texels square, seen from 4 units away at
20 degrees azimuth so that it fills most of the image. K = 1 runs in hard mode
(``RasterSettings.hard``), K > 1 in soft mode with the default sigma / gamma. "fwd" times
``render_mesh``; "fwd_bwd" the gradient of a scalar loss of rgb and alpha with respect to the
vertices and the texture. Times are the median (and minimum) of ``--runs`` runs after a warm-up
(compilation excluded), with ``block_until_ready``; the 1-minute load average is reported with them
(on a shared machine, compare runs taken back to back). "compile_s" is the fwd_bwd program's
tracing + XLA compile seconds (``lower().compile()``; mind a persistent compilation cache).

Each case runs with the default settings ("1": ``RasterSettings``' defaults, which size themselves
per call: the fragment budget from a short ladder, no per-tile cap (every candidate tested in
blocks), binning over the faces in view) and with settings measured on the view
("auto": ``render.occupancy`` + 10 %, ``render.fit_budgets``, what a user fitting known views would
set: the budgets, and a per-tile cap that the fullest tile fits in, so that nothing overflows (the
head's poles, where ~100 thin faces meet, need ~110 at 512 px; at K = 1 the cap sizes the chunk
budget of ``select_nearest``, and the view needs less than the default). A "crops" case (skip with
``--no-crops``) mimics HMC fitting (``fit.objectives.render_hmc``): the default synthetic head of
``lipflow_jax.data`` (4,888 faces, 64 x 64 texture) rendered into the synthetic capture's three 32 x
32 headset cameras (left eye, right eye, mouth) with ``fit.loading.hmc_fit_settings`` (hard, 4-pixel
tiles, back faces culled), a batch of 8 frames (expressions), vmapped over frames and cameras;
forward, and forward + backward to the vertices and the texture. Each view case also times a
``--crop`` (32) pixel square window of the same view (the same camera, principal point shifted to
the image centre) with its settings ("crop_*" fields; "crop_*_pct" = crop time / full view time).
``--cull-backfaces`` culls the closed head's back faces, as this repository's own renders do. Check
"overflow" in the JSON: a case with overflow > 0 dropped faces and rendered a (slightly) different
image.

The script first calls ``lipflow_jax.host_memory.retain_freed_memory()`` (as the main job does), so
that calls reuse the memory that earlier calls freed instead of page-faulting it in again (a
quarter of a 512 x 512 forward + backward's time otherwise); ``--malloc-defaults`` skips it, and
each JSON line says which ("retain_freed_memory").

Compare processes, not only runs: on the 2-core CI machines a whole process sometimes runs ~2x
slower than the next one started the same way (every call of it, so its minimum too; memory-bound
ops such as broadcasts and copies up to 10x). Measured on the crops case, 2 to 4 processes in 8 took
~12-15 ms against ~7 ms, whatever the glibc malloc thresholds or ``--xla_cpu_multi_thread_eigen``.
Run a case two or three times and take the faster process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from lipflow_jax import host_memory
from lipflow_jax.data import rig as rig_lib
from lipflow_jax.data import synthetic_head as sh
from lipflow_jax.fit.loading import hmc_fit_settings
from lipflow_jax.geometry import Camera, intrinsics, look_at
from lipflow_jax.render import RasterSettings, fit_budgets, occupancy, render_mesh
from lipflow_jax.render.demo import demo_texture, head_mesh

# The measured occupancy is scaled by this when --budgets auto (10 % headroom).
AUTO_MARGIN = 1.1


def _compiled(fn, *args):
  """(``fn.lower(*args).compile()``, its seconds: tracing + XLA compile)."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _times_ms(fn, *args, runs):
  """(median, min) wall time in ms of ``runs`` calls after a warm-up call (which compiles)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times), 1e3 * min(times)


def _fit(settings, verts, faces, camera):
  """What this view needs, plus a margin (twice: the heavy fraction depends on the cap)."""
  for _ in range(2):
    settings = fit_budgets(
      settings, jax.jit(occupancy, static_argnums=3)(verts, faces, camera, settings), AUTO_MARGIN
    )
  return settings


def _time_render(verts, faces, uvs, uv_faces, texture, camera, settings, runs, seed=0):
  """(forward output, fwd (median, min) ms, fwd + bwd (median, min) ms, fwd + bwd compile s)."""
  h, w = settings.image_size
  weights = jnp.asarray(np.random.default_rng(seed).uniform(size=(h, w, 3)), jnp.float32)
  fwd = jax.jit(lambda v, t: render_mesh(v, faces, uvs, uv_faces, t, camera, settings))

  def loss(v, t):
    out = render_mesh(v, faces, uvs, uv_faces, t, camera, settings)
    return jnp.sum(out.rgb * weights) + jnp.sum(out.alpha)

  fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
  out = fwd(verts, texture)
  fwd_bwd, compile_s = _compiled(fwd_bwd, verts, texture)
  return (
    out,
    _times_ms(fwd, verts, texture, runs=runs),
    _times_ms(fwd_bwd, verts, texture, runs=runs),
    compile_s,
  )


def run_case(
  size,
  num_faces,
  k,
  texture_size,
  runs,
  tile_size=None,
  max_faces_per_tile=None,
  png=None,
  budgets="1",
  cull_backfaces=False,
  crop=32,
):
  mesh = head_mesh(num_faces)
  verts, faces = jnp.asarray(mesh.verts), jnp.asarray(mesh.faces)
  uvs, uv_faces = jnp.asarray(mesh.uvs), jnp.asarray(mesh.uv_faces)
  texture = jnp.asarray(demo_texture(texture_size))
  a = math.radians(20.0)
  camera = Camera(
    K=intrinsics(1.6 * size, (size, size)),
    Rt=look_at((4.0 * math.sin(a), 0.8, 4.0 * math.cos(a)), (0.0, 0.0, 0.0)),
  )
  extra = {}
  if tile_size:
    extra["tile_size"] = tile_size
  if max_faces_per_tile:
    extra["max_faces_per_tile"] = max_faces_per_tile
  extra["cull_backfaces"] = cull_backfaces
  if k == 1:
    settings = RasterSettings.hard((size, size), **extra)
  else:
    settings = RasterSettings((size, size), faces_per_pixel=k, **extra)
  if budgets == "auto":
    settings = _fit(settings, verts, faces, camera)
  elif budgets != "1":
    raise ValueError(f"budgets must be '1' or 'auto', got {budgets!r}")
  out, (fwd_ms, fwd_min), (fwd_bwd_ms, fwd_bwd_min), compile_s = _time_render(
    verts, faces, uvs, uv_faces, texture, camera, settings, runs
  )
  crop_res = {}
  if crop:  # a crop x crop window of the same view (principal point shifted), centred on the face
    k_crop = np.array(camera.K, np.float64)
    k_crop[:2, 2] -= (size - crop) / 2
    crop_cam = Camera(K=jnp.asarray(k_crop, jnp.float32), Rt=camera.Rt)
    crop_settings = settings.replace(image_size=(crop, crop))
    if budgets == "auto":
      crop_settings = _fit(
        crop_settings.replace(fragment_budget=1.0, tile_budget=1.0, heavy_tile_budget=1.0),
        verts,
        faces,
        crop_cam,
      )
    c_out, (c_fwd, _), (c_fwd_bwd, _), _ = _time_render(
      verts, faces, uvs, uv_faces, texture, crop_cam, crop_settings, runs
    )
    crop_res = {
      "crop": crop,
      "crop_fwd_ms": round(c_fwd, 3),
      "crop_fwd_bwd_ms": round(c_fwd_bwd, 3),
      "crop_fwd_pct": round(100 * c_fwd / fwd_ms, 1),
      "crop_fwd_bwd_pct": round(100 * c_fwd_bwd / fwd_bwd_ms, 1),
      "crop_overflow": int(c_out.overflow),
    }
  if png:
    Image.fromarray(np.clip(np.asarray(out.rgb) * 255 + 0.5, 0, 255).astype(np.uint8)).save(png)
  mpix = size * size / 1e6
  return {
    "resolution": size,
    "faces": int(faces.shape[0]),
    "K": k,
    "mode": "hard" if k == 1 else "soft",
    "texture": texture_size,
    "tile_size": settings.tile_size,
    "max_faces_per_tile": settings.max_faces_per_tile,
    "fragment_budget": settings.fragment_budget,
    "tile_budget": settings.tile_budget,
    "heavy_tile_budget": settings.heavy_tile_budget,
    "cull_backfaces": settings.cull_backfaces,
    "fwd_ms": round(fwd_ms, 2),
    "fwd_bwd_ms": round(fwd_bwd_ms, 2),
    "fwd_min_ms": round(fwd_min, 2),
    "fwd_bwd_min_ms": round(fwd_bwd_min, 2),
    "compile_s": round(compile_s, 2),
    "fwd_mpix_per_s": round(mpix / (fwd_ms / 1e3), 2),
    "fwd_bwd_mpix_per_s": round(mpix / (fwd_bwd_ms / 1e3), 2),
    "overflow": int(out.overflow),
    "coverage": round(float(jnp.mean(out.alpha)), 3),
    "face_budget": settings.face_budget,
    **crop_res,
    "device": jax.devices()[0].platform,
    "load_avg_1min": round(os.getloadavg()[0], 2),
    "cpu_count": os.cpu_count(),
  }


def run_crops(runs, frames=8, seed=0):
  """The headset-crops case: 3 cameras x ``frames`` expressions of the default synthetic head."""

  head = sh.make_head()
  hmc_size = (32, 32)
  rig = rig_lib.make_rig(8, (64, 64), (32, 32), hmc_size)
  rng = np.random.default_rng(seed)
  lo = np.array([sh.FACTOR_RANGES[n][0] for n in sh.FACTOR_NAMES], np.float32)
  hi = np.array([sh.FACTOR_RANGES[n][1] for n in sh.FACTOR_NAMES], np.float32)
  factors = jnp.asarray(lo + (hi - lo) * rng.uniform(size=(frames, sh.NUM_FACTORS)), jnp.float32)
  plane = jnp.asarray(head.plane)
  verts = jax.vmap(lambda f: sh.deform(plane, f))(factors)  # [B, V, 3]
  faces, uvs = jnp.asarray(head.faces), jnp.asarray(head.uvs)
  texture = jnp.asarray(rng.uniform(size=(frames, 64, 64, 3)), jnp.float32)
  hmc_k, hmc_rt = jnp.asarray(rig.hmc_K), jnp.asarray(rig.hmc_Rt)
  settings = hmc_fit_settings(hmc_size)
  weights = jnp.asarray(rng.uniform(size=(frames, 3) + hmc_size + (1,)), jnp.float32)

  def render_all(v, t):
    def one(v, t, k, rt):
      out = render_mesh(v, faces, uvs, faces, t, Camera(K=k, Rt=rt), settings)
      return out.rgb.mean(-1, keepdims=True), out.alpha, out.overflow

    per_cam = jax.vmap(one, in_axes=(None, None, 0, 0))
    return jax.vmap(per_cam, in_axes=(0, 0, None, None))(v, t, hmc_k, hmc_rt)

  def loss(v, t):
    grey, alpha, _ = render_all(v, t)
    return jnp.sum(grey * weights) + jnp.sum(alpha)

  fwd = jax.jit(render_all)
  fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
  grey, alpha, overflow = fwd(verts, texture)
  fwd_ms, fwd_min = _times_ms(fwd, verts, texture, runs=runs)
  fwd_bwd, compile_s = _compiled(fwd_bwd, verts, texture)
  fwd_bwd_ms, fwd_bwd_min = _times_ms(fwd_bwd, verts, texture, runs=runs)
  return {
    "case": "hmc_crops",
    "resolution": list(hmc_size),
    "cameras": 3,
    "frames": frames,
    "faces": int(faces.shape[0]),
    "K": settings.faces_per_pixel,
    "tile_size": settings.tile_size,
    "max_faces_per_tile": settings.max_faces_per_tile,
    "cull_backfaces": settings.cull_backfaces,
    "fwd_ms": round(fwd_ms, 2),
    "fwd_bwd_ms": round(fwd_bwd_ms, 2),
    "fwd_min_ms": round(fwd_min, 2),
    "fwd_bwd_min_ms": round(fwd_bwd_min, 2),
    "compile_s": round(compile_s, 2),
    "overflow": int(jnp.max(overflow)),
    "coverage": round(float(jnp.mean(alpha)), 3),
    "device": jax.devices()[0].platform,
    "load_avg_1min": round(os.getloadavg()[0], 2),
    "cpu_count": os.cpu_count(),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ints = lambda s: [int(x) for x in s.split(",")]
  ap.add_argument(
    "--sizes", type=ints, default=[256, 512], help="image sizes (square), comma separated"
  )
  ap.add_argument("--faces", type=ints, default=[5000, 15000], help="approximate face counts")
  ap.add_argument("--k", type=ints, default=[1, 8], help="faces per pixel (1 = hard mode)")
  ap.add_argument("--texture", type=int, default=1024, help="texture size (square)")
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--tile-size", type=int, default=None)
  ap.add_argument("--max-faces-per-tile", type=int, default=None)
  ap.add_argument(
    "--budgets",
    type=lambda v: v.split(","),
    default=["1", "auto"],
    help="comma separated: '1' = RasterSettings' defaults (sized per call), 'auto' = "
    "budgets and max_faces_per_tile from render.occupancy on the view, + 10 %% "
    "(render.fit_budgets)",
  )
  ap.add_argument(
    "--cull-backfaces", action="store_true", help="cull back faces (the head is closed)"
  )
  ap.add_argument(
    "--quick", action="store_true", help="one small case (128 px, 5k faces, K = 1 and 4)"
  )
  ap.add_argument("--png", default=None, help="save the last case's forward image here")
  ap.add_argument("--no-crops", action="store_true", help="skip the headset-crops case")
  ap.add_argument(
    "--crop", type=int, default=32, help="also time a crop x crop window of each view (0: no)"
  )
  ap.add_argument("--crops-only", action="store_true", help="run the headset-crops case only")
  ap.add_argument(
    "--malloc-defaults",
    action="store_true",
    help="keep malloc's defaults (no host_memory.retain_freed_memory)",
  )
  args = ap.parse_args(argv)
  retained = not args.malloc_defaults and host_memory.retain_freed_memory()
  if not args.no_crops:
    print(json.dumps({**run_crops(args.runs), "retain_freed_memory": retained}), flush=True)
  if args.crops_only:
    return
  if args.quick:
    args.sizes, args.faces, args.k, args.texture, args.runs = [128], [5000], [1, 4], 256, 3
  cases = [
    (s, f, k, b) for s in args.sizes for f in args.faces for k in args.k for b in args.budgets
  ]
  for i, (size, faces, k, budgets) in enumerate(cases):
    res = run_case(
      size,
      faces,
      k,
      args.texture,
      args.runs,
      args.tile_size,
      args.max_faces_per_tile,
      png=args.png if i == len(cases) - 1 else None,
      budgets=budgets,
      cull_backfaces=args.cull_backfaces,
      crop=args.crop,
    )
    print(json.dumps({**res, "retain_freed_memory": retained}), flush=True)


if __name__ == "__main__":
  main()
