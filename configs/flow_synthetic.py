"""Unconditional flow prior (base N(0, I)), to compare random samples with DAM's."""

from configs import common


def get_config(arg=None):
  config = common.get_base_config()
  config.model.prior = 'flow'
  return common.apply_variant(config, arg)
