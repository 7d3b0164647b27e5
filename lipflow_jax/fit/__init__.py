"""Inference-time fitting of latent codes: observation objectives, priors and the jitted vmapped
loop.

Three lines from a trained workdir to fitted codes::

  from lipflow_jax import fit
  bundle = fit.load_fitter("workdir/lipflow")
  result = fit.fit_latents(bundle, batch, method="lipflow", input="keypoints", num_steps=200,
  lr=0.05)
"""

from lipflow_jax.fit.bundle import (
  MeanDecoder,
  ModelBundle,
  decode,
  decode_verts,
  decoder_only,
  encode_condition,
  flow_forward,
  flow_inverse,
  mean_bundle,
  prior_mode,
  regress,
  render_views,
)
from lipflow_jax.fit.fitting import (
  FitConfig,
  FitResult,
  check_observations,
  fit_config,
  fit_jit,
  fit_latents,
  fit_unjitted,
  initial_values,
  loss_terms,
  make_loss,
  optimize_frame,
  to_code,
)
from lipflow_jax.fit.loading import (
  bundle_from_trained,
  dataset_meta_from_config,
  hmc_fit_settings,
  load_fitter,
)
from lipflow_jax.fit.methods import FITTED, INPUTS, METHODS, Method
from lipflow_jax.fit.objectives import (
  OBJECTIVES,
  ROBUST_COSTS,
  geman_mcclure_cost,
  hmc_objective,
  huber_cost,
  keypoint_objective,
  l2_cost,
  mask_hmc,
  project_keypoints,
  render_hmc,
  sanitize_keypoints,
  to_grey,
)
from lipflow_jax.fit.priors import (
  PRIORS,
  base_gaussian_prior,
  condition_stats,
  conditional_gaussian_prior,
  flow_prior,
  gaussian_nll,
  lipflow_prior,
  no_prior,
  standard_normal_prior,
)
from lipflow_jax.fit.streaming import StreamState, stream_init, stream_step_fn, usable
