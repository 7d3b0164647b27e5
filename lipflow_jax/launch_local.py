"""The local launcher: N processes of one JAX job on this machine's CPU, joined on 127.0.0.1.

``launch/local.sh`` runs this module's command line; the tests call ``run_local_processes``. Each
process gets its own ``devices_per_process`` host CPU devices and the ``LIPFLOW_*`` variables that
make ``lipflow_jax.distributed.initialize()`` join a coordinator on a free port of 127.0.0.1 (gloo
collectives). Its output (stdout and stderr) is prefixed ``[p<i>]``. When a process fails, the
others get SIGTERM, then SIGKILL 5 s later (a multi-process JAX worker may take SIGTERM as a
preemption notice and go on).

Usage::

  python -m lipflow_jax.launch_local [--devices_per_process=K] [--heartbeat_timeout=S]
      [--timeout=T] N --config=configs/X.py[:variant] --workdir=DIR [--config.a.b=v ...]

Everything after N is passed unchanged to the command each process runs: ``python -m
lipflow_jax.train`` with this interpreter, or ``$LIPFLOW_LOCAL_COMMAND`` (split on whitespace). Exit
code: 0 when all processes succeed, else the exit code of the first process to fail (128 + the
signal's number if a signal killed it), 124 after ``--timeout`` seconds, 130 when interrupted, 2 for
a usage error.

Standard library only: the launcher starts at once and needs nothing of the job's dependencies.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence

# What the processes are told (``lipflow_jax.distributed.initialize`` reads the LIPFLOW_ ones).
ENV_COMMAND = 'LIPFLOW_LOCAL_COMMAND'
_ENV_COORDINATOR = 'LIPFLOW_COORDINATOR_ADDRESS'
_ENV_NUM_PROCESSES = 'LIPFLOW_NUM_PROCESSES'
_ENV_PROCESS_ID = 'LIPFLOW_PROCESS_ID'
_ENV_HEARTBEAT_TIMEOUT = 'LIPFLOW_HEARTBEAT_TIMEOUT'
_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'

TERM_GRACE_S = 5.0  # after a failure: SIGTERM to the others, SIGKILL this much later
INTERRUPT_GRACE_S = 2.0  # the same when the launcher itself is interrupted
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
EXIT_USAGE = 2


@dataclasses.dataclass
class LocalRun:
  """Outcome of ``run_local_processes``.

  Attributes:
    returncodes: per process; negative = killed by that signal.
    outputs: per process, its output lines (empty unless ``capture``).
    timed_out: the run was killed after ``timeout`` seconds.
    seconds: wall time of the run.
    first_failure: the process that failed first, or None.
  """

  returncodes: list[int]
  outputs: list[list[str]]
  timed_out: bool
  seconds: float
  first_failure: int | None = None

  @property
  def ok(self) -> bool:
    return not self.timed_out and all(rc == 0 for rc in self.returncodes)

  def output(self, process: int) -> str:
    return ''.join(self.outputs[process])

  @property
  def exit_code(self) -> int:
    """The launcher's exit code (see the module docstring)."""
    if self.timed_out:
      return EXIT_TIMEOUT
    if self.first_failure is None:
      return 0
    return _shell_status(self.returncodes[self.first_failure])


def _shell_status(returncode: int) -> int:
  """A ``Popen.returncode`` as a shell reports it: 128 + the signal's number for a killed one."""
  return 128 - returncode if returncode < 0 else returncode


