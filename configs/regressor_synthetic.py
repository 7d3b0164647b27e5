"""DAM-Regressor baseline: one regressor per condition (keypoints, HMC) trained to the posterior
mean of a frozen, trained DAM. Needs ``--config.teacher_workdir=<workdir of
configs/dam_synthetic.py>`` (the same
variant: tiny with tiny)."""

import ml_collections

from lipflow_jax import config_base


def get_config(arg=None):
  config = config_base.get_base_config()
  config.task = 'regressor'
  config.teacher_workdir = ml_collections.config_dict.placeholder(str)
  # ``lipflow_jax.models.Regressor`` attributes (its z_dim is the teacher's); None = from the data.
  config.regressor = ml_collections.ConfigDict()
  config.regressor.conditions = ('keypoints', 'hmc')
  config.regressor.features = 128
  config.regressor.keypoint_image_size = ml_collections.config_dict.placeholder(tuple)
  config.regressor.keypoint_hidden = (256, 256)
  config.regressor.hmc_channels = (16, 32, 64)
  config.regressor.hmc_features = 64
  config.regressor.weight_norm = False
  config.loss = ml_collections.ConfigDict()  # unused: the loss is the regression MSE
  config.image_every = 0
  config = config_base.apply_variant(config, arg)
  if 'tiny' in config_base.parse_arg(arg):
    config.regressor.features = 32
    config.regressor.keypoint_hidden = (32,)
    config.regressor.hmc_channels = (8, 16)
    config.regressor.hmc_features = 16
  return config
