"""Losses of the models: pure functions of arrays, plus ``model_loss`` / ``regressor_loss`` for
training.

Objective per frame (DESIGN section 2):

  L = w_tex * masked_mse(tex) + w_geo * mse(verts) [+ w_screen * screen loss] [+ w_hmc * hmc loss]
      + w_kl * mean_c (log q(z|x) - log p(z|c)) / Z,     z ~ q(z|x),

the latent term averaged over conditions and over the Z latent dimensions (as DAM averages its KL);
it is the analytic KL for the Gaussian priors and the one-sample Monte-Carlo estimate through the
flow otherwise.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from lipflow_jax import geometry, render
from lipflow_jax.data import schema
from lipflow_jax.models import avatar, layers

gaussian_kl = layers.gaussian_kl
gaussian_log_prob = layers.gaussian_log_prob

DEFAULT_LOSS_WEIGHTS = {"tex": 1.0, "geo": 1.0, "kl": 0.01, "screen": 0.0, "hmc": 0.0}


def mask_like(mask, image):
  """A [..., H, W, 1] or [..., H, W] mask as [..., H, W, 1] in ``image``'s dtype (broadcast over
  channels)."""
  mask = jnp.asarray(mask, image.dtype)
  if mask.ndim == image.ndim - 1:
    mask = mask[..., None]
  return jnp.broadcast_to(mask, image.shape[:-1] + (1,))


def masked_mse(pred, target, mask=None, *, per_image: bool = False, eps: float = 1e-8):
  """Mean squared error over the masked pixels (the texture loss, the screen loss and the image
  metric).

  Args:
    pred, target: [..., H, W, C] float.
    mask: [..., H, W, 1] or [..., H, W] weights in {0, 1} or soft (None = all pixels).
    per_image: one value per image ([...]) instead of one over the whole batch (a scalar).
    eps: guards the division for an empty mask (the result is then 0).
  Returns:
    sum(mask * (pred - target)^2) / (C * sum(mask)), over each image or over everything.
  """
  axis = (-3, -2, -1) if per_image else None
  sq = jnp.square(pred - target)
  if mask is None:
    return jnp.mean(sq, axis=axis)
  m = mask_like(mask, pred)
  num = jnp.sum(sq * m, axis=axis)
  den = jnp.sum(m, axis=axis) * pred.shape[-1]
  return num / jnp.maximum(den, eps)


# Soft rasterisation for the screen loss (pixels): K faces per pixel blended, coverage width sigma.
# The blur radius is kept at 1 px (not derived from sigma, ~3.8 px): the candidates per tile, and so
# the cost and the risk of overflow (faces dropped; check ``overflow``), grow with it, and coverage
# below 2 * sigmoid(-1 / sigma) = 0.24 at 1 px outside a silhouette is what it drops.
SCREEN_RASTER_DEFAULTS = dict(
  faces_per_pixel=4,
  sigma=0.5,
  blur_radius=1.0,
  tile_size=8,
  max_faces_per_tile=256,
  cull_backfaces=True,
)


def screen_raster_settings(image_size, **kwargs) -> render.RasterSettings:
  """Soft ``RasterSettings`` of the screen loss at ``image_size`` (H, W); kwargs override the
  defaults."""
  return render.RasterSettings(
    image_size=tuple(int(s) for s in image_size), **dict(SCREEN_RASTER_DEFAULTS, **kwargs)
  )


def screen_loss(outputs, batch, *, mesh: schema.MeshMeta, settings):
  """Masked MSE between the decoded avatar rendered into each example's camera and the example's
  photo.

  Args:
    outputs: the model's outputs; reads ``verts`` [B, V, 3] and ``tex`` [B, T, T, 3] (both
      normalised).
    batch: reads ``image`` [B, H, W, 3] in [0, 1], ``image_mask`` [B, H, W, 1], ``camera_K``,
      ``camera_Rt``.
    mesh: the dataset's ``MeshMeta``.
    settings: ``RasterSettings`` at the photo's size (soft, for gradients w.r.t. the vertices).
  Returns:
    ``masked_mse`` of the render against the photo over the whole batch, a scalar.
  """
  rendered = avatar.render_batch(
    mesh,
    outputs["verts"],
    schema.denormalize_tex(outputs["tex"], mesh),
    batch["camera_K"],
    batch["camera_Rt"],
    settings,
  )
  dtype = rendered.rgb.dtype
  return masked_mse(rendered.rgb, batch["image"].astype(dtype), batch["image_mask"].astype(dtype))


def hmc_loss(decode, outputs, batch, *, mesh: schema.MeshMeta, settings, num_examples=None):
  """Paired headset loss: the decoded avatar rendered into each frame's headset cameras vs its
  crops.

  The training frames of a paired capture carry the crops of a headset worn in the dome; this
  makes the avatar explain the near-field views it is later fitted through (masked MSE on grey
  values, as ``fit.hmc_objective`` at test time).

  Args:
    decode: ``(z [N, Z], view [N, 3]) -> (tex [N, T, T, 3], verts [N, V, 3])`` normalised (the
      model's decoder with the trained parameters; no per-camera colour response).
    outputs: the model's outputs; reads ``z`` [B, Z] (the posterior sample).
    batch: reads ``hmc`` [B, C, h, w, 1] in [0, 1], ``hmc_mask`` [B, C, h, w, 1], ``hmc_K``
      [B, C, 3, 3], ``hmc_Rt`` [B, C, 3, 4] (head coordinates -> headset camera).
    mesh: the dataset's ``MeshMeta``.
    settings: ``RasterSettings`` at the crop size (``hmc_raster_settings``).
    num_examples: only the first n examples of the batch (bounds the cost; None = all).
  Returns:
    ``masked_mse`` over the n x C crops, a scalar.
  """
  n = outputs["z"].shape[0] if num_examples is None else int(num_examples)
  K, Rt = batch["hmc_K"][:n], batch["hmc_Rt"][:n]
  c = K.shape[1]
  K, Rt = K.reshape((n * c, 3, 3)), Rt.reshape((n * c, 3, 4))
  views = jax.vmap(lambda k, rt: geometry.view_direction(geometry.Camera(K=k, Rt=rt)))(K, Rt)
  z = jnp.repeat(outputs["z"][:n], c, axis=0)
  tex, verts = decode(z, views)
  rendered = avatar.render_batch(mesh, verts, schema.denormalize_tex(tex, mesh), K, Rt, settings)
  grey = avatar.to_grey(rendered.rgb)
  target = batch["hmc"][:n].reshape(grey.shape).astype(grey.dtype)
  mask = batch["hmc_mask"][:n].reshape(grey.shape).astype(grey.dtype)
  return masked_mse(grey, target, mask)


def mse(pred, target):
  """Mean squared error over all elements."""
  return jnp.mean(jnp.square(pred - target))


def latent_term(outputs, z_dim: int):
  """Latent term per latent dimension: mean over priors and batch of outputs['kl'][name], divided
  by Z."""
  kls = [jnp.mean(v) for v in outputs["kl"].values()]
  return sum(kls) / (len(kls) * z_dim)


def latent_nll(outputs, z_dim: int):
  """-log p(z|c) per latent dimension, averaged over priors and batch (a diagnostic)."""
  nlls = [-jnp.mean(v) for v in outputs["log_p"].values()]
  return sum(nlls) / (len(nlls) * z_dim)


def _resolve_weights(weights):
  w = dict(DEFAULT_LOSS_WEIGHTS)
  if weights is not None:
    unknown = sorted(set(weights) - set(w))
    if unknown:
      raise ValueError(f"Unknown loss weights {unknown}; expected keys from {sorted(w)}.")
    w.update(weights)
  return w


def model_loss(
  model,
  params,
  batch,
  rng,
  *,
  weights: Optional[Mapping[str, Any]] = None,
  screen_loss_fn: Optional[Callable[[dict, dict], Any]] = None,
  hmc_loss_fn: Optional[Callable[[Callable, dict, dict], Any]] = None,
  train: bool = True,
):
  """The training loss of a ``LipFlowModel``.

  Args:
    model: a ``LipFlowModel``.
    params: its 'params' collection (``variables['params']``).
    batch: dict of [B, ...] arrays (the batch contract).
    rng: PRNG key for the posterior sample.
    weights: loss weights, keys from ``DEFAULT_LOSS_WEIGHTS`` (tex, geo, kl, screen, hmc); missing
      keys take the defaults (1, 1, 0.01, 0, 0).
    screen_loss_fn: ``(outputs, batch) -> scalar``, e.g. a masked MSE of the decoded avatar rendered
      into the batch's camera; required when the 'screen' weight is non-zero (the hook for the
      rasterizer).
    hmc_loss_fn: ``(decode, outputs, batch) -> scalar`` (``hmc_loss`` with its settings bound);
      required when the 'hmc' weight is non-zero.
    train: sample z ~ q(z|x) (True) or use z = mu.
  Returns:
    (loss scalar, metrics dict of scalars: tex_mse, geo_mse, kl (latent term per dimension, averaged
    over priors), latent_nll, kl_<prior name> for each prior, screen and hmc (if used), total).
  """
  w = _resolve_weights(weights)
  screen_w = w["screen"]
  if screen_loss_fn is None and not (isinstance(screen_w, (int, float)) and screen_w == 0):
    raise ValueError("A non-zero 'screen' weight needs screen_loss_fn(outputs, batch) -> scalar.")
  if hmc_loss_fn is None and not (isinstance(w["hmc"], (int, float)) and w["hmc"] == 0):
    raise ValueError("A non-zero 'hmc' weight needs hmc_loss_fn(decode, outputs, batch) -> scalar.")
  out = model.apply({"params": params}, batch, train=train, rngs={"sample": rng})
  tex = masked_mse(out["tex"], batch["tex"], batch["tex_mask"])
  geo = mse(out["verts"], batch["verts"])
  kl = latent_term(out, model.z_dim)
  total = w["tex"] * tex + w["geo"] * geo + w["kl"] * kl
  metrics = {"tex_mse": tex, "geo_mse": geo, "kl": kl, "latent_nll": latent_nll(out, model.z_dim)}
  for name, v in out["kl"].items():
    metrics[f"kl_{name}"] = jnp.mean(v) / model.z_dim
  if screen_loss_fn is not None:
    screen = screen_loss_fn(out, batch)
    total = total + screen_w * screen
    metrics["screen"] = screen
  if hmc_loss_fn is not None:

    def decode(z, view):
      return model.apply({"params": params}, z, view, method="decode")

    hmc = hmc_loss_fn(decode, out, batch)
    total = total + w["hmc"] * hmc
    metrics["hmc"] = hmc
  metrics["total"] = total
  return total, metrics


def regressor_loss(regressor, params, batch, target_mu):
  """DAM-Regressor loss: MSE between ``regressor(batch)`` [B, Z] and the frozen posterior mean
  ``target_mu``.

  Returns (loss scalar, {'regressor_mse': loss}).
  """
  pred = regressor.apply({"params": params}, batch)
  loss = mse(pred, jax.lax.stop_gradient(target_mu))
  return loss, {"regressor_mse": loss}
