"""The whole pipeline on the synthetic capture: data -> train every model -> fit -> evaluate ->
report.

``python -m lipflow_jax.main --config=configs/demo.py --workdir=DIR`` (capture v2, 96 held-out test
frames; 54 minutes plus a 13-minute data build measured on a 2-core CPU shared with other jobs),
or ``--config=configs/demo.py:tiny`` (an end-to-end smoke run of about a minute on the tiny
capture).

Every model is a full experiment config of its own (``configs/<name>_synthetic.py``), resolved here
with the demo's training length, so that the resolved demo config (dumped to the workdir and into
``report.json``) says exactly what was trained.
"""

import os

import ml_collections

from lipflow_jax import config_base

# Sub-workdir name -> (config file beside this one, extra config-string options).
MODELS = {
  'dam': ('dam_synthetic.py', ''),
  'lipflow': ('lipflow_synthetic.py', ''),
  'conditional_gaussian': ('conditional_gaussian_synthetic.py', ''),
  'flow': ('flow_synthetic.py', ''),
  'regressor': ('regressor_synthetic.py', ''),
  'direct_keypoints': ('direct_synthetic.py', 'keypoints'),
  'direct_hmc': ('direct_synthetic.py', 'hmc'),
}


def _model_config(filename, options, variant, steps, common_overrides):
  arg = ','.join(t for t in (variant if variant != 'default' else '', options) if t) or None
  config = config_base.load_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), filename)
  ).get_config(arg)
  config.num_train_steps = steps
  config.progress_bar = True
  for k, v in common_overrides.items():
    config[k] = v
  return config


# Paired headset training (``config.loss.hmc``): the capture's training frames carry the crops of a
# headset worn in the dome, and every avatar decoder of the demo (not the unconditional flow, which
# only draws random samples) also learns to explain them. The crops are [0, 1] grey values while
# the texture loss is on textures normalised by their std (~11 / 255 on the default capture), so a
# weight of about 1 / std^2 = 500 gives a headset pixel the weight of a texel; 200 keeps it below
# that (the crops are noisy and seen through 4 examples of each batch only).
HMC_LOSS_WEIGHT = 200.0
HMC_LOSS_MODELS = ('dam', 'lipflow', 'conditional_gaussian', 'direct_keypoints', 'direct_hmc')


