"""Latent priors for inference-time fitting, as negative log densities.

Each prior is a pure function ``(z [Z], observation, bundle) -> scalar`` = -log p(z | c) for one
frame, added to the observation objectives with a weight ``lambda_prior``. Conditional priors read
the per-frame condition statistics that ``condition_stats`` adds to the observation once, before the
optimisation loop (the inference-time encoder does not depend on z):

  ``prior_mu`` [Z], ``prior_logstd`` [Z]  the Gaussian p(y | c) = N(mu_c, sigma_c^2),
  ``prior_h`` [H]                       the context vector h_c read by the flow's conditioner.

Priors:
  none                  0.
  gaussian              N(0, I) (DAM).
  conditional_gaussian  N(mu_c, sigma_c^2) on z (ablation without the flow).
  lipflow               log p(z|c) = log N(f^-1(z); mu_c, sigma_c) + log|det d f^-1 / dz|.
  flow                  the same with base N(0, I) and no condition.
For optimisation in the flow's base space (z = f(y)) the prior is on y: ``base_gaussian`` (N(mu_c,
sigma_c)).
"""

from __future__ import annotations

import jax.numpy as jnp

from lipflow_jax.fit import bundle as bundle_lib
from lipflow_jax.models import layers


def gaussian_nll(x, mu=0.0, logstd=0.0):
  """-log N(x; mu, exp(logstd)^2), summed over the last axis (``models.gaussian_log_prob``,
  negated)."""
  return -layers.gaussian_log_prob(x, mu, logstd)


def no_prior(z, obs, bundle):
  del obs, bundle
  return jnp.zeros((), z.dtype)


def standard_normal_prior(z, obs, bundle):
  """-log N(z; 0, I)."""
  del obs, bundle
  return gaussian_nll(z)


def conditional_gaussian_prior(z, obs, bundle):
  """-log N(z; mu_c, sigma_c^2)."""
  del bundle
  return gaussian_nll(z, obs["prior_mu"], obs["prior_logstd"])


def lipflow_prior(z, obs, bundle, name: str = "keypoints"):
  """-log p(z | c) under the conditional latent flow."""
  y, logdet = bundle_lib.flow_inverse(bundle, z, obs.get("prior_h"), name)
  return gaussian_nll(y, obs["prior_mu"], obs["prior_logstd"]) - logdet


def flow_prior(z, obs, bundle, name: str = "keypoints"):
  """-log p(z) under an unconditional flow (base N(0, I))."""
  y, logdet = bundle_lib.flow_inverse(bundle, z, obs.get("prior_h"), name)
  return gaussian_nll(y) - logdet


def base_gaussian_prior(y, obs, bundle):
  """-log N(y; mu_c, sigma_c^2) in the flow's base space (for ``space='y'``)."""
  del bundle
  return gaussian_nll(y, obs["prior_mu"], obs["prior_logstd"])


PRIORS = {
  "none": no_prior,
  "gaussian": standard_normal_prior,
  "conditional_gaussian": conditional_gaussian_prior,
  "lipflow": lipflow_prior,
  "flow": flow_prior,
}

CONDITIONAL = ("conditional_gaussian", "lipflow")


def condition_stats(bundle, obs, name: str):
  """Adds ``prior_mu``, ``prior_logstd`` and ``prior_h`` to a batched observation dict ([B, ...]
  leaves)."""
  mu, logstd, h = bundle_lib.encode_condition(bundle, obs, name)
  out = dict(obs, prior_mu=mu, prior_logstd=logstd)
  if h is not None:
    out["prior_h"] = h
  return out
