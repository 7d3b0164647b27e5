"""Multi-process tests: real separate OS processes joined by ``jax.distributed`` on 127.0.0.1 (gloo
on CPU).

Run as a script, this file is the worker those processes execute (``python tests/test_distributed.py
MODE ...``).
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest
import yaml

from lipflow_jax import distributed as dist
from lipflow_jax import launch_local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.abspath(__file__)
HEARTBEAT_S = 5  # short, so that a dead process is noticed quickly
BOUND_S = 60  # the subprocess timeout: a hang fails the test instead of blocking it
# The one wall-clock bound these tests assert, because it is the behaviour under test: after one
# process dies, the others stop within the heartbeat timeout (the coordination service declares a
# silent process dead after HEARTBEAT_S plus about a second; a closed connection is noticed sooner).
# Measured from the death, not from the start (start-up on a loaded machine takes its own time),
# and generous: twice the heartbeat timeout plus 10 s for a loaded 2-core machine to tear down.
STOPPED_AFTER_DEATH_S = 2 * HEARTBEAT_S + 10


def _run(mode, num_processes, devices_per_process, *args, timeout=BOUND_S, **kwargs):
  return launch_local.run_local_processes(
    [sys.executable, WORKER, mode, *map(str, args)],
    num_processes,
    devices_per_process=devices_per_process,
    cwd=REPO,
    timeout=timeout,
    heartbeat_timeout=HEARTBEAT_S,
    echo=False,
    **kwargs,
  )


def _check(run):
  assert run.ok, '\n'.join(
    f'--- process {i} (rc {rc}):\n{run.output(i)[-3000:]}' for i, rc in enumerate(run.returncodes)
  )


# -----------------------------------------------------------------------------------------------
# detection
class TestDetectCluster:
  def test_single_process_by_default(self):
    assert dist.detect_cluster(environ={}) == dist.ClusterSpec('single')
    assert not dist.detect_cluster(
      environ={'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}
    ).is_multiprocess

  def test_explicit_arguments_and_environment(self):
    spec = dist.detect_cluster('10.0.0.1:1234', 4, 2, environ={})
    assert spec == dist.ClusterSpec('explicit', '10.0.0.1:1234', 4, 2)
    env = {dist.ENV_COORDINATOR: 'h:1', dist.ENV_NUM_PROCESSES: '2', dist.ENV_PROCESS_ID: '1'}
    assert dist.detect_cluster(environ=env) == dist.ClusterSpec('explicit', 'h:1', 2, 1)
    assert dist.detect_cluster(process_id=0, environ=env).process_id == 0  # Arguments win.
    assert not dist.detect_cluster(
      environ={**env, dist.ENV_NUM_PROCESSES: '1', dist.ENV_PROCESS_ID: '0'}
    ).is_multiprocess

  @pytest.mark.parametrize(
    'kwargs',
    [dict(coordinator_address='h:1'), dict(num_processes=2), dict(num_processes=2, process_id=1)],
  )
  def test_partial_settings_are_an_error(self, kwargs):
    with pytest.raises(ValueError, match='Incomplete multi-process settings'):
      dist.detect_cluster(environ={}, **kwargs)

  def test_bad_values(self):
    with pytest.raises(ValueError, match='process_id must be in'):
      dist.detect_cluster('h:1', 2, 2, environ={})
    with pytest.raises(ValueError, match='not an integer'):
      dist.detect_cluster(environ={dist.ENV_NUM_PROCESSES: 'two'})
    with pytest.raises(ValueError, match='expected'):
      dist.detect_cluster(environ={dist.ENV_MODE: 'maybe'})

  def test_off_wins(self):
    env = {dist.ENV_MODE: 'off', 'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '8'}
    assert not dist.detect_cluster(environ=env).is_multiprocess

  def test_slurm(self):
    env = {
      'SLURM_JOB_ID': '7',
      'SLURM_NTASKS': '8',
      'SLURM_STEP_NUM_TASKS': '8',
      'SLURM_PROCID': '3',
      'SLURM_LOCALID': '3',
      'SLURM_STEP_NODELIST': 'node[01-02]',
    }
    assert dist.detect_cluster(environ=env) == dist.ClusterSpec(
      'slurm'
    )  # JAX's own detection fills it in.
    del env['SLURM_STEP_NODELIST']  # python run directly in the batch script, not under srun
    with pytest.raises(ValueError, match='not started by srun'):
      dist.detect_cluster(environ=env)

  def test_open_mpi(self):
    env = {
      'OMPI_COMM_WORLD_SIZE': '4',
      'OMPI_COMM_WORLD_RANK': '1',
      'OMPI_COMM_WORLD_LOCAL_RANK': '1',
    }
    assert (
      dist.detect_cluster(environ={**env, 'OMPI_MCA_orte_hnp_uri': '1.0;tcp://10.0.0.1:1'}).kind
      == 'ompi'
    )
    with pytest.raises(ValueError, match='Open MPI >= 5'):
      dist.detect_cluster(environ=env)
    spec = dist.detect_cluster(environ={**env, dist.ENV_COORDINATOR: 'h0:1234'})
    assert spec == dist.ClusterSpec('ompi', 'h0:1234', 4, 1, (1,))

  def test_tpu(self):
    assert (
      dist.detect_cluster(environ={'TPU_WORKER_HOSTNAMES': 'a,b', 'TPU_WORKER_ID': '1'}).kind
      == 'tpu'
    )
    assert not dist.detect_cluster(environ={'TPU_WORKER_HOSTNAMES': 'a'}).is_multiprocess
    assert dist.detect_cluster(environ={'MEGASCALE_NUM_SLICES': '2'}).kind == 'tpu'
    assert dist.detect_cluster(environ={dist.ENV_MODE: 'jax'}).kind == 'jax'

  def test_kubernetes_indexed_job_and_jobset(self):
    env = {
      'JOB_COMPLETION_INDEX': '2',
      'HOSTNAME': 'lipflow-train-2',
      dist.ENV_NUM_PROCESSES: '4',
      dist.ENV_K8S_SERVICE: 'lipflow',
    }
    assert dist.detect_cluster(environ=env) == dist.ClusterSpec(
      'k8s', 'lipflow-train-0.lipflow:55527', 4, 2
    )
    env = {
      'JOB_COMPLETION_INDEX': '1',
      'HOSTNAME': 'run1-workers-0-1',
      'JOBSET_NAME': 'run1',
      dist.ENV_NUM_PROCESSES: '2',
      dist.ENV_COORDINATOR_PORT: '1234',
    }
    assert dist.detect_cluster(environ=env) == dist.ClusterSpec(
      'k8s', 'run1-workers-0-0.run1:1234', 2, 1
    )
    env = {'JOB_COMPLETION_INDEX': '1', dist.ENV_NUM_PROCESSES: '2', dist.ENV_COORDINATOR: 'c:1'}
    assert dist.detect_cluster(environ=env) == dist.ClusterSpec('k8s', 'c:1', 2, 1)

  @pytest.mark.parametrize('installed', [False, True])
  def test_kubernetes_without_a_process_count(self, monkeypatch, installed):
    """Without a process count, JAX's own k8s detection (jax[k8s], the ``kubernetes`` package)
    reads the Job's parallelism; without that package it is a clear error. Both branches run,
    whatever this machine has installed."""
    find_spec = dist.importlib.util.find_spec
    monkeypatch.setattr(
      dist.importlib.util,
      'find_spec',
      lambda name, *a: (
        (object() if installed else None) if name == 'kubernetes' else find_spec(name, *a)
      ),
    )
    env = {'JOB_COMPLETION_INDEX': '2', dist.ENV_COORDINATOR: 'c:1'}
    if installed:
      assert dist.detect_cluster(environ=env) == dist.ClusterSpec('k8s', 'c:1', None, None)
    else:
      with pytest.raises(ValueError, match='without a process count'):
        dist.detect_cluster(environ=env)


# -----------------------------------------------------------------------------------------------
# one process
def test_mesh_and_shard_batch_in_one_process(monkeypatch):
  monkeypatch.setenv(dist.ENV_MODE, 'off')  # whatever cluster the test session itself runs in
  assert dist.initialize() == dist.ClusterSpec('single')
  assert dist.initialize() is dist.initialize()
  assert not dist.is_multiprocess() and dist.is_main_process()
  mesh = dist.make_mesh()
  assert mesh.axis_names == ('data',) and mesh.devices.size == jax.device_count()
  assert dist.make_mesh(('data', 'model'), (-1, 2)).devices.shape == (jax.device_count() // 2, 2)
  with pytest.raises(ValueError, match='axis_shapes is needed'):
    dist.make_mesh(('data', 'model'))
  n = jax.device_count()
  batch = dist.shard_batch({'x': np.arange(2 * n * 3, dtype=np.float32).reshape(2 * n, 3)}, mesh)
  np.testing.assert_array_equal(np.asarray(batch['x']), np.arange(2 * n * 3).reshape(2 * n, 3))
  assert batch['x'].sharding.spec == jax.sharding.PartitionSpec('data')
  with pytest.raises(ValueError, match='not divisible'):
    dist.shard_batch(np.zeros((n + 1, 2)), mesh)
  assert dist.process_batch_size(2 * n) == 2 * n
  dist.sync('noop')
  assert dist.main_process_only(lambda: 5)() == 5


# -----------------------------------------------------------------------------------------------
# many processes
def test_sync_waits_for_every_process(tmp_path):
  """Process 1 reaches the barrier late (after process 0 is there) and leaves a mark just before;
  process 0, past the barrier, must see the mark. No clock is read."""
  run = _run('barrier', 2, 1, tmp_path)
  _check(run)
  assert 'past the barrier, process 1 was there: True' in run.output(0), run.output(0)[-2000:]


def test_local_launcher_prefixes_and_fails_fast():
  run = launch_local.run_local_processes(
    [
      sys.executable,
      '-c',
      'import os, time; p = os.environ["LIPFLOW_PROCESS_ID"]; print("hi", p, '
      'os.environ["XLA_FLAGS"]); time.sleep(1000 if p == "0" else 0); raise SystemExit(int(p) * 3)',
    ],
    2,
    devices_per_process=3,
    timeout=BOUND_S,
    echo=False,
  )
  # p0 (asleep far beyond the timeout) was stopped by the launcher's SIGTERM, not waited for.
  assert not run.timed_out and run.first_failure == 1, run
  assert run.returncodes == [-signal.SIGTERM, 3], run.returncodes
  assert 'hi 1 --xla_force_host_platform_device_count=3' in run.output(1)


def test_python_launcher_cli():
  env = dict(os.environ, LIPFLOW_LOCAL_COMMAND=f'{sys.executable} {WORKER} echo')
  out = subprocess.run(
    [sys.executable, '-m', 'lipflow_jax.launch_local', '--devices_per_process', '2', '2', '--a=1'],
    env=env,
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=BOUND_S,
    check=False,
  )
  assert out.returncode == 0, out.stdout + out.stderr
  assert '[p1] echo 1/2 devices=2 argv=--a=1' in out.stdout


def test_local_sh_launcher(tmp_path):
  script = os.path.join(REPO, 'launch', 'local.sh')
  env = dict(os.environ, LIPFLOW_LOCAL_COMMAND=f'{sys.executable} {WORKER} echo')
  out = subprocess.run(
    ['bash', script, '--devices_per_process=2', '3', '--workdir', str(tmp_path), '--x=1'],
    env=env,
    capture_output=True,
    text=True,
    timeout=BOUND_S,
    check=False,
  )
  assert out.returncode == 0, out.stdout + out.stderr
  for i in range(3):
    assert f'[p{i}] echo {i}/3 devices=2 argv=--workdir {tmp_path} --x=1' in out.stdout
  env['LIPFLOW_LOCAL_COMMAND'] = f'{sys.executable} {WORKER} fail_one'
  out = subprocess.run(
    ['bash', script, '2'], env=env, capture_output=True, text=True, timeout=BOUND_S, check=False
  )
  assert out.returncode != 0 and 'process 1 failed' in out.stdout + out.stderr


_FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: starts SLURM_NTASKS local processes with the environment srun gives its tasks.
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=localhost \\
      SLURM_STEP_NUM_TASKS=$SLURM_NTASKS SLURM_STEP_NUM_NODES=1 "$@" 2>&1 | sed "s/^/$i: /" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait $pid || rc=1; done
exit $rc
"""


