"""DAM (Gaussian prior, KL to N(0, I)) on the synthetic capture."""

from lipflow_jax import config_base


def get_config(arg=None):
  config = config_base.get_base_config()
  config.model.prior = 'gaussian'
  return config_base.apply_variant(config, arg)
