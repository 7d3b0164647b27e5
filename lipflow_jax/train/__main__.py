r"""Trains one model: ``python -m lipflow_jax.train --config=configs/<name>.py[:tiny] --workdir=DIR``.

Config fields can be overridden on the command line (``--config.num_train_steps=200``,
``--config.model.z_dim=32``). Running it again on the same workdir resumes from the latest checkpoint; a run
that already finished exits at once. SIGTERM (preemption) checkpoints at the next step and exits.
"""

import os
import sys

# `from configs import common` in the config files: the repository root (this file's grandparent's parent)
# must be importable however the module is started.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.path.isdir(os.path.join(_REPO_ROOT, 'configs')) and _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the config.')
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/<name>.py[:variant]).',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  # Multi-process start-up must precede any use of JAX devices.
  from lipflow_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize()
  from lipflow_jax.train import loop  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  logging.info('JAX process %d / %d, local devices %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  result = loop.train_and_evaluate(FLAGS.config, _WORKDIR.value)
  if result.stopped == 'preempted':
    logging.warning('Preempted at step %d; run the same command again to resume.', result.step)
  return 0


if __name__ == '__main__':
  app.run(main)
