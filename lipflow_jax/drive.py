r"""Live driving: replays a held-out sequence of a finished main job frame by frame as a stream.

  python -m lipflow_jax.drive --workdir=runs/demo --input=keypoints [--method=lipflow_fit]
      [--segment=NAME] [--steps=N] [--max_frames=N] [--split=validation]

Writes ``<workdir>/drive/<method>_<input>_<segment>/`` (see ``lipflow_jax.experiment.driving``)
and prints latency p50 / p95 / max and the errors against the full per-frame fit.
"""

import os
import sys

from absl import app, flags

from lipflow_jax import config_validation, fit
from lipflow_jax.experiment import driving, pipeline

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished main-job workdir.")
_INPUT = flags.DEFINE_enum("input", "keypoints", ["keypoints", "hmc"], "Run-time signal.")
_METHOD = flags.DEFINE_string("method", "lipflow_fit", "A fitted method of the comparison.")
_SEGMENT = flags.DEFINE_string("segment", None, "Held-out segment (default: the first).")
_STEPS = flags.DEFINE_integer(
  "steps", None, "Adam steps per frame (default: the main job's config.drive.steps).", lower_bound=1
)
_MAX_FRAMES = flags.DEFINE_integer("max_frames", None, "At most this many frames.", lower_bound=1)
_SPLIT = flags.DEFINE_string(
  "split", None, "Held-out split (default: the evaluation's; 'validation' to choose --steps)."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  workdir = _WORKDIR.value
  try:
    run = driving.load_run(workdir)
  except config_validation.ConfigError as e:  # the workdir's config.json (checked on load)
    sys.stderr.write(f"FATAL {e}\n")
    sys.exit(2)
  config, meta = run[0], run[2]
  spec = fit.METHODS.get(_METHOD.value)
  if spec is None or not spec.fitted:
    raise app.UsageError(f"--method must be one of {fit.FITTED}, got {_METHOD.value!r}")
  steps = _STEPS.value or driving.default_steps(config, _INPUT.value)
  model_dir = os.path.join(workdir, "models", spec.model)
  bundles = pipeline.load_bundles({spec.model: model_dir}, meta)
  summary = driving.drive(
    workdir,
    _INPUT.value,
    _METHOD.value,
    _SEGMENT.value,
    steps,
    _MAX_FRAMES.value,
    _SPLIT.value,
    run=run,
    bundles=bundles,
  )
  print(driving.summary_line(summary), flush=True)
  print(f"written to {summary['dir']}", flush=True)


if __name__ == "__main__":
  app.run(main)
