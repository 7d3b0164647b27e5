"""LiP-Flow on one Multiface entity, full size (see ``dam_multiface.py``), keypoint and HMC priors."""

from configs import common


def get_config(arg=None):
  config = common.get_base_config()
  common.multiface(config)
  config.model.prior = 'lipflow'
  config.model.conditions = ('keypoints', 'hmc')
  config.model.context_dim = 256
  config.model.flow_hidden = (512, 512)
  return common.apply_variant(config, arg)
