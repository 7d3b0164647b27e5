"""LiP-Flow: conditional flow priors for keypoints and HMC crops (one model, shared decoder)."""

from configs import common


def get_config(arg=None):
  config = common.get_base_config()
  config.model.prior = 'lipflow'
  config.model.conditions = ('keypoints', 'hmc')
  return common.apply_variant(config, arg)
