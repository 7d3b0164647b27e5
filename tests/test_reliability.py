"""Bad input gets a clear error or a counted skip; a damaged checkpoint loses nothing.

One section per class: damaged orbax checkpoints (real files damaged on disk), ``metrics.jsonl``
after a resume, config values out of range and unknown keys (also through the commands), corrupted
reader inputs (KRT, OBJ, head pose, textures) and observations given to the fitting API.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dam_synthetic
from lipflow_jax import config_base, config_validation, data, fit, geometry, train
from lipflow_jax.data import builders, capture, multiface_export, schema
from lipflow_jax.data import multiface as mf
from lipflow_jax.data import multiface_format as fmt
from lipflow_jax.experiment import driving
from lipflow_jax.train import checkpointing, metrics_logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ checkpoints
class _Iterator:
  """The smallest data iterator the checkpoint handler accepts."""

  def __init__(self, i=0):
    self.state = {'i': i}

  def get_state(self):
    return dict(self.state)

  def set_state(self, state):
    self.state = dict(state)


def _state(step):
  """A train-state-like tree; random values, so that the arrays are written as real data files."""
  key = jax.random.PRNGKey(step)
  return {'w': jax.random.normal(key, (200, 100)), 'b': jnp.arange(7.0) * step, 'step': step}


def _template():
  return jax.tree.map(jnp.zeros_like, _state(1))


def _saved(directory, steps=(1, 2)):
  manager = checkpointing.make_checkpoint_manager(
    str(directory), save_every=1, keep=5, async_save=False
  )
  for s in steps:
    checkpointing.save(manager, s, _state(s), _Iterator(s))
  manager.wait_until_finished()
  manager.close()
  return directory


def _largest_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_*', 'd', '*'))
  return max(files, key=os.path.getsize)


def _remove_array_file(step_dir):
  os.remove(_largest_array_file(step_dir))


def _truncate_array_file(step_dir):
  path = _largest_array_file(step_dir)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _remove_manifest(step_dir):
  os.remove(os.path.join(step_dir, 'state', 'manifest.ocdbt'))


def _remove_iterator_state(step_dir):
  os.remove(os.path.join(step_dir, 'data_iter', 'process_0-of-1.json'))


DAMAGE = [_remove_array_file, _truncate_array_file, _remove_manifest, _remove_iterator_state]


@pytest.mark.parametrize('damage', DAMAGE, ids=lambda f: f.__name__.strip('_'))
def test_damaged_newest_checkpoint_falls_back_and_is_kept_aside(tmp_path, damage, caplog):
  directory = _saved(tmp_path / 'checkpoints')
  damage(str(directory / '2'))
  files_before = sorted(p.name for p in (directory / '2').rglob('*'))
  manager = checkpointing.make_checkpoint_manager(str(directory), save_every=1, keep=5)
  iterator = _Iterator()
  with caplog.at_level('WARNING'):
    state, step = checkpointing.restore(manager, _template(), iterator)
  assert step == 1 and iterator.state == {'i': 1}
  np.testing.assert_array_equal(state['w'], _state(1)['w'])
  # Moved aside, never deleted; the warning names the damaged directory.
  aside = directory / ('2' + checkpointing.DAMAGED_SUFFIX)
  assert not (directory / '2').exists()
  assert sorted(p.name for p in aside.rglob('*')) == files_before
  assert str(directory / '2') in caplog.text and str(aside) in caplog.text
  # The manager goes on: step 2 is written again beside the damaged copy.
  checkpointing.save(manager, 2, state, iterator, force=True)
  manager.wait_until_finished()
  assert manager.all_steps() == [1, 2]
  manager.close()
  assert (directory / '2' / 'state').is_dir() and aside.is_dir()


def test_missing_metadata_loses_nothing(tmp_path):
  directory = _saved(tmp_path / 'checkpoints')
  os.remove(directory / '2' / 'state' / '_METADATA')
  os.remove(directory / '2' / '_CHECKPOINT_METADATA')
  # Training restores into a template and does not need the metadata: step 2 is read.
  manager = checkpointing.make_checkpoint_manager(str(directory), save_every=1, keep=5)
  state, step = checkpointing.restore(manager, _template(), _Iterator())
  manager.close()
  assert step == 2
  np.testing.assert_array_equal(state['w'], _state(2)['w'])
  # Reading a run without a template needs it: step 1 is loaded, step 2 is left where it is.
  state, step = checkpointing.restore_state_for_inference(str(directory))
  assert step == 1 and (directory / '2').is_dir()
  np.testing.assert_array_equal(state['w'], _state(1)['w'])


def test_no_readable_checkpoint_stops_naming_the_steps_tried(tmp_path):
  directory = _saved(tmp_path / 'checkpoints')
  _remove_manifest(str(directory / '2'))
  _truncate_array_file(str(directory / '1'))
  manager = checkpointing.make_checkpoint_manager(str(directory), save_every=1, keep=5)
  with pytest.raises(checkpointing.CheckpointRestoreError, match=r'tried step 2 .*; step 1 '):
    checkpointing.restore(manager, _template(), _Iterator())
  manager.close()
  assert sorted(os.listdir(directory)) == ['1', '2']  # nothing moved when nothing can be read


def test_metrics_jsonl_has_each_step_once_after_a_resume(tmp_path):
  workdir = str(tmp_path)
  writer = metrics_logging.MetricWriter(workdir, enabled=True, tensorboard=False)
  for step in (5, 10, 15):
    writer.write_scalars(step, {'train/loss': step})
  writer.write_scalars(15, {'eval/loss': 1.5})  # the same step: merged into its line
  writer.close()
  with open(os.path.join(workdir, metrics_logging.METRICS_FILE), 'a') as f:
    f.write('{"step": 20, "train/lo')  # torn by a kill
  # Resumed from the checkpoint of step 10: steps 15 and 20 are replayed.
  writer = metrics_logging.MetricWriter(workdir, enabled=True, tensorboard=False, start_step=10)
  for step in (15, 20):
    writer.write_scalars(step, {'train/loss': step + 0.5})
  writer.write_scalars(20, {'eval/loss': 2.5})
  writer.close()
  rows = metrics_logging.read_metrics(workdir)
  assert [r['step'] for r in rows] == [5, 10, 15, 20]
  assert rows[2] == {'step': 15, 'train/loss': 15.5}
  assert rows[3] == {'step': 20, 'train/loss': 20.5, 'eval/loss': 2.5}


def test_train_resumes_past_a_damaged_checkpoint(tiny_capture, tmp_path):
  """The train loop: a truncated array file in the newest step; the same call again resumes from
  the step before, ends where the first run ended and logs each step once. (The config differs
  from test_train's only outside the compiled step, so that both share one compilation.)"""
  config = dam_synthetic.get_config('tiny')
  config.dataset.data_dir = tiny_capture.data_dir
  config.progress_bar = False
  config.checkpoint_every, config.log_every = 4, 2
  workdir = str(tmp_path / 'run')
  first = train.train_and_evaluate(config, workdir, stop_after=8)
  _truncate_array_file(os.path.join(workdir, 'checkpoints', '8'))
  with open(os.path.join(workdir, metrics_logging.METRICS_FILE)) as f:
    logged = f.read()
  second = train.train_and_evaluate(config, workdir, stop_after=8)
  assert first.step == second.step == 8
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '8', '8.damaged']
  for a, b in zip(jax.tree.leaves(first.state.params), jax.tree.leaves(second.state.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  rows = metrics_logging.read_metrics(workdir)
  assert [r['step'] for r in rows] == [2, 4, 6, 8] and logged.count('"step"') == 4


# ------------------------------------------------------------------------------------ configs
def test_config_out_of_range_names_the_key_and_range():
  config = dam_synthetic.get_config('tiny')
  config.optimizer.learning_rate = -1e-3
  config.augment.keypoint_dropout = 1.5
  with pytest.raises(config_validation.ConfigError) as info:
    config_validation.validate_config(config)
  text = str(info.value)
  assert 'config.optimizer.learning_rate = -0.001: must be a finite number > 0' in text
  assert 'config.augment.keypoint_dropout = 1.5: must be a finite number >= 0 and <= 1' in text


def test_config_nested_model_configs_of_the_main_job_are_checked():
  config = config_base.load_config(os.path.join(REPO, 'configs', 'demo.py:tiny'))
  config_validation.validate_config(config)  # the shipped config passes
  config.models.lipflow.batch_size = -4
  config.models.dam.model.z_dim = 0
  config.fit.hmc.lr = float('nan')
  with pytest.raises(config_validation.ConfigError) as info:
    config_validation.validate_config(config)
  text = str(info.value)
  assert 'config.models.lipflow.batch_size = -4: must be an integer >= 1' in text
  assert 'config.models.dam.model.z_dim = 0' in text and 'config.fit.hmc.lr = nan' in text


def test_config_unknown_key_suggests_the_known_one(tmp_path):
  config = dam_synthetic.get_config('tiny')
  config.optimizer.learing_rate = 0.1
  with pytest.raises(config_validation.ConfigError, match='did you mean config.optimizer.learn'):
    config_validation.validate_config(config)
  with pytest.raises(config_validation.ConfigError, match='unknown config key'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))  # the library entry point, too
  assert not (tmp_path / 'run').exists()


def _commands_fail_in_one_line(commands):
  """Runs the commands concurrently; returns their stderr texts, checking each failed without a
  traceback."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  procs = [
    subprocess.Popen(
      [sys.executable, '-m'] + c, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    for c in commands
  ]
  errors = []
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0 and 'Traceback' not in err, err
    errors.append(err)
  return errors


def test_commands_reject_bad_configs_in_one_line(tmp_path):
  work = str(tmp_path / 'w')
  train_typo, main_range = _commands_fail_in_one_line(
    [
      ['lipflow_jax.train', '--config=configs/dam_synthetic.py:tiny', f'--workdir={work}']
      + ['--config.num_train_step=3'],
      ['lipflow_jax.main', '--config=configs/demo.py:tiny', f'--workdir={work}']
      + ['--config.models.dam.optimizer.learning_rate=-1'],
    ]
  )
  assert (
    "--config.num_train_step: unknown config key 'num_train_step' "
    '(did you mean --config.num_train_steps?)' in train_typo
  )
  assert 'config.models.dam.optimizer.learning_rate = -1.0: must be a finite number > 0' in (
    main_range
  )
  assert not os.path.exists(work)


def test_data_build_options_are_checked():
  """What ``python -m lipflow_jax.data.build`` checks before building (flag names in the text)."""
  with pytest.raises(config_validation.ConfigError) as info:
    config_validation.validate_dataset_options(
      dict(name='synthetic_capture', builder_config='huge', builder_kwargs=dict(texture_size=-3)),
      labels=config_validation.DATA_BUILD_FLAGS,
    )
  assert "--config = 'huge': must be one of ['tiny', 'default']" in str(info.value)
  assert '--texture_size = -3: must be an integer >= 1, or None' in str(info.value)


def test_drive_checks_the_stored_config(tmp_path):
  """``python -m lipflow_jax.drive`` reads the main job's ``config.json``: it is validated too."""
  config = config_base.load_config(os.path.join(REPO, 'configs', 'demo.py:tiny'))
  config.eval.view_stride = 0
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(config.to_dict(), f)
  with pytest.raises(config_validation.ConfigError, match='config.eval.view_stride = 0'):
    driving.load_run(str(tmp_path))


# ------------------------------------------------------------------------------------ readers
def _camera_file(tmp_path):
  path = str(tmp_path / 'KRT')
  K = geometry.intrinsics(100.0, (64, 64))
  cams = {'400001': geometry.Camera(K=K, Rt=geometry.look_at((0.0, 0.0, 50.0), (0.0, 0.0, 0.0)))}
  geometry.write_krt(path, cams)
  with open(path) as f:
    return path, f.read().split('\n')


@pytest.mark.parametrize(
  'line,value,pattern',
  [
    (2, '100 0 nan', r'KRT:2: non-finite value in K'),
    (6, 'inf 0 0 0', r'KRT:6: non-finite value in \[R\|t\]'),
    (2, '-100 0 32', r'KRT:2: camera .* focal lengths must be > 0'),
    (6, '2 0 0 0', r'KRT:6: camera .* must hold a rotation'),
  ],
)
def test_krt_bad_numbers_name_file_and_line(tmp_path, line, value, pattern):
  path, lines = _camera_file(tmp_path)
  lines[line - 1] = value
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  with pytest.raises(geometry.KRTFormatError, match=pattern):
    geometry.read_krt(path)


def test_obj_and_head_pose_bad_numbers_name_the_file(tmp_path):
  obj = str(tmp_path / 'm.obj')
  with open(obj, 'w') as f:
    f.write('v 0 0 0\nv 1 0 nan\nv 0 1 0\nvt 0 0\nf 1/1 2/1 3/1\n')
  with pytest.raises(geometry.OBJFormatError, match=r'm.obj:2: .v. needs 3 finite numbers'):
    geometry.read_obj(obj)
  pose = str(tmp_path / '000001_transform.txt')
  np.savetxt(pose, np.hstack([2 * np.eye(3), np.zeros((3, 1))]))  # a scale, not a rotation
  with pytest.raises(fmt.MultifaceFormatError, match=r'_transform.txt: head pose must be \[R\|t\]'):
    fmt.read_transform(pose)


@pytest.fixture(scope='module')
def small_entity(tmp_path_factory):
  """The tiny capture's first 2 training frames and first test frame as a Multiface entity."""
  cap = capture.get_capture(capture.CONFIGS['tiny'])
  split = [cap.split_of(i) for i in range(cap.num_frames)]
  frames = [i for i, s in enumerate(split) if s == 'train'][:2] + [split.index('test')]
  root = str(tmp_path_factory.mktemp('entity') / 'm--synthetic--GHS')
  written = multiface_export.export_multiface(cap, root, frames=frames)['frames']
  return root, written[0]


def test_non_square_texture_raises_or_is_skipped_and_counted(small_entity, tmp_path):
  entity, (seg, frame) = small_entity
  root = str(tmp_path / 'entity')
  shutil.copytree(entity, root)
  path = fmt.tex_path(root, seg, '400001', frame)
  tex = fmt.read_png(path, 'texture')
  fmt.write_png(path, tex[:, : tex.shape[1] // 2])  # 32 x 16
  reader = mf.MultifaceEntity(root)
  with pytest.raises(fmt.MultifaceFormatError, match='must be square') as info:
    list(reader.frame_examples(0, np.random.RandomState(0)))
  assert path in str(info.value)
  b = builders.Multiface(
    data_dir=str(tmp_path / 'data'),
    entity_dir=root,
    config='bad',
    options=mf.MultifaceOptions(skip_bad_frames=True),
  )
  b.download_and_prepare(file_format=builders.FILE_FORMAT)
  meta = schema.load_meta(b.data_dir)
  assert meta.skipped == 1 and path in meta.skipped_reasons[0]
  assert len(b.as_data_source()['train']) == 2 * 6 - 1


# ------------------------------------------------------------------------------------ fitting
Z, GRID = 4, 6


class _HmcModel(nn.Module):
  """decode and an HMC-conditioned Gaussian prior, the least the fitting API needs."""

  def setup(self):
    self.verts = nn.Dense(GRID * GRID * 3, kernel_init=nn.initializers.normal(0.1))
    self.cond = nn.Dense(2 * Z)

  def __call__(self, z, batch):
    return self.decode(z, None), self.encode_condition(batch, 'hmc')

  def decode(self, z, view):
    del view
    return jnp.zeros((z.shape[0], 8, 8, 3)), self.verts(z).reshape(z.shape[0], GRID * GRID, 3)

  def encode_condition(self, batch, name):
    del name
    out = self.cond(jnp.mean(batch['hmc'], axis=(2, 3, 4)))
    return out[:, :Z], out[:, Z:] * 0.1 - 1.0, None


@pytest.fixture(scope='module')
def hmc_problem():
  yy, xx = np.meshgrid(np.linspace(-10, 10, GRID), np.linspace(-10, 10, GRID), indexing='ij')
  verts = np.stack([xx.ravel(), yy.ravel(), np.zeros(GRID * GRID)], -1).astype(np.float32)
  faces = []
  for r in range(GRID - 1):
    for c in range(GRID - 1):
      a, b, d, e = r * GRID + c, r * GRID + c + 1, (r + 1) * GRID + c, (r + 1) * GRID + c + 1
      faces += [[a, d, b], [b, d, e]]
  faces = jnp.asarray(faces, jnp.int32)
  uvs = jnp.asarray((verts[:, :2] + 10) / 20)
  meta = data.MeshMeta(
    faces=faces,
    uvs=uvs,
    uv_faces=faces,
    keypoint_vertex_ids=jnp.arange(4, dtype=jnp.int32),
    vert_mean=jnp.asarray(verts),
    vert_std=jnp.float32(1.0),
    tex_mean=jnp.full((8, 8, 3), 128.0),
    tex_std=jnp.float32(40.0),
  )
  model = _HmcModel()
  batch = {'hmc': jnp.zeros((1, 3, 8, 8, 1))}
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, Z)), batch)
  bundle = fit.ModelBundle(
    model=model,
    variables=variables,
    meta=meta,
    prior='conditional_gaussian',
    latent_dim=Z,
    hmc_settings=fit.hmc_fit_settings((8, 8), max_faces_per_tile=64),
  )
  K = geometry.intrinsics(geometry.focal_for_fov(40.0, 8), (8, 8))
  Rt = geometry.look_at((0.0, 0.0, 40.0), (0.0, 0.0, 0.0))
  rng = np.random.RandomState(0)
  obs = {
    'hmc': rng.uniform(0.2, 0.8, (2, 3, 8, 8, 1)).astype(np.float32),
    'hmc_K': np.broadcast_to(np.asarray(K), (2, 3, 3, 3)).copy(),
    'hmc_Rt': np.broadcast_to(np.asarray(Rt), (2, 3, 3, 4)).copy(),
  }
  return bundle, obs


