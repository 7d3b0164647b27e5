"""Direct-encoder baseline: a DAM whose encoder reads the poor signal (keypoints, or HMC crops with ``:hmc``)
instead of the texture and mesh; N(0, I) prior. Config strings: ``direct_synthetic.py[:hmc][,tiny]``."""

from configs import common


def get_config(arg=None):
  config = common.get_base_config()
  config.model.prior = 'gaussian'
  tokens = common.parse_arg(arg, options=('keypoints', 'hmc'))
  config.model.encoder_input = 'hmc' if 'hmc' in tokens else 'keypoints'
  return common.apply_variant(config, arg, options=('keypoints', 'hmc'))
