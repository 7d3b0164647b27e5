"""Ablation: conditional Gaussian priors N(mu_c, sigma_c) (LiP-Flow without the flow)."""

from configs import common


def get_config(arg=None):
  config = common.get_base_config()
  config.model.prior = 'conditional_gaussian'
  config.model.conditions = ('keypoints', 'hmc')
  return common.apply_variant(config, arg)
