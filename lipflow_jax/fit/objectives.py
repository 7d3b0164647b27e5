"""Observation objectives for inference-time fitting.

Each objective is a pure function ``(z [Z], observation, bundle, **options) -> scalar`` for one
frame; they compose by addition (``fit.make_loss``). An observation is a dict holding the batch keys
of ``lipflow_jax.data`` for one frame (no batch axis):

  keypoints:  ``keypoints`` [P, 2] pixels, ``keypoints_visible`` [P] (optional), ``frontal_K``
              [3, 3], ``frontal_Rt`` [3, 4]. Missing (NaN / inf) keypoints count as invisible.
  hmc:        ``hmc`` [3, h, w, 1] in [0, 1], ``hmc_K`` [3, 3, 3], ``hmc_Rt`` [3, 3, 4], optional
              ``hmc_mask`` [3, h, w, 1].

Every objective is exactly 0 when the decoded avatar reproduces the observation.
"""

from __future__ import annotations

import jax.numpy as jnp

from lipflow_jax import geometry
from lipflow_jax.fit import bundle as bundle_lib
from lipflow_jax.models import losses
from lipflow_jax.models.avatar import to_grey
from lipflow_jax.numerics import safe_sqrt


# -----------------------------------------------------------------------------------------------
# robust costs
def l2_cost(d2, scale: float = 1.0):
  """Squared error: d2 / scale^2."""
  return d2 / scale**2


def huber_cost(d2, scale: float = 1.0):
  """Huber on the distance d = sqrt(d2), in units of ``scale``: d^2 for d <= 1, 2 d - 1 beyond
  (C1)."""
  u2 = d2 / scale**2
  far = u2 > 1.0
  u = safe_sqrt(jnp.where(far, u2, 1.0), 1e-12)  # sqrt only where it is used: no NaN gradient at 0
  return jnp.where(far, 2.0 * u - 1.0, u2)


def geman_mcclure_cost(d2, scale: float = 1.0):
  """Geman-McClure: u2 / (1 + u2) with u2 = d2 / scale^2 (bounded by 1; ~ u2 near 0)."""
  u2 = d2 / scale**2
  return u2 / (1.0 + u2)


ROBUST_COSTS = {"l2": l2_cost, "huber": huber_cost, "geman_mcclure": geman_mcclure_cost}


# -------------------------------------------------------------------------------------------------
# keypoints
def sanitize_keypoints(keypoints, visible=None):
  """Masks missing keypoints before any arithmetic.

  Args:
    keypoints: [P, 2] pixels; NaN or inf entries mean missing.
    visible: [P] visibility (bool or 0/1), or None (all visible).
  Returns:
    (keypoints [P, 2] with missing ones set to 0, valid [P] float32 in {0, 1}).
  """
  finite = jnp.all(jnp.isfinite(keypoints), axis=-1)
  valid = finite
  if visible is not None:
    vis = jnp.asarray(visible)
    vis = jnp.where(jnp.isfinite(vis), vis, 0) if jnp.issubdtype(vis.dtype, jnp.floating) else vis
    valid = valid & (vis > 0)
  keypoints = jnp.where(valid[..., None], keypoints, 0.0)
  return keypoints, valid.astype(jnp.float32)


def mask_hmc(obs, mask_key: str = "hmc_mask"):
  """Masks non-finite headset-crop pixels, as ``sanitize_keypoints`` masks missing keypoints.

  Batched or per-frame: ``obs['hmc']`` [..., C, h, w, 1]. Each non-finite pixel gets the mean of
  its crop's finite pixels (0.5 if none), so that the condition encoder reads a finite crop, and
  weight 0 in ``obs[mask_key]`` (created when absent), so that the objective ignores it.
  """
  if "hmc" not in obs:
    return obs
  hmc = jnp.asarray(obs["hmc"], jnp.float32)
  finite = jnp.isfinite(hmc)
  axes = (-3, -2, -1)
  count = jnp.sum(finite, axis=axes, keepdims=True)
  mean = jnp.sum(jnp.where(finite, hmc, 0.0), axis=axes, keepdims=True) / jnp.maximum(count, 1)
  fill = jnp.where(count > 0, mean, 0.5)
  mask = obs.get(mask_key)
  mask = jnp.ones_like(hmc) if mask is None else jnp.asarray(mask, jnp.float32)
  return dict(obs, hmc=jnp.where(finite, hmc, fill), **{mask_key: jnp.where(finite, mask, 0.0)})


