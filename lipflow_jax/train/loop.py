"""``train_and_evaluate(config, workdir)``: the train loop, in labelled blocks (big_vision style).

  mesh -> input -> model and state -> checkpoint (restore or start) -> update step -> loop
  (step, non-finite check, metrics, images, eval, checkpoint, preemption) -> final checkpoint.

Running it again on the same workdir resumes from the latest checkpoint (same parameters, optimiser
state, RNG and next batch as an uninterrupted run); a finished run returns at once. A newest
checkpoint that cannot be read is renamed ``checkpoints/<step>.damaged`` and the previous step is
restored (``checkpointing.restore``); ``metrics.jsonl`` drops the lines of the steps replayed.

Workdir layout:
  config.json        the resolved config
  model.json         what ``load_trained`` needs to rebuild the model without the data (task, sizes)
  metrics.jsonl      one JSON object per logged step (process 0; each step at most once)
  tensorboard/       TensorBoard event files (process 0)
  checkpoints/<step>/{state, data_iter}
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

from absl import logging
import jax
import ml_collections
from tqdm import auto as tqdm

from lipflow_jax import config_validation, distributed
from lipflow_jax.data import input_pipeline, schema
from lipflow_jax.train import checkpointing, metrics_logging
from lipflow_jax.train import tasks as tasks_lib
from lipflow_jax.train import train_state as ts
from lipflow_jax.train import train_step as tstep

MODEL_FILE = checkpointing.MODEL_FILE
CHECKPOINT_DIR = checkpointing.CHECKPOINT_DIR


def _announce(msg: str):
  """Logs ``msg``; also prints it on process 0 when INFO logs are hidden (e.g.
  ``--verbosity=-1``)."""
  logging.info(msg)
  if jax.process_index() == 0 and logging.get_verbosity() < logging.INFO:
    print(msg, flush=True)


class NonFiniteLossError(FloatingPointError):
  """Raised when more than ``max_consecutive_nonfinite`` steps in a row had a non-finite loss or
  gradient."""


@dataclasses.dataclass
class RunResult:
  """What ``train_and_evaluate`` returns: the final state (on the mesh), last logged metrics and
  why it stopped."""

  state: Any
  step: int
  metrics: dict
  stopped: str  # 'finished' | 'already_finished' | 'preempted'


def _to_plain(x):
  if isinstance(x, ml_collections.ConfigDict):
    x = x.to_dict()
  if isinstance(x, dict):
    return {k: _to_plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_plain(v) for v in x]
  return x


# ------------------------------------------------------------------------------------ building the
# task
def build_task(config, sizes: dict, meta=None) -> tuple[tasks_lib.Task, dict]:
  """The ``Task`` of ``config.task`` and its ``model.json`` description (plain values only)."""
  kind = config.get('task', 'avatar')
  if kind == 'avatar':
    model = tasks_lib.build_model(_to_plain(config.model), sizes)
    task = tasks_lib.avatar_task(
      model,
      loss_weights=_to_plain(config.loss),
      meta=meta,
      render_images=config.get('render_images', True),
      hmc_examples=config.get('hmc_loss_examples'),
    )
    description = {'task': 'avatar', 'model': _module_fields(model)}
  elif kind == 'regressor':
    if not config.get('teacher_workdir'):
      raise ValueError(
        'config.teacher_workdir must name the workdir of a trained DAM for task=regressor'
      )
    teacher = checkpointing.load_trained(config.teacher_workdir)
    if teacher.kind != 'avatar':
      raise ValueError(
        f'teacher_workdir {config.teacher_workdir} holds a {teacher.kind!r} run, not a model'
      )
    conditions = tuple(config.regressor.conditions)
    reg_config = {k: v for k, v in _to_plain(config.regressor).items() if k != 'conditions'}
    task = tasks_lib.regressor_task(
      conditions, reg_config, teacher.model, teacher.params, sizes, meta=meta
    )
    description = {
      'task': 'regressor',
      'conditions': list(conditions),
      'regressors': {c: _module_fields(m) for c, m in task.model.items()},
      'teacher_workdir': os.path.abspath(config.teacher_workdir),
      'teacher_step': teacher.step,
      'teacher_model': _module_fields(teacher.model),
    }
  else:
    raise ValueError(f"config.task must be 'avatar' or 'regressor', got {kind!r}")
  aug = config.get('augment')
  if aug is not None:
    task = tasks_lib.with_keypoint_augmentation(
      task, float(aug.get('keypoint_noise_px', 0.0)), float(aug.get('keypoint_dropout', 0.0))
    )
  return task, description


def _module_fields(module) -> dict:
  names = [f.name for f in dataclasses.fields(module) if f.name not in ('parent', 'name')]
  return _to_plain({n: getattr(module, n) for n in names})


# ------------------------------------------------------------------------------------ jitted
# functions
@dataclasses.dataclass(frozen=True)
class _Functions:
  init: Any  # (rng, example batch) -> TrainState (replicated)
  train_step: Any  # (state, batch, frozen) -> (state, metrics)
  eval_step: Any  # (params, frozen, batch, rng) -> metrics
  images: Any  # (params, frozen, batch) -> {name: [H, W, 3]}, or None


def _make_functions(task: tasks_lib.Task, tx, schedule, mesh) -> _Functions:
  rep = tstep.replicated_sharding(mesh)
  init = jax.jit(
    lambda rng, example: ts.init_train_state(lambda k: task.init_params(k, example), tx, rng),
    out_shardings=rep,
  )
  return _Functions(
    init=init,
    train_step=tstep.jit_train_step(task.loss_fn, tx, mesh, learning_rate_fn=schedule),
    eval_step=tstep.jit_eval_step(task.loss_fn, mesh),
    images=None if task.images_fn is None else jax.jit(task.images_fn, out_shardings=rep),
  )


# Jitted functions of recent runs in this process, keyed by everything that shapes them (model,
# loss, optimiser, schedule, data, mesh), so that a run restarted in the same process (tests,
# notebooks) reuses their compiled executables instead of compiling again.
_FUNCTION_CACHE: dict = {}
_FUNCTION_CACHE_SIZE = 4


def _cached_functions(key: str, make) -> _Functions:
  if key in _FUNCTION_CACHE:
    _FUNCTION_CACHE[key] = _FUNCTION_CACHE.pop(key)  # most recently used last
    return _FUNCTION_CACHE[key]
  fns = make()
  _FUNCTION_CACHE[key] = fns
  while len(_FUNCTION_CACHE) > _FUNCTION_CACHE_SIZE:
    _FUNCTION_CACHE.pop(next(iter(_FUNCTION_CACHE)))
  return fns


# ------------------------------------------------------------------------------------ the loop
def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, stop_after: Optional[int] = None
) -> RunResult:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints).

  Args:
    config: the experiment config (see ``configs/common.py``).
    workdir: output directory.
    stop_after: stop (with a checkpoint) once this many steps are done, as if preempted (tests,
      budgets).
  Returns:
    ``RunResult``.
  """
  config_validation.validate_config(config)  # ConfigError naming each bad key
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()

  # ----------------------------------------------------------------------------------------------
  # mesh
  mesh = distributed.make_mesh(num_devices=config.get('num_devices'))
  num_devices = mesh.devices.size
  if config.batch_size % num_devices:
    raise ValueError(
      f'batch_size {config.batch_size} is not divisible by the {num_devices} devices'
    )
  local_batch_size = config.batch_size // jax.process_count()
  logging.info(
    'Mesh %s over %d devices, %d processes; global batch %d, per process %d.',
    dict(mesh.shape),
    num_devices,
    jax.process_count(),
    config.batch_size,
    local_batch_size,
  )

  # ----------------------------------------------------------------------------------------------
  # input
  ds = config.dataset
  builder = input_pipeline.prepare(
    ds.name,
    ds.get('builder_config'),
    ds.get('data_dir'),
    _to_plain(ds.get('builder_kwargs')) or None,
  )
  meta = schema.load_meta(builder)
  train_split = ds.get('train_split', 'train')
  train_source = input_pipeline.open_split(builder, train_split)
  train_iter = input_pipeline.make_iterator(
    train_source,
    meta,
    batch_size=local_batch_size,
    seed=config.seed,
    shuffle=True,
    num_epochs=None,
    split=train_split,
    cameras=meta.train_cameras,
    worker_count=ds.get('worker_count', 0),
  )
  example = input_pipeline.example_batch(train_source, meta, batch_size=1)

  # ----------------------------------------------------------------------------------------------
  # model and state
  sizes = tasks_lib.data_sizes(example, meta)
  task, description = build_task(config, sizes, meta)
  opt = config.optimizer
  schedule = ts.make_learning_rate_schedule(
    opt.learning_rate,
    config.num_train_steps,
    opt.get('warmup_steps', 0),
    opt.get('decay', 'cosine'),
    opt.get('end_factor', 0.0),
  )
  tx = ts.make_optimizer(
    schedule,
    clip_norm=opt.get('clip_norm'),
    b1=opt.get('b1', 0.9),
    b2=opt.get('b2', 0.999),
    eps=opt.get('eps', 1e-8),
    weight_decay=opt.get('weight_decay', 0.0),
  )
  rep = tstep.replicated_sharding(mesh)
  cache_key = json.dumps(
    dict(
      description=description,
      loss=_to_plain(config.get('loss')),
      optimizer=_to_plain(opt),
      num_train_steps=config.num_train_steps,
      dataset=_to_plain(ds),
      seed=config.seed,
      mesh=[d.id for d in mesh.devices.flat],
    ),
    sort_keys=True,
    default=str,
  )
  fns = _cached_functions(cache_key, lambda: _make_functions(task, tx, schedule, mesh))
  state_shapes = jax.eval_shape(fns.init, jax.random.PRNGKey(config.seed), example)
  frozen = jax.device_put(task.frozen, rep)

  # ----------------------------------------------------------------------------------------------
  # checkpoint
  manager = checkpointing.make_checkpoint_manager(
    os.path.join(workdir, CHECKPOINT_DIR),
    save_every=config.checkpoint_every,
    keep=config.get('keep_checkpoints', 3),
    async_save=config.get('async_checkpoints', True),
  )
  abstract_state = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), state_shapes
  )
  try:
    state, start_step = checkpointing.restore(manager, abstract_state, train_iter)
  except BaseException:
    manager.close()  # an open async manager turns the error into shutdown noise
    raise
  if state is None:
    state = fns.init(jax.random.PRNGKey(config.seed), example)
    start_step = 0
    _announce(f'Starting a new run in {workdir}.')
  else:
    _announce(f'Resumed from the checkpoint of step {start_step} in {workdir}.')
  if jax.process_index() == 0:
    metrics_logging.dump_config(config, workdir)
    with open(os.path.join(workdir, MODEL_FILE), 'w') as f:
      json.dump(description, f, indent=2, sort_keys=True)
  total_steps = int(config.num_train_steps)
  if start_step >= total_steps:
    _announce(
      f'Run in {workdir} already finished ({start_step}/{total_steps} steps); nothing to do.'
    )
    manager.close()
    return RunResult(state=state, step=start_step, metrics={}, stopped='already_finished')

  # ----------------------------------------------------------------------------------------------
  # update step
  train_step, eval_step, images_fn = fns.train_step, fns.eval_step, fns.images
  writer = metrics_logging.MetricWriter(workdir, start_step=start_step)
  watcher = checkpointing.PreemptionWatcher(manager)
  max_nonfinite = int(config.get('max_consecutive_nonfinite', 10))
  # The consecutive-non-finite counter is read one step late, so that the host never waits for the
  # step it has just dispatched.
  consecutive = int(jax.device_get(state.nonfinite_consecutive))
  history: list = []
  last_logged: dict = {}
  stopped = 'finished'
  progress = _progress_bar(total_steps, start_step, config)
  t_log, step_log = time.time(), start_step

  def check_nonfinite(step_done: int, metrics) -> int:
    """Updates the host counter from ``metrics`` of step ``step_done`` and raises past the limit."""
    nonlocal consecutive
    skipped = float(jax.device_get(metrics['skipped']))
    consecutive = consecutive + 1 if skipped > 0 else 0
    if skipped > 0:
      logging.warning(
        'Step %d: non-finite loss or gradient, update skipped (%d in a row).',
        step_done,
        consecutive,
      )
    if consecutive > max_nonfinite:
      raise NonFiniteLossError(
        f'Stopping at step {step_done}: the loss or gradient was non-finite for {consecutive} '
        'consecutive '
        f'steps (steps {step_done - consecutive + 1}..{step_done}), more than '
        'max_consecutive_nonfinite='
        f'{max_nonfinite}. The last checkpoint in {workdir}/{CHECKPOINT_DIR} is from before the '
        'divergence; '
        'lower the learning rate or check the data.'
      )
    return consecutive

  # ----------------------------------------------------------------------------------------------
  # loop
  pending = None  # (step, metrics) of the last dispatched step, not yet checked
  step = start_step
  try:
    while step < total_steps:
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        local = next(train_iter)
        batch = distributed.shard_batch(local, mesh)
        state, metrics = train_step(state, batch, frozen)
      if pending is not None:
        check_nonfinite(*pending)
      pending = (step + 1, metrics)
      step += 1
      history.append(metrics)
      if progress is not None:
        progress.update(1)

      if step % config.log_every == 0 or step == total_steps:
        check_nonfinite(*pending)
        pending = None
        summary = metrics_logging.mean_metrics(jax.device_get(history))
        summary['nonfinite_total'] = float(jax.device_get(state.nonfinite_total))
        summary['nonfinite_consecutive'] = float(consecutive)
        now = time.time()
        summary['steps_per_sec'] = (step - step_log) / max(now - t_log, 1e-9)
        summary['examples_per_sec'] = summary['steps_per_sec'] * config.batch_size
        t_log, step_log = now, step
        writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
        last_logged = summary
        history = []
        if progress is not None:
          progress.set_postfix(loss=f"{summary.get('loss', float('nan')):.4g}", refresh=False)

      if (
        images_fn is not None
        and config.get('image_every', 0)
        and (step % config.image_every == 0 or step == total_steps)
      ):
        images = jax.device_get(images_fn(state.params, frozen, batch))
        writer.write_images(step, images)

      if config.get('eval_every', 0) and (step % config.eval_every == 0 or step == total_steps):
        eval_metrics = _evaluate(
          config, builder, meta, mesh, eval_step, state.params, frozen, local_batch_size
        )
        if eval_metrics:
          writer.write_scalars(step, {f'eval/{k}': v for k, v in eval_metrics.items()})

      # Checkpoint: asked every step on every process; the manager saves every `checkpoint_every`
      # steps.
      checkpointing.save(manager, step, state, train_iter)
      if (stop_after is not None and step >= stop_after) or watcher.should_stop(step):
        stopped = 'preempted'
        break
    if pending is not None:
      check_nonfinite(*pending)
    if manager.latest_step() != step:
      checkpointing.save(manager, step, state, train_iter, force=True)
    if progress is not None:
      progress.close()
      progress = None
    if stopped == 'preempted':
      logging.warning('Stopped at step %d (preemption or stop request); checkpoint saved.', step)
    else:
      _announce(
        f'Finished {step} steps in {time.time() - t_start:.1f} s; last checkpoint: step {step}.'
      )
  finally:
    manager.wait_until_finished()
    manager.close()
    watcher.close()
    writer.flush()
    writer.close()
    if progress is not None:
      progress.close()
  return RunResult(state=state, step=step, metrics=last_logged, stopped=stopped)


