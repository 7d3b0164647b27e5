"""Tests of lipflow_jax.train on the tiny synthetic capture: loss goes down, data-parallel step
equals the one-device step, resume equals an uninterrupted run, non-finite steps are skipped and
counted, too many stop the run, metrics and TensorBoard files are written.

The runs share one config (``configs/dam_synthetic.py:tiny``), so the loop's in-process function
cache compiles the step once for all of them.
"""

import importlib
import json
import os
import signal
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from configs import dam_synthetic, regressor_synthetic
from lipflow_jax import config_base, distributed, train
from lipflow_jax.data import input_pipeline
from lipflow_jax.train import checkpointing, metrics_logging
from lipflow_jax.train import tasks as tasks_lib
from lipflow_jax.train import train_state as ts
from lipflow_jax.train import train_step as tstep

CONFIG_NAMES = (
  'dam_synthetic',
  'lipflow_synthetic',
  'conditional_gaussian_synthetic',
  'flow_synthetic',
  'regressor_synthetic',
  'direct_synthetic',
  'dam_multiface',
  'lipflow_multiface',
)


@pytest.fixture(scope='module')
def tiny_config(tiny_capture):
  config = dam_synthetic.get_config('tiny')
  config.dataset.data_dir = tiny_capture.data_dir
  config.progress_bar = False
  return config


@pytest.fixture(scope='module')
def full_run(tiny_config, tmp_path_factory):
  """An uninterrupted tiny run (30 steps, checkpoints every 10)."""
  workdir = str(tmp_path_factory.mktemp('full'))
  result = train.train_and_evaluate(tiny_config, workdir)
  return workdir, result


