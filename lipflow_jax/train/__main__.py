r"""Trains one model: ``python -m lipflow_jax.train --config=configs/<name>.py[:tiny]
--workdir=DIR``.

Config fields can be overridden on the command line (``--config.num_train_steps=200``,
``--config.model.z_dim=32``). Running it again on the same workdir resumes from the latest
checkpoint; a run that already finished exits at once. SIGTERM (preemption) checkpoints at the next
step and exits. The resolved config is checked first (``config_validation``): a value out of range
or an unknown key stops the command with one line naming the key.
"""

import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from lipflow_jax import config_validation, distributed, host_memory
from lipflow_jax.train import checkpointing, loop

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints, metrics and the config.'
)
config_flags.DEFINE_config_file(
  'config', None, 'Experiment config file (configs/<name>.py[:variant]).', lock_config=True
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  config_validation.validate_or_exit(FLAGS.config)
  host_memory.retain_freed_memory()  # before JAX's first computation
  distributed.initialize()  # multi-process start-up precedes any use of JAX devices
  logging.info(
    'JAX process %d / %d, local devices %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  try:
    result = loop.train_and_evaluate(FLAGS.config, _WORKDIR.value)
  except checkpointing.CheckpointRestoreError as e:
    sys.stderr.write(f'FATAL {e}\n')
    sys.exit(1)
  if result.stopped == 'preempted':
    logging.warning('Preempted at step %d; run the same command again to resume.', result.step)
  return 0


if __name__ == '__main__':
  app.run(main, flags_parser=config_validation.parse_flags)