def _progress_bar(total: int, initial: int, config):
  if jax.process_index() != 0 or not config.get('progress_bar', True):
    return None
  return tqdm.tqdm(total=total, initial=initial, desc='train', unit='step', dynamic_ncols=True)


def _evaluate(config, builder, meta, mesh, eval_step, params, frozen, local_batch_size) -> dict:
  """Mean loss metrics over up to ``config.eval_batches`` batches of the eval split (fixed key)."""
  split = config.dataset.get('eval_split')
  if not split:
    return {}
  try:
    source = input_pipeline.open_split(builder, split)
  except (KeyError, ValueError) as e:
    logging.warning('No eval split %r (%s); skipping evaluation.', split, e)
    return {}
  # Every process must run the same number of (collective) eval steps: at most the batches the
  # smallest process shard holds.
  num_batches = min(int(config.get('eval_batches', 4)), len(source) // config.batch_size)
  it = input_pipeline.make_iterator(
    source,
    meta,
    batch_size=local_batch_size,
    seed=config.seed,
    shuffle=False,
    num_epochs=1,
    split=split,
  )
  rng = jax.random.PRNGKey(config.seed + 1)
  out = []
  for _, local in zip(range(num_batches), it):
    out.append(jax.device_get(eval_step(params, frozen, distributed.shard_batch(local, mesh), rng)))
  return metrics_logging.mean_metrics(out)