def free_port(host: str = '127.0.0.1') -> int:
  """A TCP port that is free on ``host`` right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def local_process_env(
  process_id: int,
  num_processes: int,
  coordinator_address: str,
  devices_per_process: int,
  base: Mapping[str, str] | None = None,
  heartbeat_timeout: int | None = None,
) -> dict[str, str]:
  """The environment of one process of a local CPU run.

  ``base`` (default ``os.environ``) with exactly ``devices_per_process`` host CPU devices, whatever
  its ``XLA_FLAGS`` said, unbuffered output, and the job's coordinator, process count and id.
  """
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  flags.append(f'{_DEVICE_COUNT_FLAG}={devices_per_process}')
  env.update(
    {
      'XLA_FLAGS': ' '.join(flags),
      'JAX_PLATFORMS': 'cpu',
      'JAX_NUM_CPU_DEVICES': str(devices_per_process),
      'PYTHONUNBUFFERED': '1',
      _ENV_COORDINATOR: coordinator_address,
      _ENV_NUM_PROCESSES: str(num_processes),
      _ENV_PROCESS_ID: str(process_id),
    }
  )
  if heartbeat_timeout is not None:
    env[_ENV_HEARTBEAT_TIMEOUT] = str(heartbeat_timeout)
  return env


def _signal_group(proc: subprocess.Popen, sig: int):
  """Sends ``sig`` to the process group that ``proc`` leads (it and its children), if it runs."""
  if proc.poll() is not None:
    return
  try:
    os.killpg(proc.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def run_local_processes(
  command: Sequence[str],
  num_processes: int,
  *,
  devices_per_process: int = 1,
  env: Mapping[str, str] | None = None,
  cwd: str | None = None,
  timeout: float | None = None,
  kill_on_failure: bool = True,
  heartbeat_timeout: int | None = None,
  echo: bool = True,
  capture: bool = True,
  grace_s: float = TERM_GRACE_S,
) -> LocalRun:
  """Runs ``command`` as ``num_processes`` processes of one job on this machine's CPU.

  Waits for all of them (or for ``timeout``).

  Args:
    command: what each process runs.
    num_processes: how many.
    devices_per_process: host CPU devices of each process.
    env: the environment the processes start from (default ``os.environ``).
    cwd: their working directory.
    timeout: after this many seconds all processes are killed and ``timed_out`` is set.
    kill_on_failure: when a process fails, SIGTERM to the others, then SIGKILL ``grace_s`` later.
    heartbeat_timeout: sets ``LIPFLOW_HEARTBEAT_TIMEOUT`` (default: ``initialize()``'s).
    echo: write the output lines, prefixed ``[p<i>]``, to stdout, and the launcher's own messages
      (``[launcher] ...``) to stdout and stderr.
    capture: keep each process's output lines in ``LocalRun.outputs``.
    grace_s: see ``kill_on_failure``.
  Returns:
    ``LocalRun``.
  Raises:
    KeyboardInterrupt: after stopping all processes (SIGTERM, SIGKILL 2 s later).
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(
      f'need num_processes >= 1 and devices_per_process >= 1, got {num_processes}, '
      f'{devices_per_process}'
    )
  lock = threading.Lock()

  def say(message: str, stream=None):
    if echo:
      stream = stream or sys.stderr
      with lock:
        sys.stdout.flush()
        stream.write(f'[launcher] {message}\n')
        stream.flush()

  coordinator = f'127.0.0.1:{free_port()}'
  say(
    f'{num_processes} processes x {devices_per_process} CPU devices, coordinator {coordinator}: '
    f'{" ".join(command)}',
    sys.stdout,
  )
  start = time.monotonic()
  procs, outputs, readers = [], [], []
  for i in range(num_processes):
    p_env = local_process_env(
      i, num_processes, coordinator, devices_per_process, env, heartbeat_timeout
    )
    # start_new_session: each process leads its own process group; signals reach its children.
    proc = subprocess.Popen(
      list(command),
      env=p_env,
      cwd=cwd,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL,
      text=True,
      errors='replace',
      start_new_session=True,
    )
    lines: list[str] = []

    def read(proc=proc, lines=lines, i=i):
      for line in proc.stdout:
        if capture:
          lines.append(line)
        if echo:
          with lock:
            sys.stdout.write(f'[p{i}] {line}' if line.endswith('\n') else f'[p{i}] {line}\n')
            sys.stdout.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    procs.append(proc)
    outputs.append(lines)
    readers.append(reader)

  finished = [False] * num_processes
  first_failure = None
  timed_out = False
  terminated_at = None  # when the others got SIGTERM after the first failure
  try:
    while not all(finished):
      for i, proc in enumerate(procs):
        if finished[i] or proc.poll() is None:
          continue
        finished[i] = True
        if proc.returncode != 0:
          say(f'process {i} failed (exit {_shell_status(proc.returncode)})')
          if first_failure is None:
            first_failure = i
            if kill_on_failure and not timed_out and not all(finished):
              say('stopping the other processes')
              for p in procs:
                _signal_group(p, signal.SIGTERM)
              terminated_at = time.monotonic()
      now = time.monotonic()
      if terminated_at is not None and now - terminated_at > grace_s:
        for p in procs:
          _signal_group(p, signal.SIGKILL)
      if timeout is not None and now - start > timeout and not timed_out:
        timed_out = True
        say(f'timed out after {timeout} s: killing all processes')
        for p in procs:
          _signal_group(p, signal.SIGKILL)
      time.sleep(0.05)
  except KeyboardInterrupt:
    say('interrupted: stopping all processes')
    for p in procs:
      _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + INTERRUPT_GRACE_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
      time.sleep(0.05)
    raise
  finally:
    for p in procs:
      _signal_group(p, signal.SIGKILL)
      p.wait()
    for r in readers:
      r.join(timeout=5)
  run = LocalRun(
    [p.returncode for p in procs], outputs, timed_out, time.monotonic() - start, first_failure
  )
  if run.ok:
    say(f'all {num_processes} processes finished', sys.stdout)
  return run


# -------------------------------------------------------------------------------- command line
def _usage(error: str | None = None) -> int:
  if error:
    sys.stderr.write(f'launch_local: {error}\n')
  sys.stderr.write(
    'usage: python -m lipflow_jax.launch_local (or launch/local.sh) '
    '[--devices_per_process=K] [--heartbeat_timeout=S] [--timeout=T] N '
    '[train args...]\n'
  )
  return EXIT_USAGE


def _positive_int(text: str) -> int | None:
  return int(text) if re.fullmatch(r'[1-9][0-9]*', text) else None


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (see the module docstring); returns the exit code."""
  args = list(sys.argv[1:] if argv is None else argv)
  options = {'devices_per_process': '1', 'heartbeat_timeout': None, 'timeout': None}
  while args and args[0].startswith('-'):
    arg = args.pop(0)
    if arg in ('-h', '--help'):
      print(__doc__)
      return 0
    name, has_value, value = arg[2:].partition('=')
    if not arg.startswith('--') or name not in options:
      return _usage(f'unknown option {arg}')
    if not has_value:
      if not args:
        return _usage(f'{arg} needs a value')
      value = args.pop(0)
    options[name] = value
  if not args or _positive_int(args[0]) is None:
    return _usage('the number of processes N (a positive integer) is missing')
  num_processes = _positive_int(args.pop(0))
  devices = _positive_int(options['devices_per_process'])
  if devices is None:
    return _usage(
      f'--devices_per_process must be a positive integer, got {options["devices_per_process"]!r}'
    )
  try:
    heartbeat = None if options['heartbeat_timeout'] is None else int(options['heartbeat_timeout'])
    timeout = None if options['timeout'] is None else float(options['timeout'])
  except ValueError as e:
    return _usage(str(e))
  command = os.environ.get(ENV_COMMAND, '').split() or [sys.executable, '-m', 'lipflow_jax.train']

  def interrupt(signum, frame):
    del signum, frame
    raise KeyboardInterrupt

  signal.signal(signal.SIGTERM, interrupt)
  try:
    run = run_local_processes(
      command + args,
      num_processes,
      devices_per_process=devices,
      heartbeat_timeout=heartbeat,
      timeout=timeout,
      capture=False,
    )
  except KeyboardInterrupt:
    return EXIT_INTERRUPTED
  return run.exit_code


if __name__ == '__main__':
  sys.exit(main())
