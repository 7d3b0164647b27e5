r"""Live driving: replays a held-out sequence of a finished main job frame by frame as a stream.

  python -m lipflow_jax.drive --workdir=runs/demo --input=keypoints [--method=lipflow_fit]
      [--segment=NAME] [--steps=5] [--max_frames=N]

Writes ``<workdir>/drive/<method>_<input>_<segment>/`` (see ``lipflow_jax.experiment.driving``)
and prints latency p50 / p95 / max and the errors against the full per-frame fit.
"""

import sys

from absl import app, flags

from lipflow_jax import config_validation
from lipflow_jax.experiment import driving

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished main-job workdir.")
_INPUT = flags.DEFINE_enum("input", "keypoints", ["keypoints", "hmc"], "Run-time signal.")
_METHOD = flags.DEFINE_string("method", "lipflow_fit", "A fitted method of the comparison.")
_SEGMENT = flags.DEFINE_string("segment", None, "Held-out segment (default: the first).")
_STEPS = flags.DEFINE_integer("steps", 5, "Adam steps per frame.", lower_bound=1)
_MAX_FRAMES = flags.DEFINE_integer("max_frames", None, "At most this many frames.", lower_bound=1)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  try:
    summary = driving.drive(
      _WORKDIR.value, _INPUT.value, _METHOD.value, _SEGMENT.value, _STEPS.value, _MAX_FRAMES.value
    )
  except config_validation.ConfigError as e:  # the workdir's config.json (checked on load)
    sys.stderr.write(f"FATAL {e}\n")
    sys.exit(2)
  print(driving.summary_line(summary), flush=True)
  print(f"written to {summary['dir']}", flush=True)


if __name__ == "__main__":
  app.run(main)
