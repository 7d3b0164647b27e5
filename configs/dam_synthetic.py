"""DAM (Gaussian prior, KL to N(0, I)) on the synthetic capture."""

from configs import common


def get_config(arg=None):
  config = common.get_base_config()
  config.model.prior = 'gaussian'
  return common.apply_variant(config, arg)
