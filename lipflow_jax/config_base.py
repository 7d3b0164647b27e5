"""Defaults shared by every experiment config in ``configs/``; each config file changes only what
differs.

Usage in a config file::

  from lipflow_jax import config_base

  def get_config(arg=None):
    config = config_base.get_base_config()
    config.model.prior = 'lipflow'
    return config_base.apply_variant(config, arg)

Config strings: ``--config=configs/<name>.py`` (the CPU default) or
``--config=configs/<name>.py:tiny`` (a seconds-long smoke run on the tiny synthetic capture).
"""

import importlib.util
import os
import sys

import ml_collections

VARIANTS = ('default', 'tiny')


def get_base_config() -> ml_collections.ConfigDict:
  """The DAM on the default synthetic capture, sized to train in a few minutes on a 2-core CPU."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = (
    'avatar'  # 'avatar' (LipFlowModel: the DAM with any prior, or the direct encoder) | 'regressor'
  )

  # Data (TFDS builder, generated on first use).
  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'synthetic_capture'
  config.dataset.builder_config = 'default'
  config.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # None = the TFDS default
  config.dataset.builder_kwargs = ml_collections.ConfigDict()
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  config.dataset.worker_count = 0

  # Model: ``lipflow_jax.models.LipFlowModel`` attributes. None = from the data (sizes, cameras).
  config.model = ml_collections.ConfigDict()
  config.model.prior = 'gaussian'
  config.model.conditions = ()
  config.model.encoder_input = 'x'
  config.model.z_dim = 64
  config.model.num_vertices = ml_collections.config_dict.placeholder(int)
  config.model.tex_size = ml_collections.config_dict.placeholder(int)
  config.model.num_cameras = ml_collections.config_dict.placeholder(int)
  config.model.keypoint_image_size = ml_collections.config_dict.placeholder(tuple)
  config.model.enc_channels = (16, 32, 64, 64)
  config.model.enc_tex_features = 128
  config.model.enc_vert_features = 128
  config.model.dec_z_features = 128
  config.model.dec_start_size = 4
  config.model.dec_start_channels = 64
  config.model.dec_channels = (64, 32, 16)  # 4 -> 64 texels
  config.model.dec_upsample = 'resize'
  config.model.weight_norm = False
  # Inference-time encoders and flows (conditional priors, direct encoder).
  config.model.context_dim = 128
  config.model.keypoint_hidden = (256, 256)
  config.model.hmc_channels = (16, 32, 64)
  config.model.hmc_features = 64
  config.model.flow_layers = 4
  config.model.flow_hidden = (128, 128)
  config.model.flow_bijector = 'spline'
  config.model.flow_context = True

  # Loss weights (``lipflow_jax.models.model_loss``): tex, geo, kl (= beta), screen, hmc (paired
  # headset training: the decoded avatar rendered into each training frame's headset cameras vs the
  # crops; off by default, on where the data has paired crops, see configs/demo.py), and how many
  # examples of each batch the headset loss renders (None = all).
  config.loss = ml_collections.ConfigDict(dict(tex=1.0, geo=1.0, kl=0.01, screen=0.0, hmc=0.0))
  config.hmc_loss_examples = 4

  # Training-time augmentation of the run-time signals (``train.tasks.augment_keypoints``): fresh
  # keypoint noise (pixels) and dropout per step, so that keypoint encoders do not memorise one
  # detection per frame.
  config.augment = ml_collections.ConfigDict(dict(keypoint_noise_px=0.5, keypoint_dropout=0.03))

  # Regressor baseline only (task='regressor'): one ``Regressor`` per condition on a frozen DAM
  # teacher.
  config.teacher_workdir = ml_collections.config_dict.placeholder(str)

  # Optimisation.
  config.batch_size = 16  # global, over all processes
  config.num_train_steps = 1000
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 50
  config.optimizer.decay = 'cosine'  # 'cosine' | 'linear' | 'constant' after warm-up
  config.optimizer.end_factor = 0.05  # final lr = end_factor * learning_rate
  config.optimizer.clip_norm = 10.0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.weight_decay = 0.0
  config.max_consecutive_nonfinite = 10

  # Logging, evaluation and checkpoints.
  config.log_every = 50
  config.image_every = 500
  config.render_images = True  # also render the decoded avatar into the example's camera
  config.eval_every = 500
  config.eval_batches = 4
  config.checkpoint_every = 250
  config.keep_checkpoints = 3
  config.async_checkpoints = True
  config.progress_bar = True
  config.num_devices = ml_collections.config_dict.placeholder(
    int
  )  # None = all devices of all processes
  return config


def multiface(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Full-size Multiface settings (DESIGN section 6): the public DAM's architecture and
  optimiser."""
  config.dataset.name = 'multiface'
  config.dataset.builder_config = ml_collections.config_dict.placeholder(str)
  config.dataset.builder_kwargs = ml_collections.ConfigDict()
  # The entity directory as published, and ``lipflow_jax.data.multiface.MultifaceOptions`` (None:
  # its default).
  kw = config.dataset.builder_kwargs
  kw.entity_dir = ml_collections.config_dict.placeholder(str)
  kw.texture_size = ml_collections.config_dict.placeholder(int)  # None: the files' 1024
  kw.image_size = ml_collections.config_dict.placeholder(
    tuple
  )  # (H, W); None: the photos' 2048 x 1334
  kw.frontal_camera = ml_collections.config_dict.placeholder(str)
  kw.skip_bad_frames = False
  config.dataset.worker_count = 8
  m = config.model
  m.z_dim = 256
  m.enc_channels = (
    16,
    16,
    32,
    32,
    64,
    64,
    128,
    128,
  )  # 4 blocks of two 4x4 stride-2 convs: 1024 -> 4
  m.enc_tex_features = 256
  m.enc_vert_features = 256
  m.dec_z_features = 256
  m.dec_start_size = 4
  m.dec_start_channels = 256
  m.dec_channels = (
    256,
    64,
    64,
    32,
    32,
    16,
    16,
  )  # 4 -> 1024 texels by 4x4 stride-2 transposed convs
  m.dec_upsample = 'transpose'
  m.weight_norm = True
  m.context_dim = 256
  m.hmc_channels = (16, 32, 64, 128)
  m.hmc_features = 128
  config.num_train_steps = 200_000  # loss weights and batch size 16 as in the base config
  config.optimizer.learning_rate = 3e-4
  config.optimizer.warmup_steps = 1000
  config.optimizer.decay = 'cosine'
  config.optimizer.end_factor = 0.1
  config.optimizer.clip_norm = 10.0
  config.log_every = 100
  config.image_every = 2000
  config.eval_every = 5000
  config.eval_batches = 16
  config.checkpoint_every = 2000
  config.keep_checkpoints = 3
  return config