def _max_abs_diff(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


# --------------------------------------------------------------------------------------------------
# the loop
def test_short_run_lowers_reconstruction_losses(full_run):
  workdir, result = full_run
  assert result.stopped == 'finished' and result.step == 30
  rows = [r for r in metrics_logging.read_metrics(workdir) if 'train/loss' in r]
  assert [r['step'] for r in rows] == [5, 10, 15, 20, 25, 30]
  for key in ('train/tex_mse', 'train/geo_mse', 'train/loss'):
    assert rows[-1][key] < rows[0][key], (key, rows[0][key], rows[-1][key])
  assert rows[-1]['train/nonfinite_total'] == 0


def test_writes_metrics_tensorboard_config_and_checkpoints(full_run, tiny_config):
  workdir, _ = full_run
  assert os.path.exists(os.path.join(workdir, 'metrics.jsonl'))
  events = [
    f
    for f in os.listdir(os.path.join(workdir, 'tensorboard'))
    if f.startswith('events.out.tfevents')
  ]
  assert events and os.path.getsize(os.path.join(workdir, 'tensorboard', events[0])) > 0
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['num_train_steps'] == tiny_config.num_train_steps
  rows = metrics_logging.read_metrics(workdir)
  assert any('eval/loss' in r for r in rows)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert steps == [10, 20, 30]  # every 10 steps, keep 3
  assert os.path.exists(
    os.path.join(workdir, 'checkpoints', '30', 'data_iter', 'process_0-of-1.json')
  )


def test_tensorboard_has_scalars_and_images(full_run):
  workdir, _ = full_run
  tb = os.path.join(workdir, 'tensorboard')
  tags = set()
  for name in os.listdir(tb):
    with open(os.path.join(tb, name), 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        tags.add((v.tag, v.WhichOneof('value')))
  assert ('train/loss', 'simple_value') in tags
  assert any(kind == 'image' and tag.startswith('texture/') for tag, kind in tags), tags


def test_resume_continues_the_same_run(full_run, tiny_config, tmp_path):
  _, full = full_run
  workdir = str(tmp_path / 'resumed')
  first = train.train_and_evaluate(tiny_config, workdir, stop_after=10)
  assert first.stopped == 'preempted' and first.step == 10
  second = train.train_and_evaluate(tiny_config, workdir)
  assert second.stopped == 'finished' and second.step == 30
  assert _max_abs_diff(second.state.params, full.state.params) <= 1e-6
  assert _max_abs_diff(second.state.opt_state, full.state.opt_state) <= 1e-6
  # The same batches: the logged losses after the resume equal the uninterrupted run's.
  full_rows = {r['step']: r for r in metrics_logging.read_metrics(full_run[0]) if 'train/loss' in r}
  rows = {r['step']: r for r in metrics_logging.read_metrics(workdir) if 'train/loss' in r}
  for step in (15, 20, 25, 30):
    np.testing.assert_allclose(rows[step]['train/loss'], full_rows[step]['train/loss'], rtol=1e-6)
  third = train.train_and_evaluate(tiny_config, workdir)
  assert third.stopped == 'already_finished' and third.step == 30


# The child of the hard-kill test: trains like ``full_run`` and SIGKILLs itself when it asks for
# the batch of step KILL_AT + 1, once the checkpoint of step 10 is on disk (between checkpoints).
_KILLED_RUN = """
import os, signal, sys, time
from configs import dam_synthetic
from lipflow_jax import train
from lipflow_jax.data import input_pipeline

data_dir, workdir, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = dam_synthetic.get_config('tiny')
config.dataset.data_dir = data_dir
config.progress_bar = False
make = input_pipeline.make_iterator


class Killing:
  def __init__(self, it):
    self.it, self.n = it, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.n == kill_at:
      done = os.path.join(workdir, 'checkpoints', '10')
      for _ in range(600):
        if os.path.isdir(done):
          break
        time.sleep(0.1)
      print('killing myself at step', self.n, flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    self.n += 1
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


input_pipeline.make_iterator = lambda *a, **k: (
  Killing(make(*a, **k)) if k.get('shuffle') else make(*a, **k)
)
train.train_and_evaluate(config, workdir)
"""


def test_resume_after_a_hard_kill_between_checkpoints(full_run, tiny_config, tmp_path):
  """SIGKILL at step 15 (checkpoints every 10, no chance to save): running the same command again
  resumes from step 10 and ends exactly where the uninterrupted run ended."""
  full_dir, full = full_run
  workdir = str(tmp_path / 'killed')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  child = subprocess.run(
    [sys.executable, '-c', _KILLED_RUN, tiny_config.dataset.data_dir, workdir, '15'],
    env=env,
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert child.returncode == -signal.SIGKILL, child.stdout[-2000:] + child.stderr[-3000:]
  assert 'killing myself at step 15' in child.stdout
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert steps == [10]
  resumed = train.train_and_evaluate(tiny_config, workdir)
  assert resumed.stopped == 'finished' and resumed.step == 30
  assert _max_abs_diff(resumed.state.params, full.state.params) <= 1e-6
  assert _max_abs_diff(resumed.state.opt_state, full.state.opt_state) <= 1e-6
  # The steps after the resume saw the same batches (the killed run's rows up to step 15 stay).
  full_rows = {r['step']: r for r in metrics_logging.read_metrics(full_dir) if 'train/loss' in r}
  rows = {r['step']: r for r in metrics_logging.read_metrics(workdir) if 'train/loss' in r}
  for step in (15, 20, 25, 30):
    np.testing.assert_allclose(rows[step]['train/loss'], full_rows[step]['train/loss'], rtol=1e-6)


def test_regressor_trains_to_the_frozen_teacher(full_run, tiny_config, tmp_path):
  teacher_dir, teacher = full_run
  config = regressor_synthetic.get_config('tiny')
  config.dataset.data_dir = tiny_config.dataset.data_dir
  config.teacher_workdir = teacher_dir
  config.progress_bar = False
  config.num_train_steps, config.eval_every, config.checkpoint_every = 10, 0, 10
  result = train.train_and_evaluate(config, str(tmp_path))
  rows = [r for r in metrics_logging.read_metrics(str(tmp_path)) if 'train/loss' in r]
  assert rows[-1]['train/regressor_mse'] < rows[0]['train/regressor_mse']
  trained = train.load_trained(str(tmp_path))
  assert (
    trained.kind == 'regressor'
    and sorted(trained.model) == ['hmc', 'keypoints']
    and trained.step == 10
  )
  assert _max_abs_diff(trained.params, result.state.params) == 0.0
  # The teacher itself loads on one device although it was trained on eight.
  loaded = train.load_trained(teacher_dir)
  assert loaded.kind == 'avatar' and loaded.model.prior == 'gaussian' and loaded.step == 30
  assert _max_abs_diff(loaded.params, teacher.state.params) == 0.0


class _NaNIterator:
  """Wraps a data iterator, turning the batches of the given 0-based indices into NaN
  (``verts``)."""

  def __init__(self, it, bad):
    self._it, self._bad, self._i = iter(it), set(bad), 0
    self._wrapped = it

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    if self._i in self._bad:
      batch = dict(batch, verts=np.full_like(batch['verts'], np.nan))
    self._i += 1
    return batch

  def get_state(self):
    return self._wrapped.get_state()

  def set_state(self, state):
    self._wrapped.set_state(state)


def test_too_many_consecutive_nonfinite_steps_stop_the_run(tiny_config, tmp_path, monkeypatch):
  make = input_pipeline.make_iterator
  bad = {2} | set(range(10, 30))  # one isolated bad batch (skipped, counted), then a divergence
  monkeypatch.setattr(
    input_pipeline,
    'make_iterator',
    lambda *a, **k: _NaNIterator(make(*a, **k), bad) if k.get('shuffle') else make(*a, **k),
  )
  config = tiny_config.copy_and_resolve_references()
  config.max_consecutive_nonfinite = 3
  with pytest.raises(
    train.NonFiniteLossError,
    match=r'Stopping at step 14: .* 4 consecutive steps \(steps 11\.\.14\)'
    r'.*max_consecutive_nonfinite=3',
  ):
    train.train_and_evaluate(config, str(tmp_path))
  rows = [r for r in metrics_logging.read_metrics(str(tmp_path)) if 'train/loss' in r]
  assert (
    rows[0]['step'] == 5 and rows[0]['train/skipped'] == 1 and rows[0]['train/nonfinite_total'] == 1
  )
  assert rows[1]['step'] == 10 and rows[1]['train/nonfinite_total'] == 1


# --------------------------------------------------------------------------------------------------
# the step
@pytest.fixture(scope='module')
def step_setup(tiny_config, tiny_capture, tiny_dam_params):
  """A tiny DAM task, optimiser, initial parameters (numpy; the session's, see conftest) and one
  global batch of 8 real examples."""
  batch = tiny_capture.batch(batch_size=8)
  sizes = tasks_lib.data_sizes(batch, tiny_capture.meta)
  model = tasks_lib.build_model(tiny_config.model.to_dict(), sizes)
  task = tasks_lib.avatar_task(model, loss_weights=tiny_config.loss.to_dict())
  tx = ts.make_optimizer(ts.make_learning_rate_schedule(1e-3, 100, 2), clip_norm=10.0)
  return task, tx, tiny_dam_params, batch


def _fresh_state(step_setup, mesh):
  _, tx, params, _ = (
    step_setup  # numpy, so that every state gets its own buffers (the step donates them)
  )
  state = jax.device_get(ts.create_train_state(params, tx, jax.random.PRNGKey(1)))
  return jax.device_put(state, tstep.replicated_sharding(mesh))


def _nan(batch):
  return dict(batch, verts=np.full_like(batch['verts'], np.nan))


@pytest.fixture(scope='module')
def one_device_step(step_setup):
  task, tx, _, _ = step_setup
  mesh = distributed.make_mesh(num_devices=1)
  return mesh, tstep.jit_train_step(task.loss_fn, tx, mesh)


def _run_steps(state, step, mesh, batches):
  metrics = []
  for b in batches:
    state, m = step(state, distributed.shard_batch(b, mesh), {})
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def test_sharded_step_equals_one_device_step(step_setup, one_device_step):
  assert jax.device_count() == 8
  task, tx, _, batch = step_setup
  batches = [batch, _nan(batch), batch]
  mesh1, step1 = one_device_step
  state1, metrics1 = _run_steps(_fresh_state(step_setup, mesh1), step1, mesh1, batches)
  mesh8 = distributed.make_mesh(num_devices=8)
  step8 = tstep.jit_train_step(task.loss_fn, tx, mesh8)
  state8, metrics8 = _run_steps(_fresh_state(step_setup, mesh8), step8, mesh8, batches)
  assert [float(m['skipped']) for m in metrics8] == [0.0, 1.0, 0.0]
  for m1, m8 in zip(metrics1, metrics8):
    np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nonfinite_step_is_skipped_and_counted(step_setup, one_device_step):
  _, _, _, batch = step_setup
  mesh, step = one_device_step
  state, _ = step(_fresh_state(step_setup, mesh), distributed.shard_batch(batch, mesh), {})
  before = jax.device_get(state)
  state, m = step(state, distributed.shard_batch(_nan(batch), mesh), {})
  after = jax.device_get(state)
  # The NaN step leaves parameters and optimiser state exactly as they were, and is counted.
  assert float(m['skipped']) == 1.0 and not np.isfinite(float(m['loss']))
  assert _max_abs_diff(after.params, before.params) == 0.0
  assert _max_abs_diff(after.opt_state, before.opt_state) == 0.0
  assert (int(after.step), int(after.nonfinite_total), int(after.nonfinite_consecutive)) == (
    2,
    1,
    1,
  )
  state, m = step(state, distributed.shard_batch(batch, mesh), {})
  assert (
    float(m['skipped']) == 0.0
    and int(state.nonfinite_consecutive) == 0
    and int(state.nonfinite_total) == 1
  )


# --------------------------------------------------------------------------------------------------
# pieces
def test_sigterm_requests_a_checkpoint_and_stop():
  received = []
  previous = lambda signum, frame: received.append(signum)  # a handler the watcher must give back
  saved = signal.signal(signal.SIGTERM, previous)
  try:
    watcher = checkpointing.PreemptionWatcher(install=True)
    try:
      assert not watcher.should_stop(0)
      os.kill(os.getpid(), signal.SIGTERM)
      assert watcher.should_stop(1) and received == []  # the watcher caught it, not the old one
    finally:
      watcher.close()
    # Closed, the watcher has put the previous handler back: SIGTERM reaches it again.
    assert signal.getsignal(signal.SIGTERM) is previous
    os.kill(os.getpid(), signal.SIGTERM)
    assert received == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, saved)


def test_learning_rate_schedule_warms_up_and_decays():
  schedule = ts.make_learning_rate_schedule(1e-3, total_steps=100, warmup_steps=10, end_factor=0.1)
  np.testing.assert_allclose(
    [schedule(0), schedule(5), schedule(10), schedule(100)],
    [0, 5e-4, 1e-3, 1e-4],
    rtol=1e-5,
    atol=1e-9,
  )
  with pytest.raises(ValueError, match='decay'):
    ts.make_learning_rate_schedule(1e-3, 100, decay='step')


def _schedule_reference(step, lr, total, warmup, decay, end_factor):
  """The schedule written out: linear warm-up 0 -> lr over ``warmup`` steps, then ``decay`` from lr
  to lr * end_factor over the remaining steps, then flat."""
  if step < warmup:
    return lr * step / warmup
  t = min(step - warmup, total - warmup) / (total - warmup)
  end = lr * end_factor
  if decay == 'cosine':
    return end + (lr - end) * 0.5 * (1.0 + np.cos(np.pi * t))
  if decay == 'linear':
    return lr + (end - lr) * t
  return lr


@pytest.mark.parametrize('decay', ['cosine', 'linear', 'constant'])
@pytest.mark.parametrize('warmup', [0, 7])
def test_learning_rate_schedule_shape(decay, warmup):
  lr, total, end_factor = 3e-3, 50, 0.2
  schedule = ts.make_learning_rate_schedule(lr, total, warmup, decay=decay, end_factor=end_factor)
  steps = np.arange(0, total + 11)
  got = np.asarray([float(schedule(s)) for s in steps])
  want = [_schedule_reference(s, lr, total, warmup, decay, end_factor) for s in steps]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  # The shape in words: rising during the warm-up, then never rising, the peak lr at the warm-up's
  # end, the end value from the last step on.
  assert np.all(np.diff(got[: warmup + 1]) > 0)
  assert np.all(np.diff(got[warmup:]) <= 1e-12)
  assert got[warmup] == pytest.approx(lr, rel=1e-6)
  final = lr if decay == 'constant' else lr * end_factor
  np.testing.assert_allclose(got[total:], final, rtol=1e-5)


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_configs_resolve(name):
  module = importlib.import_module(f'configs.{name}')
  for arg in (None, 'tiny'):
    config = module.get_config(arg)
    assert config.batch_size > 0 and config.num_train_steps > 0
    if config.task == 'avatar':
      size = 32 if arg == 'tiny' else (1024 if 'multiface' in name else 64)
      model = tasks_lib.build_model(
        config.model.to_dict(),
        dict(num_vertices=100, tex_size=size, keypoint_image_size=(64, 64), num_cameras=4),
      )
      assert model.tex_size == size
  with pytest.raises(ValueError, match='unknown config option'):
    module.get_config('huge')
  assert set(config_base.VARIANTS) == {'default', 'tiny'}


def test_keypoint_augmentation_noise_and_dropout():
  kp = jnp.full((64, 500, 2), 40.0)
  vis = jnp.ones((64, 500))
  batch = {'keypoints': kp, 'keypoints_visible': vis, 'verts': jnp.ones((64, 3))}
  out = tasks_lib.augment_keypoints(batch, jax.random.PRNGKey(0), noise_px=2.0, dropout=0.1)
  noise = np.asarray(out['keypoints'] - kp)
  assert (
    abs(noise.mean()) < 0.02 and abs(noise.std() - 2.0) < 0.02
  )  # 64,000 samples: std error ~0.006
  assert abs(1.0 - float(out['keypoints_visible'].mean()) - 0.1) < 0.005
  np.testing.assert_array_equal(out['verts'], batch['verts'])
  assert tasks_lib.augment_keypoints({'verts': kp}, jax.random.PRNGKey(0), 2.0, 0.1).keys() == {
    'verts'
  }

  # The wrapped loss sees a fresh augmentation per rng and the same one for the same rng.
  task = tasks_lib.Task(
    model=None,
    init_params=lambda rng, b: {},
    loss_fn=lambda p, f, b, rng: (jnp.sum(b['keypoints']), {}),
  )
  aug = tasks_lib.with_keypoint_augmentation(task, 1.0, 0.0)
  l1 = aug.loss_fn({}, {}, batch, jax.random.PRNGKey(1))[0]
  l2 = aug.loss_fn({}, {}, batch, jax.random.PRNGKey(2))[0]
  assert float(l1) != float(l2) and float(l1) == float(
    aug.loss_fn({}, {}, batch, jax.random.PRNGKey(1))[0]
  )
  assert tasks_lib.with_keypoint_augmentation(task, 0.0, 0.0) is task
  with pytest.raises(ValueError, match='dropout'):
    tasks_lib.with_keypoint_augmentation(task, 1.0, 1.5)
