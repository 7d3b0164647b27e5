"""Training: train state, the jitted data-parallel train step, checkpoints, metrics and the train
loop.

Entry point: ``python -m lipflow_jax.train --config=configs/<name>.py --workdir=DIR``.
Library: ``train_and_evaluate(config, workdir)``; ``load_trained(workdir)`` reads a finished run
back.
"""

from lipflow_jax.train.checkpointing import (
  DataIteratorHandler,
  PreemptionWatcher,
  Trained,
  load_trained,
  make_checkpoint_manager,
  restore_state_for_inference,
)
from lipflow_jax.train.loop import NonFiniteLossError, RunResult, build_task, train_and_evaluate
from lipflow_jax.train.metrics_logging import MetricWriter, dump_config, read_metrics
from lipflow_jax.train.tasks import Task, avatar_task, build_model, data_sizes, regressor_task
from lipflow_jax.train.train_state import (
  TrainState,
  create_train_state,
  init_train_state,
  make_learning_rate_schedule,
  make_optimizer,
)
from lipflow_jax.train.train_step import (
  batch_sharding,
  jit_eval_step,
  jit_train_step,
  replicated_sharding,
)
# The step functions themselves: ``lipflow_jax.train.train_step.train_step`` / ``.eval_step`` (not
# re-exported here, so that ``lipflow_jax.train.train_step`` stays the module).
