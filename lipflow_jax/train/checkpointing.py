"""Checkpoints: one orbax ``CheckpointManager`` with two composite items per step.

    <workdir>/checkpoints/<step>/state/      the ``TrainState`` (StandardSave: params, optimiser,
                                             step, rng, counters)
    <workdir>/checkpoints/<step>/data_iter/  process_<i>-of-<n>.json, each process's iterator state

Saving is asked on every step on every process; the manager decides (every ``save_every`` steps, on
orbax's preemption detection in multi-process jobs, or when forced, e.g. after SIGTERM). A restored
run continues the same run: same parameters, optimiser moments, RNG and next batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from typing import Any, Optional

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from lipflow_jax import distributed, models
from lipflow_jax.train.metrics_logging import CONFIG_FILE

STATE = 'state'
DATA_ITER = 'data_iter'


# ------------------------------------------------------------------------------------ data iterator
# item
class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves ``iterator.get_state()`` of each process as JSON (dict states, or bytes states such as
  grain's ``DataLoaderIterator``), one file per process; restores with ``iterator.set_state``."""

  def _filename(self, directory: epath.Path) -> epath.Path:
    return directory / f'process_{jax.process_index()}-of-{jax.process_count()}.json'

  def save(self, directory: epath.Path, args: 'DataIteratorSave'):
    state = args.item.get_state()
    if isinstance(state, (bytes, bytearray)):
      payload = {'kind': 'bytes', 'state': bytes(state).decode()}
    else:
      payload = {'kind': 'json', 'state': state}
    directory.mkdir(parents=True, exist_ok=True)
    self._filename(directory).write_text(json.dumps(payload, indent=1))

  def restore(self, directory: epath.Path, args: 'DataIteratorRestore'):
    filename = self._filename(directory)
    if not filename.exists():
      raise FileNotFoundError(
        f'{filename} does not exist (checkpoint written by a different process count?)'
      )
    payload = json.loads(filename.read_text())
    state = payload['state'].encode() if payload['kind'] == 'bytes' else payload['state']
    args.item.set_state(state)
    return args.item

  def metadata(self, directory: epath.Path):
    del directory
    return None

  def structure(self, directory: epath.Path):
    del directory
    return None

  def finalize(self, directory: epath.Path):
    del directory

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f'{cls.__module__}.{cls.__qualname__}'


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  item: Any


