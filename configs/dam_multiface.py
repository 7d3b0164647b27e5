"""DAM on one Multiface entity, full size (DESIGN section 6): 1024^2 textures, 7,306 vertices, Z =
256, batch 16, Adam 3e-4, gradient-norm clip 10. Point
``--config.dataset.builder_kwargs.entity_dir`` at the entity
directory. ``:tiny`` is a smoke run of the same code path at small size."""

from lipflow_jax import config_base


def get_config(arg=None):
  config = config_base.get_base_config()
  config_base.multiface(config)
  config.model.prior = 'gaussian'
  return config_base.apply_variant(config, arg)