def parse_arg(arg, options=()) -> set:
  """Splits a config string (``'tiny'``, ``'tiny,hmc'``) into options, checking each is known."""
  known = set(VARIANTS) | set(options)
  tokens = {t.strip() for t in (arg or 'default').split(',') if t.strip()}
  unknown = tokens - known
  if unknown:
    raise ValueError(f'unknown config option(s) {sorted(unknown)}; expected from {sorted(known)}')
  return tokens


def apply_variant(
  config: ml_collections.ConfigDict, arg=None, options=()
) -> ml_collections.ConfigDict:
  """Applies the config-string variant: 'default' (or none) or 'tiny' (a seconds-long run on the
  tiny capture); ``options`` names further tokens the calling config handles itself."""
  tokens = parse_arg(arg, options)
  if 'tiny' in tokens:
    # The tiny synthetic capture (32x32 textures, 420 vertices, 6 cameras), also for the Multiface
    # configs, whose smoke run keeps their code path (weight norm, transposed convs) at small size.
    config.dataset.name = 'synthetic_capture'
    config.dataset.builder_config = 'tiny'
    config.dataset.builder_kwargs = ml_collections.ConfigDict()
    config.dataset.worker_count = 0
    config.model.z_dim = 8
    config.model.enc_channels = (8, 16)
    config.model.enc_tex_features = 32
    config.model.enc_vert_features = 32
    config.model.dec_z_features = 32
    config.model.dec_start_channels = 16
    config.model.dec_channels = (16, 8)  # 4 -> 32 texels: len + 1 doublings
    config.model.context_dim = 32
    config.model.keypoint_hidden = (32,)
    config.model.hmc_channels = (8, 16)
    config.model.hmc_features = 16
    config.model.flow_layers = 2
    config.model.flow_hidden = (32,)
    config.batch_size = 8
    config.num_train_steps = 30
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 3
    config.log_every = 5
    config.image_every = 15
    config.eval_every = 15
    config.eval_batches = 1
    config.checkpoint_every = 10
  return config


def load_module(path: str):
  """Imports a config file by its path (e.g. ``configs/dam_synthetic.py``), as ``config_flags``
  does."""
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file not found: {path}')
  name = 'lipflow_config_' + os.path.splitext(os.path.basename(path))[0]
  if name in sys.modules and getattr(sys.modules[name], '__file__', None) == path:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sys.modules[name] = module
  return module


def load_config(config_string: str) -> ml_collections.ConfigDict:
  """``path/to/config.py[:arg]`` -> ``get_config(arg)`` of that file (the ``--config`` flag's
  syntax)."""
  path, _, arg = config_string.partition(':')
  return load_module(path).get_config(arg or None)