# ------------------------------------------------------------------------------------ manager
def make_checkpoint_manager(
  directory: str, *, save_every: int, keep: int | None = 3, async_save: bool = True
) -> ocp.CheckpointManager:
  """A manager saving every ``save_every`` steps and keeping the last ``keep``."""
  # Every `save_every` steps and on preemption (multi-process jobs); no extra save at the first
  # step.
  policy = ocp.checkpoint_managers.AnySavePolicy(
    [
      ocp.checkpoint_managers.FixedIntervalPolicy(max(1, int(save_every))),
      ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=True,
    enable_async_checkpointing=async_save,
    save_decision_policy=policy,
  )
  return ocp.CheckpointManager(
    epath.Path(directory), options=options, item_names=(STATE, DATA_ITER)
  )


def save(
  manager: ocp.CheckpointManager, step: int, state, data_iter=None, *, force: bool = False
) -> bool:
  """Asks the manager to save ``state`` (and the iterator) as ``step``. Returns whether a save
  started."""
  items = {STATE: ocp.args.StandardSave(state)}
  if data_iter is not None:
    items[DATA_ITER] = DataIteratorSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


class CheckpointRestoreError(RuntimeError):
  """No step of a checkpoint directory could be read; the message lists the steps tried."""


DAMAGED_SUFFIX = '.damaged'  # a step that cannot be read is renamed <step>.damaged (never deleted)


def _step_dir(directory, step: int) -> epath.Path:
  return epath.Path(directory) / str(step)


def move_aside(path) -> epath.Path:
  """Renames a damaged step directory to ``<step>.damaged`` (``.damaged.2``, ... if taken)."""
  path = epath.Path(path)
  target = path.parent / (path.name + DAMAGED_SUFFIX)
  n = 1
  while target.exists():
    n += 1
    target = path.parent / f'{path.name}{DAMAGED_SUFFIX}.{n}'
  path.rename(target)
  return target


def _summary(error: BaseException, limit: int = 240) -> str:
  """One short line for a restore error (orbax/tensorstore messages carry whole specs)."""
  parts = []
  while error is not None and len(parts) < 2:
    line = (str(error).strip().splitlines() or [''])[0]
    for cut in (' See full TensorStore details', ' [tensorstore_spec', ' [source locations'):
      line = line.split(cut)[0]
    parts.append(f'{type(error).__name__}: {line}')
    error = error.__cause__
  return ' <- '.join(parts)[:limit]


def _first_readable(directory, steps, restore_one):
  """Calls ``restore_one(step)`` from the newest of ``steps`` down until one succeeds.

  Returns:
    (result, step, [(damaged step, error)]) of the newest readable step and the newer ones that
    failed. Raises ``CheckpointRestoreError`` listing every step tried when none can be read.
  """
  failed = []
  for step in sorted(steps, reverse=True):
    try:
      return restore_one(step), step, failed
    except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise plain Exception, too)
      summary = _summary(e)
      logging.warning('Checkpoint %s cannot be read: %s', _step_dir(directory, step), summary)
      failed.append((step, summary))
  tried = '; '.join(f'step {s} ({msg})' for s, msg in failed)
  raise CheckpointRestoreError(
    f'no readable checkpoint in {directory}: tried {tried}. Nothing was moved or deleted; if the '
    'config changed since these were written, restore it, else move the damaged steps away.'
  )


