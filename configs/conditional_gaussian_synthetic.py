"""Ablation: conditional Gaussian priors N(mu_c, sigma_c) (LiP-Flow without the flow)."""

from lipflow_jax import config_base


def get_config(arg=None):
  config = config_base.get_base_config()
  config.model.prior = 'conditional_gaussian'
  config.model.conditions = ('keypoints', 'hmc')
  return config_base.apply_variant(config, arg)
