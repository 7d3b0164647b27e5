"""Flax linen models of LiP-Flow: encoders, decoder, latent flows, their composition, and the losses.

Public names:
  LipFlowModel (priors 'gaussian' | 'conditional_gaussian' | 'lipflow' | 'flow'; direct-encoder baseline
  via encoder_input), Regressor, TexVertEncoder, ConditionEncoder, ConditionNet, DirectEncoder,
  KeypointNet, HMCNet, ImageNet, Decoder, LatentFlow, and the losses (masked_mse, mse, gaussian_kl,
  gaussian_log_prob, latent_term, model_loss, regressor_loss, screen_loss, DEFAULT_LOSS_WEIGHTS), and the
  decoded avatar's rendering (render_avatar, render_batch).
"""

from lipflow_jax.models.avatar import render_avatar, render_batch
from lipflow_jax.models.decoder import Decoder
from lipflow_jax.models.encoders import CONDITION_KEYS
from lipflow_jax.models.encoders import CONDITIONS
from lipflow_jax.models.encoders import ConditionEncoder
from lipflow_jax.models.encoders import ConditionNet
from lipflow_jax.models.encoders import DirectEncoder
from lipflow_jax.models.encoders import HMCNet
from lipflow_jax.models.encoders import ImageNet
from lipflow_jax.models.encoders import KeypointNet
from lipflow_jax.models.encoders import Regressor
from lipflow_jax.models.encoders import TexVertEncoder
from lipflow_jax.models.flow import LatentFlow
from lipflow_jax.models.flow import coupling_masks
from lipflow_jax.models.losses import DEFAULT_LOSS_WEIGHTS
from lipflow_jax.models.losses import gaussian_kl
from lipflow_jax.models.losses import gaussian_log_prob
from lipflow_jax.models.losses import latent_nll
from lipflow_jax.models.losses import latent_term
from lipflow_jax.models.losses import SCREEN_RASTER_DEFAULTS
from lipflow_jax.models.losses import mask_like
from lipflow_jax.models.losses import masked_mse
from lipflow_jax.models.losses import model_loss
from lipflow_jax.models.losses import mse
from lipflow_jax.models.losses import regressor_loss
from lipflow_jax.models.losses import screen_loss
from lipflow_jax.models.losses import screen_raster_settings
from lipflow_jax.models.model import CONDITIONAL_PRIORS
from lipflow_jax.models.model import PRIORS
from lipflow_jax.models.model import UNCONDITIONAL
from lipflow_jax.models.model import LipFlowModel
