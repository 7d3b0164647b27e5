r"""Latent fitting throughput: frames/s and ms/frame of the jitted, vmapped fit for keypoints and
HMC inputs at a few batch sizes and step counts, and the same optimisation run step by step without
jit.

  python benchmarks/fit.py                  # prints JSON
  python benchmarks/fit.py --quick          # fewer configurations
  python benchmarks/fit.py --stream_only    # the streaming cases only

The streaming case ("mode": "stream") follows a smooth sequence of frames at batch 1 with
``fit.stream_step_fn`` (a few warm-started Adam steps a frame) and reports per-frame latency p50 /
p95 and the geometry error to the true codes, next to the full per-frame fit of the same frames.

The model is a randomly initialised ``LipFlowModel`` at the CPU default size
(lipflow_jax/config_base.py) on the synthetic head's mesh and rig; codes are fitted to observations
made from known codes. Compilation is done ahead of time and excluded from the timings (reported
separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from lipflow_jax import data, fit, geometry, host_memory, models
from lipflow_jax.data import rig as rig_lib
from lipflow_jax.data import synthetic_head as sh


def make_problem(batch: int, seed: int = 0, z_dim: int = 64, tex_size: int = 64, sequence=False):
  """A random LiP-Flow bundle on the synthetic head and observations of ``batch`` known codes
  (independent ones, or with ``sequence`` a smooth path through three random codes, as a stream of
  frames)."""
  head = sh.make_head()
  verts0 = np.asarray(
    sh.deform(jnp.asarray(head.plane), jnp.asarray(sh.neutral_factors())), np.float32
  )
  rig = rig_lib.make_rig(40, (80, 80), (128, 128), (32, 32))
  v = verts0.shape[0]
  model = models.LipFlowModel(
    num_vertices=v,
    z_dim=z_dim,
    tex_size=tex_size,
    prior="lipflow",
    conditions=("keypoints", "hmc"),
    keypoint_image_size=(128, 128),
  )
  p = len(head.keypoint_vertex_ids)
  dummy = {
    "avg_tex": jnp.zeros((1, tex_size, tex_size, 3)),
    "verts": jnp.zeros((1, v, 3)),
    "view": jnp.array([[0.0, 0.0, 1.0]]),
    "keypoints": jnp.zeros((1, p, 2)),
    "keypoints_visible": jnp.ones((1, p)),
    "hmc": jnp.zeros((1, 3, 32, 32, 1)),
  }
  variables = model.init(
    {"params": jax.random.PRNGKey(seed), "sample": jax.random.PRNGKey(seed + 1)}, dummy
  )
  meta = data.MeshMeta(
    faces=jnp.asarray(head.faces),
    uvs=jnp.asarray(head.uvs),
    uv_faces=jnp.asarray(head.faces),
    keypoint_vertex_ids=jnp.asarray(head.keypoint_vertex_ids),
    vert_mean=jnp.asarray(verts0),
    vert_std=jnp.float32(5.0),
    tex_mean=jnp.full((tex_size, tex_size, 3), 128.0),
    tex_std=jnp.float32(40.0),
  )
  bundle = fit.ModelBundle(
    model=model,
    variables=variables,
    meta=meta,
    prior="lipflow",
    latent_dim=z_dim,
    hmc_settings=fit.hmc_fit_settings((32, 32)),
  )
  z_true = 0.5 * jax.random.normal(jax.random.PRNGKey(seed + 2), (batch, z_dim))
  if sequence:
    keys = 0.5 * jax.random.normal(jax.random.PRNGKey(seed + 2), (3, z_dim))
    t = jnp.linspace(0.0, 2.0, batch)[:, None]
    w = jnp.clip(1.0 - jnp.abs(t - jnp.arange(3.0)), 0.0, 1.0)  # piecewise-linear path
    z_true = w @ keys
  fK, fRt = jnp.asarray(rig.frontal_K), jnp.asarray(rig.frontal_Rt)
  camera = geometry.Camera(K=fK, Rt=fRt)
  kps = jax.jit(jax.vmap(lambda z: fit.project_keypoints(bundle, z, camera)))(z_true)
  hK, hRt = jnp.asarray(rig.hmc_K), jnp.asarray(rig.hmc_Rt)
  hmc, alpha = jax.jit(jax.vmap(lambda z: fit.render_hmc(bundle, z, hK, hRt)))(z_true)
  b = lambda x: jnp.broadcast_to(x, (batch,) + x.shape)
  obs = {
    "keypoints": kps,
    "keypoints_visible": jnp.ones((batch, p)),
    "frontal_K": b(fK),
    "frontal_Rt": b(fRt),
    "hmc": hmc,
    "hmc_mask": alpha,
    "hmc_K": b(hK),
    "hmc_Rt": b(hRt),
  }
  return bundle, obs, z_true


def stream_case(inp: str, frames: int, steps: int, full_steps: int):
  """Streaming (batch 1, ``steps`` Adam steps a frame, warm-started) against the full per-frame fit
  (``full_steps`` from the prior mode) of the same frames: per-frame latency and geometry error."""
  bundle, obs, z_true = make_problem(frames, sequence=True)
  cfg = fit.fit_config("lipflow_fit", inp, lr=0.05, lambda_prior=0.01)
  step = fit.stream_step_fn(cfg, steps)
  frame = lambda i: jax.tree_util.tree_map(lambda x: x[i], obs)
  state = fit.stream_init(bundle, cfg)
  t0 = time.perf_counter()
  jax.block_until_ready(step(bundle, state, frame(0)))
  compile_s = time.perf_counter() - t0
  latency, codes = [], []
  for i in range(frames):
    f = frame(i)
    t0 = time.perf_counter()
    state = jax.block_until_ready(step(bundle, state, f))
    latency.append(1e3 * (time.perf_counter() - t0))
    codes.append(state.z)
  full_cfg = fit.fit_config("lipflow_fit", inp, num_steps=full_steps, lr=0.05, lambda_prior=0.01)
  one = jax.tree_util.tree_map(lambda x: x[:1], obs)
  compiled = fit.fit_jit.lower(bundle, one, None, cfg=full_cfg).compile()
  full_ms, full_codes = [], []
  for i in range(frames):
    f = jax.tree_util.tree_map(lambda x, i=i: x[i : i + 1], obs)
    t0 = time.perf_counter()
    res = jax.block_until_ready(compiled(bundle, f, None))
    full_ms.append(1e3 * (time.perf_counter() - t0))
    full_codes.append(res.z[0])
  verts = jax.jit(jax.vmap(lambda z: fit.decode_verts(bundle, z)))
  truth = verts(z_true)
  err = lambda zs: float(jnp.mean(jnp.linalg.norm(verts(jnp.stack(zs)) - truth, axis=-1)))
  pct = lambda ms: {q: float(np.percentile(ms, v)) for q, v in (("p50", 50), ("p95", 95))}
  return dict(
    input=inp,
    method="lipflow_fit",
    mode="stream",
    frames=frames,
    steps=steps,
    latency_ms=pct(latency),
    compile_s=compile_s,
    geometry_error=err(codes),
    full_fit=dict(steps=full_steps, latency_ms=pct(full_ms), geometry_error=err(full_codes)),
  )


def time_jitted(bundle, obs, cfg, repeats: int = 2):
  """(compile seconds, best run seconds) of the jitted vmapped fit."""
  t0 = time.perf_counter()
  compiled = fit.fit_jit.lower(bundle, obs, None, cfg=cfg).compile()
  t_compile = time.perf_counter() - t0
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(bundle, obs, None))
    best = min(best, time.perf_counter() - t0)
  return t_compile, best


def time_unjitted(bundle, obs, cfg):
  """Seconds of ``fit.fit_unjitted`` (step by step, frame by frame, no jit), after one warm-up
  step."""
  one = jax.tree_util.tree_map(lambda x: x[:1], obs)
  fit.fit_unjitted(bundle, one, cfg.__class__(**{**cfg.__dict__, "num_steps": 1}))
  t0 = time.perf_counter()
  jax.block_until_ready(fit.fit_unjitted(bundle, obs, cfg).z)
  return time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer configurations")
  # The stream's steps a frame default to the main job's (configs/demo.py, config.drive.steps).
  parser.add_argument(
    "--stream_steps", type=int, default=30, help="Adam steps a streamed keypoint frame"
  )
  parser.add_argument(
    "--stream_steps_hmc", type=int, default=1, help="Adam steps a streamed headset frame"
  )
  parser.add_argument("--stream_only", action="store_true", help="only the streaming cases")
  parser.add_argument(
    "--malloc_defaults",
    action="store_true",
    help="keep malloc's defaults (no host_memory.retain_freed_memory)",
  )
  args = parser.parse_args()
  retained = not args.malloc_defaults and host_memory.retain_freed_memory()
  if args.quick:
    grid = {"keypoints": [(8, 50)], "hmc": [(2, 10)]}
    nojit = {"keypoints": (1, 10), "hmc": (1, 3)}
  else:
    grid = {
      "keypoints": [(1, 200), (8, 200), (32, 200), (32, 50)],
      "hmc": [(1, 60), (8, 60), (8, 20)],
    }
    nojit = {"keypoints": (1, 20), "hmc": (1, 5)}
  max_batch = max(b for v in grid.values() for b, _ in v)
  # (--stream_only: the streaming cases build their own problem; this one gives the model's sizes)
  bundle, obs_all, _ = make_problem(1 if args.stream_only else max_batch)
  results = []
  for inp, configs in ({} if args.stream_only else grid).items():
    for method in ("dam_fit", "lipflow_fit"):
      for batch, steps in configs:
        obs = jax.tree_util.tree_map(lambda x, n=batch: x[:n], obs_all)
        cfg = fit.fit_config(method, inp, num_steps=steps, lr=0.05, lambda_prior=0.01)
        t_compile, t = time_jitted(bundle, obs, cfg)
        results.append(
          dict(
            input=inp,
            method=method,
            mode="jit+vmap+scan",
            batch=batch,
            steps=steps,
            frames_per_s=batch / t,
            ms_per_frame=1000 * t / batch,
            ms_per_frame_step=1000 * t / batch / steps,
            compile_s=t_compile,
          )
        )
      batch, steps = nojit[inp]
      obs = jax.tree_util.tree_map(lambda x, n=batch: x[:n], obs_all)
      cfg = fit.fit_config(method, inp, num_steps=steps, lr=0.05, lambda_prior=0.01)
      t = time_unjitted(bundle, obs, cfg)
      results.append(
        dict(
          input=inp,
          method=method,
          mode="no jit, step by step",
          batch=batch,
          steps=steps,
          frames_per_s=batch / t,
          ms_per_frame=1000 * t / batch,
          ms_per_frame_step=1000 * t / batch / steps,
          compile_s=0.0,
        )
      )
  frames = 8 if args.quick else 32
  for inp, steps, full_steps in (
    ("keypoints", args.stream_steps, 200),
    ("hmc", args.stream_steps_hmc, 40),
  ):
    results.append(stream_case(inp, frames, steps, full_steps))
  out = {
    "benchmark": "fit",
    "backend": jax.default_backend(),
    "devices": len(jax.devices()),
    "cpu_count": os.cpu_count(),
    "machine": platform.machine(),
    "jax": jax.__version__,
    "retain_freed_memory": retained,
    "model": {
      "z_dim": bundle.latent_dim,
      "num_vertices": int(bundle.meta.vert_mean.shape[0]),
      "num_faces": int(bundle.meta.faces.shape[0]),
      "hmc_size": [32, 32],
      "prior": "lipflow (spline)",
    },
    "results": results,
  }
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
