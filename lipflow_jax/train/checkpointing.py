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

from lipflow_jax import models
from lipflow_jax.train.metrics_logging import CONFIG_FILE

STATE = 'state'
DATA_ITER = 'data_iter'


# ------------------------------------------------------------------------------------ data iterator
# item
class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves ``iterator.get_state()`` of each process as JSON (dict states, or bytes states such as
  grain's
  ``DataLoaderIterator``), one file per process; restores with ``iterator.set_state``."""

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


def restore(
  manager: ocp.CheckpointManager, state_template, data_iter=None, step: int | None = None
):
  """Restores the latest (or given) step into the shardings and dtypes of ``state_template``.

  Args:
    state_template: a ``TrainState`` of arrays or ``jax.ShapeDtypeStruct`` s carrying the target
      shardings.
    data_iter: restored in place (``set_state``) when given.
  Returns:
    (state, step), or (None, None) when the directory holds no checkpoint.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None, None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
  items = {STATE: ocp.args.StandardRestore(abstract)}
  if data_iter is not None:
    items[DATA_ITER] = DataIteratorRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored[STATE], step


def restore_state_for_inference(directory: str, step: int | None = None, sharding=None):
  """Restores the saved ``TrainState`` of ``directory/<step>`` (latest when None) as a plain dict,
  without a template and whatever topology it was saved on; every array is placed with ``sharding``
  (default: device 0).

  Returns:
    ({'params', 'opt_state', 'step', 'rng', ...}, step).
  """
  directory = epath.Path(directory)
  if step is None:
    steps = (
      sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
      if directory.exists()
      else []
    )
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {directory}')
    step = steps[-1]
  path = directory / str(step) / STATE
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  handler = ocp.StandardCheckpointHandler()
  metadata = handler.metadata(path)
  is_leaf = lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype')
  abstract = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), metadata, is_leaf=is_leaf
  )
  state = handler.restore(path, args=ocp.args.StandardRestore(abstract))
  handler.close()
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