def project_keypoints(bundle, z, camera: geometry.Camera):
  """[Z] -> [P, 2] pixel projections of the decoded keypoint vertices (only those are decoded)."""
  return geometry.project(camera, bundle_lib.decode_keypoint_verts(bundle, z))


def keypoint_objective(z, obs, bundle, robust: str = "l2", scale: float = 1.0):
  """Keypoint reprojection error in the frontal camera, over visible keypoints.

  mean_{p visible} rho(||project(D_verts(z)[kp_p]) - keypoint_p||^2) with rho one of
  ``ROBUST_COSTS`` (``scale`` in pixels). 0 when no keypoint is visible.

  Args:
    z: [Z] latent code.
    obs: per-frame dict with ``keypoints`` [P, 2], optional ``keypoints_visible`` [P],
      ``frontal_K``, ``frontal_Rt``.
    bundle: ``ModelBundle``.
  Returns:
    scalar float32.
  """
  kp, valid = sanitize_keypoints(obs["keypoints"], obs.get("keypoints_visible"))
  camera = geometry.Camera(K=obs["frontal_K"], Rt=obs["frontal_Rt"])
  proj = project_keypoints(bundle, z, camera)
  diff = jnp.where(valid[:, None] > 0, proj - kp, 0.0)
  cost = ROBUST_COSTS[robust](jnp.sum(diff * diff, axis=-1), scale)
  return jnp.sum(cost * valid) / jnp.maximum(jnp.sum(valid), 1.0)


# --------------------------------------------------------------------------------------------------
# HMC
def render_hmc(bundle, z, hmc_K, hmc_Rt):
  """Renders the decoded avatar into the HMC cameras with ``bundle.hmc_settings``.

  Args:
    z: [Z]; hmc_K: [C, 3, 3]; hmc_Rt: [C, 3, 4] (head coordinates -> each HMC camera).
  Returns:
    (grey [C, h, w, 1] in [0, 1], alpha [C, h, w, 1]).
  """
  if bundle.hmc_settings is None:
    raise ValueError("HMC fitting needs bundle.hmc_settings (a render.RasterSettings)")
  out = bundle_lib.render_views(bundle, z, hmc_K, hmc_Rt, bundle.hmc_settings)
  return to_grey(out.rgb), out.alpha


def hmc_objective(z, obs, bundle, mask_key: str = "hmc_mask"):
  """Masked photometric MSE of the decoded avatar rendered into the HMC cameras vs the HMC crops.

  Args:
    z: [Z].
    obs: per-frame dict with ``hmc`` [C, h, w, 1] in [0, 1], ``hmc_K`` [C, 3, 3], ``hmc_Rt`` [C, 3,
      4] and optionally a mask under ``mask_key`` [C, h, w, 1] (default: all pixels).
  Returns:
    scalar: ``models.losses.masked_mse`` of the grey render against the crops over the valid
      (finite, masked-in) pixels; 0 when there is none.
  """
  target = obs["hmc"]
  grey, _ = render_hmc(bundle, z, obs["hmc_K"], obs["hmc_Rt"])
  mask = obs.get(mask_key)
  if mask is None:
    mask = jnp.ones_like(target)
  valid = jnp.isfinite(target) & (mask > 0)
  return losses.masked_mse(grey, jnp.where(valid, target, 0.0), jnp.where(valid, mask, 0.0))


OBJECTIVES = {"keypoints": keypoint_objective, "hmc": hmc_objective}
