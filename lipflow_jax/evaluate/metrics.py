"""Reconstruction metrics: geometry error, masked image MSE, PSNR and SSIM.

All functions are pure JAX, batched over leading axes, and jit/vmap friendly. Images are float32 in
[0, 1] with channels last (``[..., H, W, C]``); masks are ``[..., H, W, 1]`` (or ``[..., H, W]``) in
{0, 1} or soft.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lipflow_jax.models.losses import mask_like, masked_mse


def geometry_error(verts, verts_gt):
  """Mean per-vertex Euclidean distance.

  Args:
    verts: [..., V, 3] predicted vertices (de-normalised, dataset units).
    verts_gt: [..., V, 3] ground-truth vertices.
  Returns:
    [...] mean over vertices of ||verts - verts_gt||_2.
  """
  return jnp.mean(jnp.linalg.norm(verts - verts_gt, axis=-1), axis=-1)


def mse_to_psnr(mse, max_value: float = 1.0, min_mse: float = 1e-10):
  """PSNR in dB from an MSE: 10 log10(max^2 / mse); the MSE is clamped at ``min_mse`` (100 dB for
  max 1)."""
  return 10.0 * jnp.log10(max_value**2 / jnp.maximum(mse, min_mse))


def psnr(pred, target, mask=None, max_value: float = 1.0):
  """[...] PSNR (dB) of each image, from its (masked) MSE."""
  return mse_to_psnr(masked_mse(pred, target, mask, per_image=True), max_value)


def gaussian_window(size: int = 11, sigma: float = 1.5):
  """[size] normalised 1D Gaussian; its outer product is the 2D SSIM window of Wang et al.
  (2004)."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  w = np.exp(-0.5 * (x / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


def _filter_valid(x, w):
  """Separable 'valid' correlation of [N, H, W] with the 1D window w along H then W."""
  k = w.shape[0]
  h, wd = x.shape[-2], x.shape[-1]
  # Sum of shifted slices: exact, differentiable, and cheap for an 11-tap window.
  y = sum(w[i] * x[:, i : h - k + 1 + i, :] for i in range(k))
  return sum(w[i] * y[:, :, i : wd - k + 1 + i] for i in range(k))


def ssim_map(
  a,
  b,
  max_value: float = 1.0,
  window_size: int = 11,
  sigma: float = 1.5,
  k1: float = 0.01,
  k2: float = 0.03,
):
  """The SSIM map of Wang et al. (2004), Gaussian window, 'valid' region, per channel.

  Args:
    a, b: [..., H, W, C] images with values in [0, max_value]; H, W >= window_size.
  Returns:
    [..., H - window_size + 1, W - window_size + 1, C] local SSIM values.
  """
  if a.shape != b.shape:
    raise ValueError(f"ssim: shapes differ {a.shape} vs {b.shape}")
  if a.shape[-3] < window_size or a.shape[-2] < window_size:
    raise ValueError(f"ssim: image {a.shape[-3:-1]} smaller than the window {window_size}")
  batch = a.shape[:-3]
  h, w, c = a.shape[-3:]
  # [..., H, W, C] -> [N, H, W] with N = prod(batch) * C.
  to_planes = lambda x: jnp.moveaxis(x.astype(jnp.float32), -1, -3).reshape((-1, h, w))
  x, y = to_planes(a), to_planes(b)
  win = jnp.asarray(gaussian_window(window_size, sigma))
  win = win / jnp.sum(win)
  filt = lambda t: _filter_valid(t, win)
  mu_x, mu_y = filt(x), filt(y)
  # Second moments of per-plane centred copies (shift invariant; far less float32 cancellation),
  # with the variances clamped at 0.
  xc = x - jnp.mean(x, axis=(-2, -1), keepdims=True)
  yc = y - jnp.mean(y, axis=(-2, -1), keepdims=True)
  mxc, myc = filt(xc), filt(yc)
  var_x = jnp.maximum(filt(xc * xc) - mxc**2, 0.0)
  var_y = jnp.maximum(filt(yc * yc) - myc**2, 0.0)
  cov = filt(xc * yc) - mxc * myc
  c1, c2 = (k1 * max_value) ** 2, (k2 * max_value) ** 2
  num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
  den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
  s = num / den
  hv, wv = s.shape[-2:]
  return jnp.moveaxis(s.reshape(batch + (c, hv, wv)), -3, -1)


def ssim(a, b, mask=None, max_value: float = 1.0, window_size: int = 11, sigma: float = 1.5):
  """Mean SSIM of each image pair.

  With a mask, both images are first multiplied by it (so the background cannot differ) and the SSIM
  map is averaged over the windows whose centre pixel lies in the mask.

  Args:
    a, b: [..., H, W, C] images in [0, max_value].
    mask: [..., H, W, 1] or [..., H, W] (None = plain mean over the valid region).
  Returns:
    [...] mean SSIM.
  """
  if mask is not None:
    m = mask_like(mask, a)
    a, b = a * m, b * m
  s = ssim_map(a, b, max_value, window_size, sigma)
  if mask is None:
    return jnp.mean(s, axis=(-3, -2, -1))
  r = window_size // 2
  h, w = a.shape[-3:-1]
  mc = m[..., r : h - r, r : w - r, :]
  num = jnp.sum(s * mc, axis=(-3, -2, -1))
  den = jnp.sum(mc, axis=(-3, -2, -1)) * s.shape[-1]
  return jnp.where(den > 0, num / jnp.maximum(den, 1e-8), 1.0)


@jax.jit
def image_metrics(pred, target, mask):
  """Per-image {'mse', 'psnr', 'ssim'} of [..., H, W, C] images against targets, masked."""
  mse = masked_mse(pred, target, mask, per_image=True)
  return {"mse": mse, "psnr": mse_to_psnr(mse), "ssim": ssim(pred, target, mask)}
