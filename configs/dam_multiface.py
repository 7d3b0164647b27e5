"""DAM on one Multiface entity, full size (DESIGN section 6): 1024^2 textures, 7,306 vertices, Z = 256,
batch 16, Adam 3e-4, gradient-norm clip 10. Point ``--config.dataset.builder_kwargs.entity_dir`` at the entity
directory. ``:tiny`` is a smoke run of the same code path at small size."""

from configs import common


def get_config(arg=None):
  config = common.get_base_config()
  common.multiface(config)
  config.model.prior = 'gaussian'
  return common.apply_variant(config, arg)
