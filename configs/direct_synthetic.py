"""Direct-encoder baseline: a DAM whose encoder reads the poor signal (keypoints, or HMC crops with
``:hmc``)
instead of the texture and mesh; N(0, I) prior. Config strings:
``direct_synthetic.py[:hmc][,tiny]``."""

from lipflow_jax import config_base


def get_config(arg=None):
  config = config_base.get_base_config()
  config.model.prior = 'gaussian'
  tokens = config_base.parse_arg(arg, options=('keypoints', 'hmc'))
  config.model.encoder_input = 'hmc' if 'hmc' in tokens else 'keypoints'
  return config_base.apply_variant(config, arg, options=('keypoints', 'hmc'))