def restore(
  manager: ocp.CheckpointManager, state_template, data_iter=None, step: int | None = None
):
  """Restores the latest readable (or the given) step into the shardings and dtypes of
  ``state_template``.

  A newest step that cannot be read (missing or truncated array file, missing manifest, missing
  iterator state) is renamed ``<step>.damaged`` beside the others, with a warning, and the previous
  step is restored instead. Damaged steps are moved only once an older step has been read, so a
  config that no longer matches any checkpoint moves nothing.

  Args:
    state_template: a ``TrainState`` of arrays or ``jax.ShapeDtypeStruct`` s carrying the target
      shardings.
    data_iter: restored in place (``set_state``) when given.
  Returns:
    (state, step), or (None, None) when the directory holds no checkpoint.
  Raises:
    CheckpointRestoreError: no step can be read (the message lists the steps tried).
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)

  def restore_one(s):
    items = {STATE: ocp.args.StandardRestore(abstract)}
    if data_iter is not None:
      items[DATA_ITER] = DataIteratorRestore(data_iter)
    return manager.restore(s, args=ocp.args.Composite(**items))[STATE]

  if step is not None:
    return restore_one(step), step
  steps = list(manager.all_steps())
  if not steps:
    return None, None
  state, step, failed = _first_readable(manager.directory, steps, restore_one)
  if failed:
    if jax.process_index() == 0:
      for s, msg in failed:
        aside = move_aside(_step_dir(manager.directory, s))
        logging.warning(
          'Checkpoint step %d in %s is damaged (%s); moved it to %s and resumed from step %d.',
          s,
          _step_dir(manager.directory, s),
          msg,
          aside,
          step,
        )
    distributed.sync('checkpoint_fallback')
    manager.reload()
  return state, step


def _saved_steps(directory: epath.Path) -> list[int]:
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def restore_state_for_inference(directory: str, step: int | None = None, sharding=None):
  """Restores the saved ``TrainState`` of ``directory/<step>`` (the newest readable one when None)
  as a plain dict, without a template and whatever topology it was saved on; every array is placed
  with ``sharding`` (default: device 0). A newest step that cannot be read is skipped with a
  warning (left in place: readers do not move a run's files).

  Returns:
    ({'params', 'opt_state', 'step', 'rng', ...}, step).
  """
  directory = epath.Path(directory)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  is_leaf = lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype')

  def restore_one(s):
    path = directory / str(s) / STATE
    handler = ocp.StandardCheckpointHandler()
    try:
      metadata = handler.metadata(path)
      abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
        metadata,
        is_leaf=is_leaf,
      )
      return handler.restore(path, args=ocp.args.StandardRestore(abstract))
    finally:
      handler.close()

  if step is not None:
    return restore_one(step), int(step)
  steps = _saved_steps(directory)
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {directory}')
  state, step, failed = _first_readable(directory, steps, restore_one)
  if failed:
    logging.warning(
      'Loaded step %d of %s; newer damaged steps %s were skipped.',
      step,
      directory,
      [s for s, _ in failed],
    )
  return state, int(step)


# ------------------------------------------------------------------------------------ preemption
class PreemptionWatcher:
  """Turns SIGTERM into a request to checkpoint at the next step and stop.

  In a one-process job a Python SIGTERM handler sets the flag. In a multi-process job the handler is
  not installed (it would replace the preemption notifier that ``jax.distributed`` installs);
  orbax's ``CheckpointManager.reached_preemption`` then tells all processes at the same step.
  """

  def __init__(self, manager: ocp.CheckpointManager | None = None, install: bool | None = None):
    self._manager = manager
    self._event = threading.Event()
    self._previous = None
    if install is None:
      install = jax.process_count() == 1 and threading.current_thread() is threading.main_thread()
    if install:
      self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del frame
    logging.warning('Received signal %d: will checkpoint at the next step and stop.', signum)
    self._event.set()

  def request(self):
    """Requests a save-and-stop as if SIGTERM had arrived (tests, callbacks)."""
    self._event.set()

  def should_stop(self, step: int) -> bool:
    if self._event.is_set():
      return True
    if self._manager is not None and jax.process_count() > 1:
      return bool(self._manager.reached_preemption(step))
    return False

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


# ------------------------------------------------------------------------------------ a trained run
# read back
MODEL_FILE = 'model.json'  # in a run's workdir: what ``load_trained`` needs to rebuild the model
CHECKPOINT_DIR = 'checkpoints'  # in a run's workdir


@dataclasses.dataclass
class Trained:
  """A trained run read back from its workdir.

  kind: 'avatar' or 'regressor'; model: a ``LipFlowModel`` or {condition: ``Regressor``}; params:
    its 'params'
  collection (or {condition: params}); step: the checkpoint's step; config: the run's
  ``config.json``.
  """

  kind: str
  model: Any
  params: Any
  step: int
  config: dict


def load_trained(workdir: str, step: Optional[int] = None, sharding=None) -> Trained:
  """Rebuilds the model of a workdir from ``model.json`` and restores its parameters (latest or
  ``step``).

  Works on any device topology (a run trained on 8 devices loads on 1): parameters are placed with
  ``sharding`` (default: device 0).
  """
  with open(os.path.join(workdir, MODEL_FILE)) as f:
    desc = json.load(f)
  config = {}
  if os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
      config = json.load(f)
  fix = lambda d: {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
  if desc['task'] in ('avatar', 'lipflow'):  # 'lipflow': the task's name in workdirs before 2026-12
    desc['task'] = 'avatar'
    model = models.LipFlowModel(**fix(desc['model']))
  else:
    model = {c: models.Regressor(**fix(d)) for c, d in desc['regressors'].items()}
  state, step = restore_state_for_inference(os.path.join(workdir, CHECKPOINT_DIR), step, sharding)
  return Trained(
    kind=desc['task'], model=model, params=state['params'], step=int(step), config=config
  )