def _fit(bundle, obs):
  return fit.fit_latents(bundle, obs, method='conditional_gaussian_fit', input='hmc', num_steps=3)


def test_fit_masks_nan_headset_crop_pixels(hmc_problem):
  bundle, obs = hmc_problem
  bad = dict(obs, hmc=obs['hmc'].copy())
  bad['hmc'][0, 1, 2:5, 2:5] = np.nan  # dead pixels in frame 0's right-eye crop
  bad['hmc'][1, 2] = np.nan  # frame 1's mouth crop missing
  result = _fit(bundle, bad)
  assert np.all(np.isfinite(result.z)) and np.all(np.isfinite(result.init))
  masked = fit.mask_hmc(bad)
  assert (
    float(masked['hmc_mask'][0, 1].sum()) == 64 - 9 and float(masked['hmc_mask'][1, 2].sum()) == 0
  )
  assert np.all(np.isfinite(masked['hmc']))


def test_streaming_fit_masks_nan_headset_crop_pixels(hmc_problem):
  bundle, obs = hmc_problem
  cfg = fit.fit_config('conditional_gaussian_fit', 'hmc', lr=0.05)
  step = fit.stream_step_fn(cfg, steps=2)
  state = fit.stream_init(bundle, cfg)
  for i in range(2):
    frame = {k: v[i].copy() for k, v in obs.items()}
    frame['hmc'][1, :3] = np.nan  # some dead rows: the frame is still usable
    state = step(bundle, state, frame)
  assert np.all(np.isfinite(state.z)) and int(state.skipped) == 0


@pytest.mark.parametrize(
  'change,pattern',
  [
    (lambda o: o.pop('hmc_K'), "needs observation 'hmc_K'"),
    (lambda o: o.update(hmc=o['hmc'][:, :2]), r"'hmc' must be \[B, 3, \*, \*, 1\]"),
    (lambda o: o.update(hmc=o['hmc'][:, :, :, :4]), r'crops are \(8, 4\), the bundle renders'),
    (lambda o: o['hmc_Rt'].__setitem__((1, 0, 0, 0), np.nan), r"'hmc_Rt' has non-finite .* \[1\]"),
    (lambda o: o.update(hmc=o['hmc'] * 255), r'must be grey values in \[0, 1\]'),
    (lambda o: o.update(hmc_K=o['hmc_K'][:1]), 'disagree on the batch size'),
  ],
)
def test_fit_rejects_unusable_observations(hmc_problem, change, pattern):
  bundle, obs = hmc_problem
  obs = {k: v.copy() for k, v in obs.items()}
  change(obs)
  with pytest.raises(ValueError, match=pattern):
    _fit(bundle, obs)
