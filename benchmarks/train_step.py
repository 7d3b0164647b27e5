r"""Throughput of the jitted, data-parallel train step; prints one JSON object.

  python benchmarks/train_step.py     # LiP-Flow: default synthetic config + Multiface size, batch 2
  python benchmarks/train_step.py --cases=synthetic,synthetic_dam,multiface,multiface_dam --steps=20

Per case: samples/s, ms/step, model FLOPs per step (XLA's ``cost_analysis`` of the compiled step),
achieved GFLOP/s, compile time; beside them the machine's measured fp32 matmul GFLOP/s (a 2048^3
``jnp.dot``), the ceiling the step is compared against. Batches are random arrays of the data
contract's shapes (the input pipeline is not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lipflow_jax import config_base, distributed, host_memory
from lipflow_jax.data import input_pipeline, schema
from lipflow_jax.train import tasks as tasks_lib
from lipflow_jax.train import train_state as ts
from lipflow_jax.train import train_step as tstep

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def _config(name: str):
  return config_base.load_config(os.path.join(_CONFIGS, f'{name}.py'))


# Shapes of the default synthetic capture (read from its metadata) and of one Multiface entity.
_SYNTHETIC = dict(num_vertices=None, tex_size=None, keypoint_image_size=None, num_cameras=None)
_MULTIFACE = dict(
  num_vertices=7306, tex_size=1024, keypoint_image_size=(2048, 1334), num_cameras=38
)
CASES = {
  'synthetic': dict(config='lipflow_synthetic', sizes=_SYNTHETIC),
  'synthetic_dam': dict(config='dam_synthetic', sizes=_SYNTHETIC),
  'multiface': dict(config='lipflow_multiface', sizes=_MULTIFACE),
  'multiface_dam': dict(config='dam_multiface', sizes=_MULTIFACE),
}


def random_batch(
  batch_size: int,
  sizes: dict,
  *,
  num_keypoints: int = 68,
  hmc_size: int = 32,
  frontal_size: int = 64,
  seed: int = 0,
) -> dict:
  """A batch of the data contract's shapes: {key: [B, ...] float32 numpy}."""
  r = np.random.RandomState(seed)
  b, t, v = batch_size, sizes['tex_size'], sizes['num_vertices']
  h, w = sizes['keypoint_image_size']
  f32 = lambda *s: r.standard_normal(s).astype(np.float32)
  return dict(
    verts=f32(b, v, 3),
    avg_tex=f32(b, t, t, 3),
    tex=f32(b, t, t, 3),
    tex_mask=(r.rand(b, t, t, 1) > 0.3).astype(np.float32),
    view=f32(b, 3),
    camera_index=r.randint(0, max(1, sizes['num_cameras']), size=(b,)).astype(np.int32),
    keypoints=(r.rand(b, num_keypoints, 2) * np.array([w, h])).astype(np.float32),
    keypoints_visible=np.ones((b, num_keypoints), np.float32),
    hmc=r.rand(b, 3, hmc_size, hmc_size, 1).astype(np.float32),
    image_frontal=r.rand(b, frontal_size, frontal_size, 3).astype(np.float32),
  )


