"""LiP-Flow on one Multiface entity, full size (see ``dam_multiface.py``), keypoint and HMC
priors."""

from lipflow_jax import config_base


def get_config(arg=None):
  config = config_base.get_base_config()
  config_base.multiface(config)
  config.model.prior = 'lipflow'
  config.model.conditions = ('keypoints', 'hmc')
  config.model.context_dim = 256
  config.model.flow_hidden = (512, 512)
  return config_base.apply_variant(config, arg)
