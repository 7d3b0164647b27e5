"""Multi-process JAX: cluster detection, start-up, the device mesh and the batches on it.

Call ``initialize()`` first thing in an entry point, before anything touches JAX devices. It decides
from its arguments and the environment whether the job is multi-process and, if so, calls
``jax.distributed.initialize``; for a single process it does nothing. Where JAX already detects a
cluster (SLURM under ``srun``, Open MPI's ``mpirun``, Cloud TPU pods) it is left to JAX. The order
of detection (first match wins):

  1. ``LIPFLOW_DISTRIBUTED=off``: one process, whatever the environment says.
  2. explicit: the arguments, else ``LIPFLOW_COORDINATOR_ADDRESS`` / ``LIPFLOW_NUM_PROCESSES`` /
     ``LIPFLOW_PROCESS_ID`` (``launch/local.sh``, ``launch/k8s``); all three are needed unless a
     cluster below supplies the rest.
  3. Open MPI (``OMPI_COMM_WORLD_SIZE > 1``).
  4. SLURM (``SLURM_JOB_ID`` and more than one task in the step; the processes must be started by
     ``srun``).
  5. Cloud TPU pod (``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` naming several hosts, or
     ``MEGASCALE_NUM_SLICES > 1``), or ``LIPFLOW_DISTRIBUTED=jax`` (always let JAX detect; use it on
     TPU VMs, where the host list comes from the metadata server).
  6. Kubernetes indexed Job / JobSet (``JOB_COMPLETION_INDEX``): process id from the index, the
     count from ``LIPFLOW_NUM_PROCESSES``, the coordinator from ``LIPFLOW_COORDINATOR_ADDRESS`` or
     else pod 0 behind the headless service (``LIPFLOW_K8S_SERVICE``, or the JobSet's name).

Failure bound. When a process dies, every other process stops with an error within
``heartbeat_timeout`` seconds (plus about a second), even when blocked inside a collective: the
coordination service declares a silent process dead and aborts the others (SIGABRT, "Terminating
process because the JAX distributed service detected fatal errors. This most likely indicates that
another task died"). Usually it is faster: a process that exits or is killed closes its connections,
so a collective waiting on it fails at once (a Python error, then ``fail_fast``), and if process 0
(the coordinator) dies the others abort at once. An uncaught Python exception exits its process
immediately (``fail_fast``), instead of waiting up to ``shutdown_timeout`` in JAX's shutdown barrier
while the others wait in a collective. Measured on CPU (gloo): a frozen process (SIGSTOP, like a
lost node) stopped the other after 6 s with ``heartbeat_timeout=5`` and 10.5 s with 10. A process
that hangs while alive is not detected (its heartbeats continue).

Process 0 writes logs, metrics and figures (``is_main_process``, ``main_process_only``); checkpoints
are saved by all processes (orbax coordinates multi-process saves itself).

The mesh is ``make_mesh`` (default: 1-D, ``('data',)``, over every device of every process), and
``shard_batch`` turns each process's numpy rows into one global batch on it. To start N processes on
this machine: ``lipflow_jax.launch_local`` (``launch/local.sh``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import re
import sys
import threading
from typing import Any, Callable, Mapping, Sequence

import jax
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

logger = logging.getLogger(__name__)

# Environment variables read by ``initialize`` (and set by ``launch/``).
ENV_MODE = 'LIPFLOW_DISTRIBUTED'  # auto (default) | off | jax
ENV_COORDINATOR = 'LIPFLOW_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'LIPFLOW_NUM_PROCESSES'
ENV_PROCESS_ID = 'LIPFLOW_PROCESS_ID'
ENV_COORDINATOR_PORT = 'LIPFLOW_COORDINATOR_PORT'
ENV_K8S_SERVICE = 'LIPFLOW_K8S_SERVICE'
ENV_INIT_TIMEOUT = 'LIPFLOW_INITIALIZATION_TIMEOUT'
ENV_HEARTBEAT_TIMEOUT = 'LIPFLOW_HEARTBEAT_TIMEOUT'
ENV_SHUTDOWN_TIMEOUT = 'LIPFLOW_SHUTDOWN_TIMEOUT'

DEFAULT_INIT_TIMEOUT = 300  # s, connecting to the coordinator
DEFAULT_HEARTBEAT_TIMEOUT = 100  # s, a silent process is declared dead after this
DEFAULT_SHUTDOWN_TIMEOUT = 300  # s, how long a finished process waits for the others at exit
DEFAULT_K8S_PORT = 55527  # the port JAX's own Kubernetes detection uses

DATA_AXIS = 'data'

_LOOPBACK_HOSTS = ('localhost', '127.0.0.1', '::1', '[::1]')


# -------------------------------------------------------------------------------- detection
@dataclasses.dataclass(frozen=True)
class ClusterSpec:
  """What ``initialize`` decided.

  Attributes:
    kind: 'single', 'explicit', 'ompi', 'slurm', 'tpu', 'jax', 'k8s', or 'external'
      (``jax.distributed`` was started by someone else).
    coordinator_address: 'host:port' of process 0's coordinator, or None (left to JAX's detection).
    num_processes: total processes, or None (left to JAX's detection).
    process_id: this process, or None (left to JAX's detection).
    local_device_ids: devices this process may use (GPU), or None.
  """

  kind: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  @property
  def is_multiprocess(self) -> bool:
    return self.kind != 'single'


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name)
  if value is None or value.strip() == '':
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} is not an integer') from None


def _missing_error(given: dict, missing: Sequence[str]) -> ValueError:
  names = {
    'coordinator_address': ENV_COORDINATOR,
    'num_processes': ENV_NUM_PROCESSES,
    'process_id': ENV_PROCESS_ID,
  }
  got = ', '.join(f'{k}={v!r}' for k, v in given.items() if v is not None)
  need = ', '.join(f'{k} (or ${names[k]})' for k in missing)
  return ValueError(
    f'Incomplete multi-process settings: got {got}, but {need} missing, and no '
    'cluster (SLURM, Open MPI, TPU pod, Kubernetes) was detected to supply the '
    'rest. Give all three, or none for a single process.'
  )


def _k8s_coordinator(environ: Mapping[str, str]) -> str | None:
  """Pod 0 behind the headless service: '<job>-0.<service>:<port>'.

  For a JobSet: '<jobset>-<replicated job>-0-0.<service>:<port>'.
  """
  hostname = environ.get('HOSTNAME', '')
  jobset = environ.get('JOBSET_NAME')
  service = environ.get(ENV_K8S_SERVICE) or jobset
  if not hostname or not service:
    return None
  if jobset:
    host0, n = re.subn(r'-\d+-\d+$', '-0-0', hostname)
  else:
    host0, n = re.subn(r'-\d+$', '-0', hostname)
  if n != 1:
    return None
  port = (
    environ.get(ENV_COORDINATOR_PORT) or environ.get('JAX_COORDINATOR_PORT') or DEFAULT_K8S_PORT
  )
  return f'{host0}.{service}:{port}'


def detect_cluster(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: Sequence[int] | None = None,
  environ: Mapping[str, str] | None = None,
) -> ClusterSpec:
  """Decides how to start from the arguments and ``environ`` (default ``os.environ``).

  Pure: it starts nothing.

  Raises:
    ValueError: settings given only in part with no cluster to supply the rest, a multi-task SLURM
      job whose process was not started by ``srun``, a Kubernetes job without a process count, or
      malformed values.
  """
  env = os.environ if environ is None else environ
  ids = None if local_device_ids is None else tuple(int(i) for i in np.atleast_1d(local_device_ids))
  mode = env.get(ENV_MODE, 'auto').strip().lower() or 'auto'
  if mode in ('off', '0', 'false', 'none', 'single'):
    return ClusterSpec('single')
  if mode not in ('auto', 'jax'):
    raise ValueError(f"{ENV_MODE}={mode!r}: expected 'auto', 'off' or 'jax'")

  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _int_env(env, ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _int_env(env, ENV_PROCESS_ID)
  given = dict(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  missing = [k for k, v in given.items() if v is None]
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'num_processes must be >= 1, got {num_processes}')
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f'process_id must be in [0, {num_processes}), got {process_id}')

  # 2. Explicit.
  if not missing:
    if num_processes == 1:
      return ClusterSpec('single')
    return ClusterSpec('explicit', coordinator_address, num_processes, process_id, ids)

  # 3. Open MPI.
  ompi_size = _int_env(env, 'OMPI_COMM_WORLD_SIZE')
  if ompi_size is not None and ompi_size > 1:
    if 'OMPI_MCA_orte_hnp_uri' in env:  # Open MPI <= 4: JAX parses the launcher's address.
      return ClusterSpec('ompi', coordinator_address, num_processes, process_id, ids)
    coordinator_address = coordinator_address or env.get('JAX_COORDINATOR_ADDRESS')
    if coordinator_address is None:
      raise ValueError(
        'Open MPI job without OMPI_MCA_orte_hnp_uri (Open MPI >= 5): set '
        f'{ENV_COORDINATOR}=<rank 0 host>:<port> for every rank.'
      )
    local_rank = _int_env(env, 'OMPI_COMM_WORLD_LOCAL_RANK')
    return ClusterSpec(
      'ompi',
      coordinator_address,
      num_processes if num_processes is not None else ompi_size,
      (process_id if process_id is not None else _int_env(env, 'OMPI_COMM_WORLD_RANK')),
      ids if ids is not None or local_rank is None else (local_rank,),
    )

  # 4. SLURM.
  if 'SLURM_JOB_ID' in env:
    ntasks = _int_env(env, 'SLURM_STEP_NUM_TASKS') or _int_env(env, 'SLURM_NTASKS') or 1
    if ntasks > 1:
      if 'SLURM_STEP_NODELIST' not in env or 'SLURM_PROCID' not in env:
        raise ValueError(
          f'SLURM job with {ntasks} tasks, but this process was not started by '
          'srun (SLURM_STEP_NODELIST / SLURM_PROCID unset): launch one process per '
          'task with `srun` (see launch/slurm.sbatch), or set '
          f'{ENV_MODE}=off for a one-process run.'
        )
      return ClusterSpec('slurm', coordinator_address, num_processes, process_id, ids)

  # 5. Cloud TPU pod (multi-host slice or multislice), or JAX's detection on request.
  hosts = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES') or ''
  num_hosts = len([h for h in hosts.split(',') if h.strip()])
  if num_hosts > 1 or (_int_env(env, 'MEGASCALE_NUM_SLICES') or 1) > 1:
    return ClusterSpec('tpu', coordinator_address, num_processes, process_id, ids)
  if mode == 'jax':
    return ClusterSpec('jax', coordinator_address, num_processes, process_id, ids)

  # 6. Kubernetes indexed Job / JobSet.
  if 'JOB_COMPLETION_INDEX' in env:
    if num_processes is None:
      # jax[k8s]: JAX reads the Job's parallelism.
      if importlib.util.find_spec('kubernetes') is not None:
        return ClusterSpec('k8s', coordinator_address, None, process_id, ids)
      raise ValueError(
        'Kubernetes indexed Job (JOB_COMPLETION_INDEX='
        f'{env["JOB_COMPLETION_INDEX"]}) without a process count: set '
        f'{ENV_NUM_PROCESSES} to the Job\'s parallelism (see '
        f'launch/k8s/jobset.yaml), or {ENV_MODE}=off for a one-process run.'
      )
    if num_processes == 1:
      return ClusterSpec('single')
    process_id = process_id if process_id is not None else _int_env(env, 'JOB_COMPLETION_INDEX')
    coordinator_address = coordinator_address or _k8s_coordinator(env)
    if coordinator_address is None:
      raise ValueError(
        f'Kubernetes indexed Job: cannot name the coordinator; set '
        f'{ENV_COORDINATOR}=<job>-0.<headless service>:<port>, or '
        f'{ENV_K8S_SERVICE}=<headless service> (the pod hostname must be '
        '<job>-<index>).'
      )
    if not 0 <= process_id < num_processes:
      raise ValueError(
        f'JOB_COMPLETION_INDEX={process_id} is outside [0, {ENV_NUM_PROCESSES}={num_processes})'
      )
    return ClusterSpec('k8s', coordinator_address, num_processes, process_id, ids)

  if len(missing) < 3:
    raise _missing_error(given, missing)
  return ClusterSpec('single')


# -------------------------------------------------------------------------------- initialize
_SPEC: ClusterSpec | None = None
_LOCK = threading.Lock()


def _platform_is_cpu() -> bool:
  """Whether the default backend will be CPU, decided without starting a backend."""
  platforms = jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  for plugin in ('jax_plugins', 'jax_cuda12_plugin', 'jax_cuda13_plugin', 'libtpu'):
    if importlib.util.find_spec(plugin) is not None:
      return False
  return True


def _is_loopback(address: str | None) -> bool:
  if not address:
    return False
  host = address.rsplit(':', 1)[0]
  return host in _LOOPBACK_HOSTS or host.startswith('127.')


def _bind_gloo_to_loopback():
  """Makes the CPU backend's gloo collectives listen on 127.0.0.1 (local runs never leave loopback).

  Uses JAX internals; when they differ (another JAX version) gloo keeps its default (the host name's
  address).
  """
  try:
    # Inside the try: private modules, which other JAX versions may not have.
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top

    def factory():
      collectives = _jax.make_gloo_tcp_collectives(
        distributed_client=jax_distributed.global_state.client, hostname='127.0.0.1'
      )
      return xla_bridge.make_cpu_client(collectives=collectives)

    xla_bridge.register_backend_factory('cpu', factory, priority=0, fail_quietly=False)
  except Exception as e:  # pylint: disable=broad-except
    logger.warning(
      'Could not bind gloo collectives to 127.0.0.1 (%s); using the default address.', e
    )


def _install_fail_fast_excepthook():
  """On an uncaught exception: print it, then exit at once (skipping JAX's shutdown barrier)."""
  previous = sys.excepthook

  def hook(exc_type, exc, tb):
    try:
      previous(exc_type, exc, tb)
      sys.stderr.write(
        f'[lipflow_jax.distributed] process {jax.process_index()} of '
        f'{jax.process_count()} failed with an uncaught {exc_type.__name__} (if it '
        'is a collective or connection error, another process probably died first: '
        'see its log); exiting now so that the others stop too.\n'
      )
      sys.stdout.flush()
      sys.stderr.flush()
      logging.shutdown()
    finally:
      os._exit(1)

  sys.excepthook = hook


def _timeout(value: int | None, env_name: str, default: int) -> int:
  if value is not None:
    return int(value)
  return _int_env(os.environ, env_name) or default


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: int | Sequence[int] | None = None,
  *,
  cpu_collectives: str | None = 'auto',
  initialization_timeout: int | None = None,
  heartbeat_timeout: int | None = None,
  shutdown_timeout: int | None = None,
  fail_fast: bool = True,
) -> ClusterSpec:
  """Starts ``jax.distributed`` when the job is multi-process; nothing for one process. Idempotent.

  Args:
    coordinator_address: 'host:port' of process 0 (default ``$LIPFLOW_COORDINATOR_ADDRESS`` or
      detected).
    num_processes: total number of processes (default ``$LIPFLOW_NUM_PROCESSES`` or detected).
    process_id: this process in [0, num_processes) (default ``$LIPFLOW_PROCESS_ID`` or detected).
    local_device_ids: accelerators this process may use (default: JAX's choice, one GPU per task
      under srun).
    cpu_collectives: 'auto' = 'gloo' when the backend is CPU; or 'gloo', 'mpi', or None to leave
      JAX's setting.
    initialization_timeout: seconds to wait for all processes to connect
      (``$LIPFLOW_INITIALIZATION_TIMEOUT``, default 300).
    heartbeat_timeout: seconds after which a silent process counts as dead and all others abort
      (``$LIPFLOW_HEARTBEAT_TIMEOUT``, default 100). This is the bound on how long survivors run on.
    shutdown_timeout: seconds a finished process waits at exit for the others
      (``$LIPFLOW_SHUTDOWN_TIMEOUT``, default 300).
    fail_fast: exit immediately on an uncaught exception (see the module docstring).
  Returns:
    The ``ClusterSpec`` acted on (the first call's on later calls).
  Raises:
    ValueError: incomplete or inconsistent settings (see ``detect_cluster``).
    RuntimeError: a multi-process job, but JAX's backend was already started.
  """
  global _SPEC
  with _LOCK:
    if _SPEC is not None:
      return _SPEC
    if jax.distributed.is_initialized():  # Started by someone else.
      _SPEC = ClusterSpec('external', None, jax.process_count(), jax.process_index())
      return _SPEC
    ids = (
      None if local_device_ids is None else tuple(int(i) for i in np.atleast_1d(local_device_ids))
    )
    spec = detect_cluster(coordinator_address, num_processes, process_id, ids)
    if not spec.is_multiprocess:
      _SPEC = spec
      return spec

    if cpu_collectives == 'auto':
      cpu_collectives = 'gloo' if _platform_is_cpu() else None
    if cpu_collectives is not None:
      jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
    bind_address = None
    if _is_loopback(spec.coordinator_address):
      bind_address = spec.coordinator_address  # Listen on loopback only, not on every interface.
      if cpu_collectives == 'gloo':
        _bind_gloo_to_loopback()
    timeouts = dict(
      initialization_timeout=_timeout(
        initialization_timeout, ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT
      ),
      heartbeat_timeout_seconds=_timeout(
        heartbeat_timeout, ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT
      ),
      shutdown_timeout_seconds=_timeout(
        shutdown_timeout, ENV_SHUTDOWN_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT
      ),
    )
    logger.info(
      'Starting jax.distributed (%s): coordinator=%s processes=%s id=%s %s',
      spec.kind,
      spec.coordinator_address or '<auto>',
      spec.num_processes or '<auto>',
      '<auto>' if spec.process_id is None else spec.process_id,
      timeouts,
    )
    try:
      jax.distributed.initialize(
        coordinator_address=spec.coordinator_address,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        local_device_ids=None if spec.local_device_ids is None else list(spec.local_device_ids),
        coordinator_bind_address=bind_address,
        **timeouts,
      )
    except RuntimeError as e:
      if 'must be called before' in str(e):
        raise RuntimeError(
          f'A multi-process ({spec.kind}) job was detected, but JAX was already '
          'used in this process; call lipflow_jax.distributed.initialize() before '
          'anything touches JAX devices (jax.devices(), computations, '
          'device_put).'
        ) from e
      raise
    if fail_fast:
      _install_fail_fast_excepthook()
    _SPEC = dataclasses.replace(
      spec, num_processes=jax.process_count(), process_id=jax.process_index()
    )
    logger.info(
      'Process %d of %d: %d local / %d global devices.',
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
    )
    return _SPEC


def shutdown():
  """Leaves the distributed system.

  JAX also does this at exit, after waiting up to ``shutdown_timeout`` for the other processes.
  """
  global _SPEC
  with _LOCK:
    jax.distributed.shutdown()
    _SPEC = None


# -------------------------------------------------------------------------------- processes
def is_multiprocess() -> bool:
  """More than one process in the job."""
  return jax.process_count() > 1


def is_main_process() -> bool:
  """Process 0: the one that logs, writes metrics and figures."""
  return jax.process_index() == 0


def main_process_only(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Decorator: ``fn`` runs on process 0 and returns None elsewhere."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    if jax.process_index() == 0:
      return fn(*args, **kwargs)
    return None

  return wrapper


_BARRIER_COUNTS: dict[str, int] = {}


def sync(name: str, timeout_s: float | None = None):
  """Barrier: returns once every process has called ``sync(name)`` (a no-op for one process).

  Each call site should use its own name; all processes must call it the same number of times.

  Args:
    name: the barrier's name.
    timeout_s: give up after this many seconds (default: 24 h, e.g. while process 0 builds a
      dataset). A dead process ends the wait sooner, through the heartbeat (see the module
      docstring).
  Raises:
    a JAX error when the timeout passes before every process arrives.
  """
  if jax.process_count() == 1:
    return
  count = _BARRIER_COUNTS.get(name, 0)
  _BARRIER_COUNTS[name] = count + 1
  client = jax_distributed.global_state.client
  if client is None:  # Multi-process without the distributed client (e.g. old TPU runtimes).
    multihost_utils.sync_global_devices(name)
    return
  timeout_ms = int((24 * 3600 if timeout_s is None else timeout_s) * 1000)
  client.wait_at_barrier(f'lipflow:{name}:{count}', timeout_ms)


# -------------------------------------------------------------------------------- mesh, batches
def make_mesh(
  axis_names: Sequence[str] = (DATA_AXIS,),
  axis_shapes: Sequence[int] | None = None,
  *,
  axis_types: Sequence[AxisType] | None = None,
  num_devices: int | None = None,
) -> Mesh:
  """A mesh over all devices of all processes (``jax.make_mesh``; each process's are contiguous).

  Args:
    axis_names: mesh axes; the default is the 1-D data-parallel mesh ``('data',)``.
    axis_shapes: sizes, one may be -1 (the rest of the devices); default all devices on a single
      axis.
    axis_types: default ``AxisType.Auto`` on every axis (sharding propagated by the compiler, as
      with pjit).
    num_devices: instead, a 1-D mesh over the first ``num_devices`` devices of a one-process job
      (``config.num_devices``, tests).
  """
  axis_names = tuple(axis_names)
  if num_devices is not None:
    if jax.process_count() > 1:
      raise ValueError('num_devices is for one-process runs; multi-process runs use every device')
    if len(axis_names) != 1 or axis_shapes is not None or axis_types is not None:
      raise ValueError('num_devices makes a 1-D mesh: give one axis name and no shapes or types')
    devices = np.asarray(jax.devices()[:num_devices])
    if devices.size != num_devices:
      raise ValueError(f'asked for {num_devices} devices, only {jax.device_count()} exist')
    return Mesh(devices, axis_names)
  n = jax.device_count()
  if axis_shapes is None:
    if len(axis_names) != 1:
      raise ValueError(f'axis_shapes is needed for a mesh with axes {axis_names}')
    axis_shapes = (n,)
  shapes = [int(s) for s in axis_shapes]
  if len(shapes) != len(axis_names):
    raise ValueError(f'axis_shapes {tuple(shapes)} and axis_names {axis_names} differ in length')
  if shapes.count(-1) > 1:
    raise ValueError(f'at most one axis size may be -1, got {tuple(shapes)}')
  if -1 in shapes:
    rest = int(np.prod([s for s in shapes if s != -1]))
    if rest <= 0 or n % rest:
      raise ValueError(f'cannot fill axis sizes {tuple(shapes)} with {n} devices')
    shapes[shapes.index(-1)] = n // rest
  if int(np.prod(shapes)) != n:
    raise ValueError(
      f'mesh shape {tuple(shapes)} needs {int(np.prod(shapes))} devices, there are {n}'
    )
  if axis_types is None:
    axis_types = (AxisType.Auto,) * len(axis_names)
  return jax.make_mesh(tuple(shapes), axis_names, axis_types=tuple(axis_types))


def process_batch_size(global_batch_size: int, mesh: Mesh | None = None) -> int:
  """This process's share of ``global_batch_size``; checks it splits evenly over the devices."""
  devices = jax.device_count() if mesh is None else mesh.devices.size
  if global_batch_size % devices:
    raise ValueError(
      f'global batch size {global_batch_size} is not divisible by the {devices} devices'
    )
  return global_batch_size // jax.process_count()


def shard_batch(local_batch: Any, mesh: Mesh, axis: str | Sequence[str] = DATA_AXIS) -> Any:
  """Assembles each process's numpy batch into global arrays split over ``axis`` on axis 0.

  The one way a batch enters a jitted step (train loop, its evaluation, benchmarks, tests).

  Args:
    local_batch: pytree of [B_local, ...] arrays, this process's rows of the global batch (process
      ``p`` holds rows ``[p * B_local, (p + 1) * B_local)``).
    mesh: the mesh (``make_mesh``).
    axis: the mesh axis (or axes) the batch is split over.
  Returns:
    The same pytree of [B_local * process_count, ...] ``jax.Array`` s with
    ``NamedSharding(mesh, P(axis))``.
  Raises:
    ValueError: a leaf without a leading axis, or one that does not split evenly over this process's
      devices of the mesh.
  """
  sharding = NamedSharding(mesh, P(axis))
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % local_devices:
      raise ValueError(
        f'local batch leading dimension {x.shape[:1]} is not divisible by this '
        f'process\'s {local_devices} devices'
      )
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, local_batch)