def _default_sizes(config) -> dict:
  """Sizes of the config's dataset, read from its metadata when built, else the synthetic
  default."""
  try:
    ds = config.dataset
    builder = input_pipeline.prepare(ds.name, ds.get('builder_config'), ds.get('data_dir'))
    meta = schema.load_meta(builder)
    source = input_pipeline.open_split(builder, ds.get('train_split', 'train'))
    example = input_pipeline.example_batch(source, meta)
    return tasks_lib.data_sizes(example, meta), example
  except Exception as e:  # pylint: disable=broad-except
    print(
      f'(could not open the dataset: {e!r}; using 64x64 textures and 1000 vertices)',
      file=sys.stderr,
    )
    return dict(
      num_vertices=1000, tex_size=64, keypoint_image_size=(128, 128), num_cameras=16
    ), None


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
  """Measured fp32 GFLOP/s of an n x n x n ``jnp.dot`` on device 0."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    c = dot(a, b)
  c.block_until_ready()
  return 2.0 * n**3 * reps / (time.perf_counter() - t) / 1e9


def bench_case(name: str, batch_size: int, steps: int, warmup: int = 2) -> dict:
  case = CASES[name]
  config = _config(case['config'])
  sizes = dict(case['sizes'])
  example = None
  if sizes['num_vertices'] is None:
    sizes, example = _default_sizes(config)
  if example is not None:  # Real shapes of the condition inputs (hmc, keypoints).
    kw = dict(num_keypoints=example['keypoints'].shape[1], hmc_size=example['hmc'].shape[2])
  else:
    kw = {}
  batch_np = random_batch(batch_size, sizes, **kw)
  if example is not None:
    batch_np['hmc'] = np.broadcast_to(
      example['hmc'][:1], (batch_size,) + example['hmc'].shape[1:]
    ).copy()
  model = tasks_lib.build_model(config.model.to_dict(), sizes)
  task = tasks_lib.avatar_task(model, loss_weights=config.loss.to_dict())
  schedule = ts.make_learning_rate_schedule(config.optimizer.learning_rate, 1000, 10)
  tx = ts.make_optimizer(schedule, clip_norm=config.optimizer.clip_norm)
  mesh = distributed.make_mesh()
  rep = tstep.replicated_sharding(mesh)
  batch = distributed.shard_batch(batch_np, mesh)
  one = jax.tree.map(lambda x: jnp.asarray(x[:1]), batch_np)
  state = jax.jit(
    lambda k: ts.init_train_state(lambda r: task.init_params(r, one), tx, k), out_shardings=rep
  )(jax.random.PRNGKey(0))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  step = tstep.jit_train_step(task.loss_fn, tx, mesh, learning_rate_fn=schedule)
  frozen = {}
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, frozen).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  flops = float(cost.get('flops', float('nan'))) if cost else float('nan')
  for _ in range(warmup):
    state, metrics = compiled(state, batch, frozen)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch, frozen)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  sec = float(np.median(times))
  return dict(
    config=case['config'],
    batch_size=batch_size,
    tex_size=sizes['tex_size'],
    num_vertices=sizes['num_vertices'],
    z_dim=model.z_dim,
    prior=model.prior,
    conditions=list(model.conditions),
    num_params=num_params,
    steps=steps,
    ms_per_step=1e3 * sec,
    ms_per_step_min=1e3 * float(np.min(times)),
    samples_per_s=batch_size / sec,
    flops_per_step=flops,
    gflops_per_s=flops / sec / 1e9,
    compile_s=compile_s,
    loss=float(metrics['loss']),
  )


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    '--cases', default='synthetic,multiface', help='comma-separated from ' + ','.join(CASES)
  )
  p.add_argument(
    '--batch_size', type=int, default=0, help='0: the config batch (synthetic), 2 (multiface)'
  )
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--multiface_steps', type=int, default=3)
  p.add_argument(
    '--malloc_defaults',
    action='store_true',
    help="keep malloc's defaults (no host_memory.retain_freed_memory)",
  )
  args = p.parse_args(argv)
  retained = not args.malloc_defaults and host_memory.retain_freed_memory()
  out = dict(
    retain_freed_memory=retained,
    backend=jax.default_backend(),
    devices=jax.device_count(),
    device_kind=jax.devices()[0].device_kind,
    cpu_count=os.cpu_count(),
    machine=platform.machine(),
    jax_version=jax.__version__,
  )
  out['matmul_fp32_gflops'] = matmul_gflops()
  results = []
  for name in args.cases.split(','):
    if name.startswith('multiface'):
      bs, steps = args.batch_size or 2, args.multiface_steps
    else:
      bs, steps = args.batch_size or _config(CASES[name]['config']).batch_size, args.steps
    r = bench_case(name, bs, steps)
    r['case'] = name
    r['fraction_of_matmul_peak'] = r['gflops_per_s'] / out['matmul_fp32_gflops']
    results.append(r)
    print(json.dumps(r), file=sys.stderr, flush=True)
  out['results'] = results
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
