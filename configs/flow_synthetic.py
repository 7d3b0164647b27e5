"""Unconditional flow prior (base N(0, I)), to compare random samples with DAM's."""

from lipflow_jax import config_base


def get_config(arg=None):
  config = config_base.get_base_config()
  config.model.prior = 'flow'
  return config_base.apply_variant(config, arg)