def test_slurm_sbatch_script_with_a_fake_srun(tmp_path):
  """launch/slurm.sbatch end to end on this machine: JAX's own SLURM detection starts a 2-process
  job."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'srun').write_text(_FAKE_SRUN)
  (bin_dir / 'srun').chmod(0o755)
  (bin_dir / 'python').write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
  (bin_dir / 'python').chmod(0o755)
  venv = tmp_path / 'venv'
  (venv / 'bin').mkdir(parents=True)
  (venv / 'bin' / 'activate').write_text(f'export PATH={bin_dir}:$PATH\n')
  env = dict(
    os.environ,
    SLURM_JOB_ID='4242',
    SLURM_NTASKS='2',
    SLURM_JOB_NUM_NODES='1',
    SLURM_JOB_NODELIST='localhost',
    SLURM_SUBMIT_DIR=REPO,
    VENV=str(venv),
    JAX_PLATFORMS='cpu',
    JAX_COORDINATOR_PORT=str(launch_local.free_port()),
    XLA_FLAGS='--xla_force_host_platform_device_count=2',
    JAX_NUM_CPU_DEVICES='2',
    LIPFLOW_HEARTBEAT_TIMEOUT=str(HEARTBEAT_S),
    LIPFLOW_LOCAL_COMMAND='unused',
  )
  script = tmp_path / 'job.sh'
  # The sbatch script with its train command swapped for this file's worker.
  text = open(os.path.join(REPO, 'launch', 'slurm.sbatch')).read()
  assert 'python -m lipflow_jax.train "$@"' in text
  script.write_text(
    text.replace('python -m lipflow_jax.train "$@"', f'python {WORKER} whoami "$@"')
  )
  out = subprocess.run(
    ['bash', str(script), '--workdir=/x y'],
    env=env,
    capture_output=True,
    text=True,
    timeout=BOUND_S,
    check=False,
  )
  assert out.returncode == 0, out.stdout + out.stderr
  for i in range(2):
    assert (
      f"{i}: whoami slurm process {i}/2 devices 4 sum 6.0 argv ['--workdir=/x y']" in out.stdout
    ), out.stdout


def test_tpu_pod_script_runs_the_same_command_on_every_worker(tmp_path):
  """launch/tpu_pod.sh with a stand-in gcloud that runs the remote command here, as one worker
  would."""
  log = tmp_path / 'gcloud.log'
  gcloud = tmp_path / 'bin' / 'gcloud'
  gcloud.parent.mkdir()
  gcloud.write_text(f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {log}
if [[ "$4" == ssh ]]; then eval "${{@: -1}}"; fi
""")
  gcloud.chmod(0o755)
  remote = tmp_path / 'remote'
  (remote / '.venv' / 'bin').mkdir(parents=True)
  # `python -m lipflow_jax.train ARGS` there runs this file's worker with ARGS.
  activate = f'python() {{ shift 2; {sys.executable} {WORKER} whoami "$@"; }}\n'
  (remote / '.venv' / 'bin' / 'activate').write_text(activate)
  env = dict(
    os.environ,
    PATH=f"{gcloud.parent}:{os.environ['PATH']}",
    TPU_NAME='pod1',
    ZONE='zone-a',
    REMOTE_DIR=str(remote),
    JAX_PLATFORMS='cpu',
  )
  env.pop('PROJECT', None)
  out = subprocess.run(
    [
      'bash',
      os.path.join(REPO, 'launch', 'tpu_pod.sh'),
      '--config=c.py:tiny',
      '--workdir=/w x',
      '--config.seed=3',
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=BOUND_S,
    cwd=REPO,
    check=False,
  )
  calls = log.read_text()
  assert 'compute tpus tpu-vm ssh pod1 --zone=zone-a --worker=all --command' in calls, calls
  assert 'LIPFLOW_DISTRIBUTED=jax' in calls and r'--workdir=/w\ x' in calls, calls
  # Here there is no TPU metadata server, so JAX's detection has nothing to find: the run fails
  # clearly.
  assert out.returncode != 0 and 'coordinator_address should be defined' in out.stderr, out.stderr[
    -2000:
  ]


def test_k8s_manifests_render(tmp_path):
  script = os.path.join(REPO, 'launch', 'k8s', 'submit.sh')
  for kind in ('jobset', 'indexed-job'):
    env = dict(os.environ, DRY_RUN='1', KIND=kind, NAME='run7', NUM_PROCESSES='4', IMAGE='img:1')
    out = subprocess.run(
      ['bash', script, '--config=configs/x.py', '--workdir=/workdir/a b'],
      env=env,
      capture_output=True,
      text=True,
      timeout=30,
      check=True,
    )
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    job = docs[-1]['spec']['replicatedJobs'][0]['template'] if kind == 'jobset' else docs[-1]
    pod = job['spec']['template']['spec']
    container = pod['containers'][0]
    assert container['args'] == ['--config=configs/x.py', '--workdir=/workdir/a b']
    assert job['spec']['completionMode'] == 'Indexed' and job['spec']['parallelism'] == 4
    env_vars = {e['name']: e['value'] for e in container['env']}
    # What lipflow_jax.distributed decides inside pod 3.
    hostname = 'run7-workers-0-3' if kind == 'jobset' else 'run7-3'
    pod_env = dict(env_vars, JOB_COMPLETION_INDEX='3', HOSTNAME=hostname)
    if kind == 'jobset':
      assert docs[0]['spec']['network']['enableDNSHostnames']
      expected = 'run7-workers-0-0.run7:1234'
    else:
      assert docs[0]['kind'] == 'Service' and docs[0]['spec']['clusterIP'] == 'None'
      assert pod['subdomain'] == 'run7'
      expected = 'run7-0.run7:1234'
    assert dist.detect_cluster(environ=pod_env) == dist.ClusterSpec('k8s', expected, 4, 3)


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


TRAIN_ARGS = (
  '--config=configs/dam_synthetic.py:tiny',
  '--config.num_train_steps=3',
  '--config.log_every=1',
  '--config.eval_every=0',
  '--config.image_every=0',
  '--config.checkpoint_every=3',
  '--config.progress_bar=False',
)


@pytest.fixture(scope='module')
def train_runs(tiny_capture, tmp_path_factory):
  """The same three training steps of the real entry point (``configs/dam_synthetic.py:tiny``) as 1
  process x 4 devices and as 2 processes x 2 devices, then both checkpoints restored by one process
  with one device."""
  root = tmp_path_factory.mktemp('train')
  one, two = str(root / 'p1x4'), str(root / 'p2x2')
  args = TRAIN_ARGS + (f'--config.dataset.data_dir={tiny_capture.data_dir}',)
  runs = {}
  # The two jobs run side by side (a one-process compile leaves a core idle).
  single = threading.Thread(
    target=lambda: runs.setdefault(
      'one',
      launch_local.run_local_processes(
        [sys.executable, '-m', 'lipflow_jax.train', *args, f'--workdir={one}'],
        1,
        devices_per_process=4,
        cwd=REPO,
        timeout=4 * BOUND_S,
        echo=False,
      ),
    )
  )
  single.start()
  runs['two'] = _run('train_global_order', 2, 2, *args, f'--workdir={two}', timeout=4 * BOUND_S)
  single.join()
  _check(runs['one'])
  _check(runs['two'])
  restored = str(root / 'restored.npz')
  _check(_run('restore', 1, 1, one, two, restored))
  return one, two, np.load(restored)


@pytest.mark.slow
def test_two_processes_train_like_one(train_runs):
  """(a) 2 processes x 2 devices: the same losses and final parameters as 1 process x 4 devices."""
  one, two, _ = train_runs
  m1, m2 = (
    _read_jsonl(os.path.join(one, 'metrics.jsonl')),
    _read_jsonl(os.path.join(two, 'metrics.jsonl')),
  )
  assert [m['step'] for m in m1] == [m['step'] for m in m2] == [1, 2, 3]
  for key in ('train/loss', 'train/geo_mse', 'train/grad_norm'):
    np.testing.assert_allclose([m[key] for m in m2], [m[key] for m in m1], rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one_process(train_runs):
  """(b) The checkpoint of the 2-process run restores in a 1-process, 1-device run
  (``load_trained``), and holds the same final parameters as the 1-process run's."""
  _, _, restored = train_runs
  names = sorted(k[len('one/') :] for k in restored if k.startswith('one/'))
  assert names and names == sorted(k[len('two/') :] for k in restored if k.startswith('two/'))
  for name in names:
    np.testing.assert_allclose(
      restored['two/' + name], restored['one/' + name], rtol=1e-4, atol=1e-6, err_msg=name
    )
  assert restored['steps'].tolist() == [3, 3]


def test_each_example_read_by_exactly_one_process(tiny_capture, tmp_path):
  """(c) The train loop's input pipeline in a 2-process job: per epoch, every training example
  (frame, camera) is read by exactly one of the processes."""
  _check(_run('read', 2, 1, tiny_capture.data_dir, tmp_path))
  seen = [_read_jsonl(os.path.join(tmp_path, f'ids.p{i}.jsonl')) for i in range(2)]
  everything = {tuple(e) for e in seen[0][0]['all']}
  assert len(everything) == 48  # 12 frames x 4 training cameras
  for epoch in range(2):
    per_process = [[tuple(e) for r in s if r['epoch'] == epoch for e in r['ids']] for s in seen]
    assert all(len(p) == len(set(p)) for p in per_process), 'an example read twice by one process'
    assert not set(per_process[0]) & set(per_process[1]), 'an example read by both processes'
    assert set(per_process[0]) | set(per_process[1]) == everything, 'an example read by no process'


def _stopped_after_death(run, dead, finished_at):
  """Seconds from the death of process ``dead`` (its 'dies at' line) to the end of the run."""
  died_at = float(re.search(r'dies at ([\d.]+)', run.output(dead)).group(1))
  return finished_at - died_at


@pytest.mark.parametrize('how', ['exit', 'exception', 'coordinator_exit'])
def test_dead_process_stops_the_others(how):
  run = _run('die', 2, 1, how, kill_on_failure=False)  # no help from the launcher
  finished_at = time.time()
  assert not run.timed_out, 'a survivor hung'
  dead, survivor = (0, 1) if how == 'coordinator_exit' else (1, 0)
  assert run.returncodes[dead] != 0 and run.returncodes[survivor] != 0, run.returncodes
  assert 'step 3' in run.output(survivor)
  # Either the coordination service aborts it, or a collective fails on the lost connection (then
  # fail_fast).
  assert re.search(
    r'distributed service detected fatal errors|Gloo .* failed', run.output(survivor)
  ), run.output(survivor)[-2000:]
  assert _stopped_after_death(run, dead, finished_at) < STOPPED_AFTER_DEATH_S


@pytest.mark.slow
def test_silent_process_is_declared_dead_after_the_heartbeat_timeout():
  """Process 1 freezes (SIGSTOP: like a lost node, no connection is closed) while process 0 waits
  for it inside
  a collective; the coordination service stops process 0 after about HEARTBEAT_S seconds."""
  run = _run('die', 2, 1, 'freeze', grace_s=1)  # the launcher then kills the frozen process
  finished_at = time.time()
  assert not run.timed_out, 'the survivor hung'
  assert run.returncodes[0] == -signal.SIGABRT, run.returncodes
  assert 'stopped sending heartbeats' in run.output(0), run.output(0)[-2000:]
  assert _stopped_after_death(run, 1, finished_at) < STOPPED_AFTER_DEATH_S


# -----------------------------------------------------------------------------------------------
# the worker
def _worker(mode, args):
  """Entry point of the child processes.

  The imports of the training stack stay inside the modes that use it: they load orbax, grain and
  TFDS, which every other worker process would pay for at start-up.
  """
  if mode == 'echo':  # launch/local.sh check: no JAX needed
    print(
      f'echo {os.environ[dist.ENV_PROCESS_ID]}/{os.environ[dist.ENV_NUM_PROCESSES]} devices='
      f'{os.environ["JAX_NUM_CPU_DEVICES"]} argv={" ".join(args)}'
    )
    return
  if mode == 'fail_one':
    raise SystemExit(3 if os.environ[dist.ENV_PROCESS_ID] == '1' else 0)

  if (
    mode == 'train_global_order'
  ):  # the real entry point (its input pipeline walks one process-count-free order)
    from absl import app  # pylint: disable=g-import-not-at-top

    from lipflow_jax.train import __main__ as train_main  # pylint: disable=g-import-not-at-top

    app.run(train_main.main, argv=['lipflow_jax.train', *args])
    return

  spec = dist.initialize()
  pid, nproc = jax.process_index(), jax.process_count()
  mesh = dist.make_mesh()
  rep = NamedSharding(mesh, P())

  if mode == 'read':  # (c) the train loop's iterator, as the train loop makes it, over two epochs
    from lipflow_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

    data_dir, out = args
    sources, meta = input_pipeline.load_dataset(data_dir, 'synthetic_capture', 'tiny')
    everything = input_pipeline.select_records(meta, 'train', meta.train_cameras)
    cols = meta.splits['train']
    it = input_pipeline.make_iterator(
      sources['train'],
      meta,
      batch_size=4,
      seed=0,
      shuffle=True,
      num_epochs=2,
      split='train',
      cameras=meta.train_cameras,
    )
    ids = [(int(f), int(c)) for b in it for f, c in zip(b['frame_index'], b['camera_index'])]
    with open(os.path.join(out, f'ids.p{pid}.jsonl'), 'w') as f:
      for e in range(2):
        f.write(
          json.dumps(
            dict(
              epoch=e,
              ids=ids[e * len(ids) // 2 : (e + 1) * len(ids) // 2],
              all=[(int(cols['frame_index'][r]), int(cols['camera_index'][r])) for r in everything],
            )
          )
          + '\n'
        )
    dist.sync('read')
    return

  if mode == 'restore':  # (b) one process (one device) restores what 1 and 2 processes wrote
    from lipflow_jax.train import checkpointing  # pylint: disable=g-import-not-at-top

    one, two, out = args
    flat, steps = {}, []
    for name, workdir in (('one', one), ('two', two)):
      trained = checkpointing.load_trained(workdir)
      steps.append(trained.step)
      for path, leaf in jax.tree_util.tree_flatten_with_path(trained.params)[0]:
        flat[f'{name}/{jax.tree_util.keystr(path)}'] = np.asarray(leaf)
    np.savez(out, steps=np.asarray(steps), **flat)
    return

  if mode == 'barrier':  # process 1 comes late: after process 0 is at the barrier
    (out,) = args
    ready, late = os.path.join(out, 'p0_at_barrier'), os.path.join(out, 'p1_came')
    if pid == 0:
      open(ready, 'w').close()
    else:
      while not os.path.exists(ready):
        time.sleep(0.05)
      time.sleep(0.5)  # process 0 is inside sync by now, or would have passed it
      open(late, 'w').close()
    dist.sync('late')
    if pid == 0:
      print(f'past the barrier, process 1 was there: {os.path.exists(late)}', flush=True)
    return

  if mode == 'whoami':  # which job this process thinks it is in, and one collective
    total = jax.jit(lambda x: x.sum())(dist.shard_batch(np.full((2,), pid + 1.0, np.float32), mesh))
    print(
      f'whoami {spec.kind} process {pid}/{nproc} devices {jax.device_count()} sum {float(total)} '
      f'argv {args}'
    )
    return

  def loss_fn(params, batch, rng):
    noise = 0.1 * jax.random.normal(
      rng, batch['x'].shape[:1] + (4,)
    )  # per-position, like z ~ q(z|x)
    pred = jnp.tanh(batch['x'] @ params['w'] + params['b']) + noise
    return jnp.mean((pred - batch['y']) ** 2)

  tx = optax.adam(0.05)

  @jax.jit
  def step(params, opt_state, batch, i):
    loss, grads = jax.value_and_grad(loss_fn)(
      params, batch, jax.random.fold_in(jax.random.key(0), i)
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  init = jax.jit(
    lambda: {'w': jax.random.normal(jax.random.key(1), (8, 4)) * 0.3, 'b': jnp.zeros(4)},
    out_shardings=rep,
  )
  global_batch, local = 8, dist.process_batch_size(8, mesh)

  def batch_of(i):  # the global batch of step i; this process takes its rows
    r = np.random.default_rng(i)
    x, y = (
      r.normal(size=(global_batch, 8)).astype(np.float32),
      r.normal(size=(global_batch, 4)).astype(np.float32),
    )
    return dist.shard_batch(
      {'x': x[pid * local : (pid + 1) * local], 'y': y[pid * local : (pid + 1) * local]}, mesh
    )

  if mode == 'die':  # (d) one process dies mid-run.
    how = args[0]
    params = init()
    opt_state = jax.jit(tx.init, out_shardings=rep)(params)
    for i in range(100000):
      params, opt_state, loss = step(params, opt_state, batch_of(i % 7), i)
      print(f'step {i} loss {float(loss):.4f}', flush=True)
      if i == 3:
        if (pid == 0) == (how == 'coordinator_exit'):
          print(f'dies at {time.time():.3f}', flush=True)
        if how == 'exit' and pid == 1:
          os._exit(3)
        if how == 'exception' and pid == 1:
          raise RuntimeError('simulated failure in process 1')
        if how == 'coordinator_exit' and pid == 0:
          os._exit(3)
        if how == 'freeze' and pid == 1:
          os.kill(os.getpid(), signal.SIGSTOP)
    return

  raise ValueError(f'unknown mode {mode!r}')


if __name__ == '__main__':
  _worker(sys.argv[1], sys.argv[2:])
