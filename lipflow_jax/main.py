r"""The main job: data -> train every model -> tune -> fit -> evaluate -> report
(``lipflow_jax.experiment``).

  python -m lipflow_jax.main --config=configs/demo.py --workdir=DIR       # ~1 h on a 2-core CPU
  python -m lipflow_jax.main --config=configs/demo.py:tiny --workdir=DIR  # smoke run, ~1 min

The workdir's layout is described in ``lipflow_jax.experiment.pipeline``; running again on the same
workdir reuses finished trainings, fits and metrics whose inputs are unchanged.
"""

from absl import app, flags
from ml_collections import config_flags

from lipflow_jax import config_validation, experiment, host_memory

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (models, fits, report, figures).")
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Pipeline config (configs/demo.py[:tiny]).", lock_config=False
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  host_memory.retain_freed_memory()  # before JAX's first computation
  experiment.run(config_validation.validate_or_exit(_CONFIG.value), _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=config_validation.parse_flags)
