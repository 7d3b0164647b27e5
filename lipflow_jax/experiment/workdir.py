"""Bookkeeping of the main job's workdir: the progress log, JSON files written atomically, and the
fingerprints that let a re-run reuse finished trainings, fits and sweeps whose inputs are
unchanged."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import time

import ml_collections

DONE_FILE = (
  "DONE.json"  # in a model's sub-workdir once its training finished: {"key", "steps", ...}
)


def log(msg: str):
  """A timestamped progress line on stdout."""
  print(f"[lipflow main {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and its finished children so far."""
  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def timed(timings: dict, stage: str):
  """Records ``timings[stage + '_s']`` (wall seconds) and ``timings[stage + '_cpu_s']`` (CPU
  seconds, all cores: on a shared machine the wall time grows with the load, the CPU time much
  less) of the block."""
  wall, cpu = time.time(), cpu_seconds()
  try:
    yield
  finally:
    timings[f"{stage}_s"] = time.time() - wall
    timings[f"{stage}_cpu_s"] = cpu_seconds() - cpu


def plain(x):
  """A ConfigDict as a plain dict (other values unchanged)."""
  if isinstance(x, ml_collections.ConfigDict):
    return x.to_dict()
  return x


def fingerprint(*parts) -> str:
  """A short stable hash of JSON-able parts."""
  text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
  return hashlib.sha1(text.encode()).hexdigest()[:16]


def read_json(path):
  """The JSON object in ``path``."""
  with open(path) as f:
    return json.load(f)


def write_json(path, obj):
  """Writes ``obj`` as JSON to ``path`` atomically (a temporary file, then a rename)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, path)


def fingerprint_of_done(sub_dir: str) -> str:
  """The key of a finished training (its DONE file), or '' if it has not finished."""
  path = os.path.join(sub_dir, DONE_FILE)
  return read_json(path).get("key", "") if os.path.exists(path) else ""