def get_config(arg=None):
  variant = arg or 'default'
  if variant not in config_base.VARIANTS:
    raise ValueError(f'unknown demo variant {variant!r}; expected one of {config_base.VARIANTS}')
  tiny = variant == 'tiny'
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.seed = 0

  # ------------------------------------------------------------------------------------------ data
  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'synthetic_capture'
  config.dataset.builder_config = 'tiny' if tiny else 'default'
  config.dataset.data_dir = ml_collections.config_dict.placeholder(str)

  # ------------------------------------------------------------------------------------------
  # training
  steps = (
    {
      'dam': 30,
      'lipflow': 30,
      'conditional_gaussian': 30,
      'flow': 20,
      'regressor': 30,
      'direct_keypoints': 20,
      'direct_hmc': 20,
    }
    if tiny
    else {
      'dam': 1500,
      'lipflow': 1500,
      'conditional_gaussian': 600,
      'flow': 200,
      'regressor': 400,
      'direct_keypoints': 300,
      'direct_hmc': 300,
    }
  )
  overrides = dict(
    eval_every=0,
    image_every=0,
    log_every=10 if tiny else 50,
    checkpoint_every=1000000,
    keep_checkpoints=1,
  )
  config.models = ml_collections.ConfigDict()
  for name, (module, options) in MODELS.items():
    sub = _model_config(module, options, variant, steps[name], overrides)
    sub.dataset.name = config.dataset.name
    sub.dataset.builder_config = config.dataset.builder_config
    # (The tiny smoke run trains with the headset loss on LiP-Flow only: each model with it compiles
    # the renderer's gradient into its train step, ~10 s apiece on 2 cores, and the loss itself is
    # tested in tests/test_hmc_loss.py.)
    if name in HMC_LOSS_MODELS and (not tiny or name == 'lipflow'):
      sub.loss.hmc = HMC_LOSS_WEIGHT
      sub.hmc_loss_examples = 2 if tiny else 4
    config.models[name] = sub
  # The regressor's teacher is the DAM of this demo (main.py sets the path).
  # The tiny smoke run skips the unconditional flow prior (only used for the random-samples figure).
  config.train_order = (
    'dam',
    'lipflow',
    'conditional_gaussian',
    'regressor',
    'direct_keypoints',
    'direct_hmc',
  ) + (() if tiny else ('flow',))

  # ------------------------------------------------------------------------------------------
  # fitting
  config.fit = ml_collections.ConfigDict()
  config.fit.keypoints = ml_collections.ConfigDict(
    dict(
      num_steps=40 if tiny else 200,
      lr=0.05,
      schedule='cosine',
      objective_options=dict(robust='huber', scale=2.0),
    )
  )
  config.fit.hmc = ml_collections.ConfigDict(
    dict(num_steps=15 if tiny else 40, lr=0.05, schedule='cosine', objective_options=dict())
  )
  # lambda_prior per (fitted method, input): the weight of -log p(z | c) against the observation
  # term. These are the values used when there is no validation split; with one, ``tune`` chooses
  # them (below).
  config.fit.lambda_prior = ml_collections.ConfigDict(
    dict(
      dam_fit=dict(keypoints=0.01, hmc=1e-5),
      lipflow_fit=dict(keypoints=0.01, hmc=1e-5),
      conditional_gaussian_fit=dict(keypoints=0.01, hmc=1e-5),
    )
  )
  # LiP-Flow optimises the flow's base variable y (z = f(y | h), prior N(mu_c, sigma_c) on y); 'z'
  # optimises z with -log p(z | c) (there the sharp learned prior holds the fit near its mode).
  config.fit.space = 'y'
  config.fit.sequence_warm_steps = 20 if tiny else 60

  # ------------------------------------------------------------------------------------------
  # tuning the fitting options of every fitted method and input on ``max_frames`` frames of the
  # validation split (held-out segments that are not the test split): lambda_prior and, for the
  # keypoints, the Adam schedule.
  config.tune = ml_collections.ConfigDict()
  config.tune.split = 'validation'
  # All 24 frames of the validation segment (capture v2): on 8 of them the keypoint fits' choice
  # between 1e-3 and 1e-2 flipped between two runs that differed only in float rounding (validation
  # errors within 0.02 of each other), and with it the verdict on the test split. (tiny: all 4
  # validation frames, as many as the test fits: one compiled fit serves both.)
  config.tune.max_frames = 4 if tiny else 24
  config.tune.lambda_grid = ml_collections.ConfigDict(
    dict(
      keypoints=(1e-4, 1e-3, 1e-2, 1e-1) if not tiny else (1e-2, 1e-1),
      hmc=(1e-5, 1e-4, 1e-3, 1e-2) if not tiny else (1e-5, 1e-3),
    )
  )
  # Adam schedules tried for the keypoint fits (num_steps[i] steps at lr[i]), each with every
  # lambda_prior; the fewest steps within one standard error of the best validation error win
  # (``tuning.choose``). The first is config.fit.keypoints'. (The headset fits keep theirs: 40
  # steps of ~100 ms a frame.)
  config.tune.schedule_grid = ml_collections.ConfigDict(
    dict(
      keypoints=dict(num_steps=(40, 20), lr=(0.05, 0.1))
      if tiny
      else dict(num_steps=(200, 200, 100, 50), lr=(0.05, 0.1, 0.1, 0.1))
    )
  )

  # ------------------------------------------------------------------------------------------
  # evaluation
  config.eval = ml_collections.ConfigDict()
  config.eval.split = 'test'
  # Held-out frames (spread evenly over the test segments; the v2 capture has 96), each in every
  # n-th dome camera (20 of the 40 views: the metrics' cost is frames x views renders).
  config.eval.max_frames = 4 if tiny else 96
  config.eval.view_stride = 1 if tiny else 2
  config.eval.chunk = 4
  config.eval.methods = (
    'dam_fit',
    'dam_regressor',
    'direct_encoder',
    'lipflow_prior_mode',
    'lipflow_fit',
    'conditional_gaussian_fit',
    'mean_mesh',
  )
  config.eval.inputs = ('keypoints', 'hmc')
  config.eval.figures = True
  config.eval.figure_frames = 2 if tiny else 4
  config.eval.figure_views = 3 if tiny else 5
  config.eval.num_samples = 4 if tiny else 8
  config.eval.gif_frames = 4 if tiny else 16

  # ------------------------------------------------------------------------------------------
  # live driving (``lipflow_jax.experiment.driving``): the first test segment streamed frame by
  # frame, a few warm-started Adam steps a frame, against the full per-frame fit. Steps: the
  # fewest whose streamed geometry error on the validation segment is within 5 % of the full fit's
  # (``python -m lipflow_jax.drive --split=validation --steps=N`` on a finished demo, capture v2):
  # keypoints 10 / 20 / 30 steps: +41.5 / +6.7 / -7.4 %; headset 1 / 2 steps: -0.3 / +1.3 %.
  config.drive = ml_collections.ConfigDict()
  config.drive.method = 'lipflow_fit'
  # (The tiny smoke run streams the keypoints only: the headset stream compiles the renderer's
  # gradient once more, for a path that tests/test_streaming.py covers.)
  config.drive.inputs = ('keypoints',) if tiny else ('keypoints', 'hmc')
  config.drive.steps = ml_collections.ConfigDict(
    dict(keypoints=3, hmc=2) if tiny else dict(keypoints=30, hmc=1)
  )
  config.drive.max_frames = None  # the whole segment
  return config
