"""LiP-Flow: conditional flow priors for keypoints and HMC crops (one model, shared decoder)."""

from lipflow_jax import config_base


def get_config(arg=None):
  config = config_base.get_base_config()
  config.model.prior = 'lipflow'
  config.model.conditions = ('keypoints', 'hmc')
  return config_base.apply_variant(config, arg)
