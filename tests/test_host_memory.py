"""``host_memory.retain_freed_memory``: counted page faults of a program with a large buffer."""

import json
import statistics
import subprocess
import sys

import pytest

# A 48 MiB output per call (over glibc's 32 MiB mmap ceiling): minor page faults of each of 16 calls
# after 8 warm-up calls, in a fresh process, with or without retain_freed_memory() first.
_PROBE = """
import json, resource, sys
from lipflow_jax import host_memory
retained = host_memory.retain_freed_memory() if sys.argv[1] == "retain" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2.0 + 1.0)
x = jnp.ones((int(sys.argv[2]),), jnp.float32)
faults = []
for _ in range(24):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  y = f(x).block_until_ready()
  assert float(y[-1]) == 3.0
  del y
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"retained": retained, "faults": faults[8:]}))
"""
_ELEMENTS = 12 * 2**20  # float32: 48 MiB
_PAGES = _ELEMENTS * 4 // 4096  # pages of one output buffer (4 KiB pages)


def _probe(mode):
  out = subprocess.run(
    [sys.executable, "-c", _PROBE, mode, str(_ELEMENTS)],
    capture_output=True,
    text=True,
    check=True,
    timeout=300,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_retain_freed_memory_stops_page_faults_of_repeated_calls():
  plain, kept = _probe("plain"), _probe("retain")
  assert plain["retained"] is False
  if not kept["retained"]:
    pytest.skip("retain_freed_memory does nothing outside glibc")
  if statistics.median(plain["faults"]) < _PAGES // 2:
    pytest.skip(f"malloc's defaults do not fault here ({plain['faults']} faults a call)")
  # Without it every call faults its fresh 48 MiB output in; with it the freed pages are reused (a
  # call now and then still gets fresh pages, when small blocks have split the free ones).
  assert statistics.median(kept["faults"]) < _PAGES // 20, (plain, kept)
