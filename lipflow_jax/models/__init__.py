"""Flax linen models of LiP-Flow: encoders, decoder, latent flows, their composition, and the
losses.

Public names:
  LipFlowModel (priors 'gaussian' | 'conditional_gaussian' | 'lipflow' | 'flow'; direct-encoder
  baseline via encoder_input), Regressor, TexVertEncoder, ConditionEncoder, ConditionNet,
  DirectEncoder, KeypointNet, HMCNet, ImageNet, Decoder, LatentFlow, and the losses (masked_mse,
  mse, gaussian_kl, gaussian_log_prob, latent_term, model_loss, regressor_loss, screen_loss,
  hmc_loss, DEFAULT_LOSS_WEIGHTS), and the decoded avatar's rendering (render_avatar, render_batch,
  hmc_raster_settings, to_grey).
"""

from lipflow_jax.models.avatar import (
  hmc_raster_settings,
  render_avatar,
  render_batch,
  to_grey,
)
from lipflow_jax.models.decoder import Decoder, decode_vertex_subset
from lipflow_jax.models.encoders import (
  CONDITION_KEYS,
  CONDITIONS,
  ConditionEncoder,
  ConditionNet,
  DirectEncoder,
  HMCNet,
  ImageNet,
  KeypointNet,
  Regressor,
  TexVertEncoder,
)
from lipflow_jax.models.flow import LatentFlow, coupling_masks
from lipflow_jax.models.losses import (
  DEFAULT_LOSS_WEIGHTS,
  SCREEN_RASTER_DEFAULTS,
  gaussian_kl,
  gaussian_log_prob,
  hmc_loss,
  latent_nll,
  latent_term,
  mask_like,
  masked_mse,
  model_loss,
  mse,
  regressor_loss,
  screen_loss,
  screen_raster_settings,
)
from lipflow_jax.models.model import (
  CONDITIONAL_PRIORS,
  PRIORS,
  UNCONDITIONAL,
  LipFlowModel,
  decoder_of,
)
