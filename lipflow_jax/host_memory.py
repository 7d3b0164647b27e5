"""Host memory: keep the memory that XLA:CPU frees, instead of page-faulting it in on every call.

XLA:CPU allocates a program's temporary buffer with ``malloc`` when the program starts and frees it
when it ends (a 512 x 512 render's forward + backward at K = 8: 668 MB). glibc serves allocations
over 32 MiB, and every large allocation made on a worker thread, with a fresh ``mmap`` and gives
them back to the kernel on ``free``, so each call page-faults in all the temporary memory it touches
again: ~47,000 minor faults (~190 MB of zeroed pages) per call of that program, measured with
``getrusage``. That forward + backward took 186-196 ms a call, 135-165 ms without the faults (three
benchmark runs each, 2-core CPU, with the renderer of then; README has today's). Small programs gain
nothing and may lose a little (README, Rendering): ``drive``, whose per-frame programs are small and
latency-bound, leaves it out (streamed keypoint fits, ``benchmarks/fit.py --stream_only``: p50 5.5
and 7.3 ms with it, 4.4 and 6.3 ms without, two runs each).

``retain_freed_memory()`` sets three ``mallopt`` parameters: one malloc arena (worker threads
allocate from the main heap, which can grow past 64 MiB), no ``mmap`` for large blocks, and no trim
of the heap's free top below 2 GiB. After the first call, later calls reuse the same pages. The
price: the process keeps its peak heap resident until it exits. ``main``, ``train`` and the
benchmarks call it first thing; call it yourself at the start of a script that imports the
library, before JAX's first computation starts its worker threads (a thread's arena is made on its
first allocation, and arenas already made keep serving their threads). Outside glibc (macOS, musl)
it does nothing.
"""

from __future__ import annotations

import ctypes
import platform

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The largest trim threshold that mallopt's int argument holds (2 GiB - 1).
_TRIM_THRESHOLD = 2**31 - 1


def retain_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse (see the module docstring).

  Returns:
    True if the three parameters were set; False outside glibc (nothing changed).
  Raises:
    RuntimeError: glibc refused a parameter (names it).
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  for name, param, value in (
    ("M_ARENA_MAX", _M_ARENA_MAX, 1),
    ("M_MMAP_MAX", _M_MMAP_MAX, 0),
    ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
  ):
    if mallopt(param, value) != 1:
      raise RuntimeError(f"retain_freed_memory: glibc's mallopt({name}, {value}) failed")
  return True
