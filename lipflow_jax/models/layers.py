"""Small building blocks shared by the encoders, the decoder and the flow.

Every module here holds parameters and nothing else; sizes are plain attributes. Images are NHWC
(``[B, H, W, C]`` float32) throughout.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LOG_2PI = math.log(2.0 * math.pi)


def leaky_relu(x):
  """LeakyReLU with slope 0.2, as in the Multiface DAM."""
  return nn.leaky_relu(x, negative_slope=0.2)


def soft_clip(x, bound: float):
  """Smoothly limits ``x`` to ``(-bound, bound)``: ``bound * tanh(x / bound)`` (identity near 0)."""
  return bound * jnp.tanh(x / bound)


def gaussian_log_prob(x, mu, logstd):
  """Diagonal Gaussian log-density, summed over the last axis.

  Args:
    x, mu, logstd: [..., Z] float32 (broadcastable).
  Returns:
    [...] sum_i log N(x_i; mu_i, exp(logstd_i)^2).
  """
  e = (x - mu) * jnp.exp(-logstd)
  return jnp.sum(-0.5 * e * e - logstd - 0.5 * LOG_2PI, axis=-1)


def gaussian_kl(mu_q, logstd_q, mu_p=0.0, logstd_p=0.0):
  """KL(N(mu_q, exp(logstd_q)^2) || N(mu_p, exp(logstd_p)^2)) for diagonal Gaussians, summed over
  axis -1.

  Args:
    mu_q, logstd_q, mu_p, logstd_p: [..., Z] float32 (broadcastable; the defaults give the KL to
      N(0, I)).
  Returns:
    [...].
  """
  d = (mu_q - mu_p) * jnp.exp(-logstd_p)
  kl = logstd_p - logstd_q + 0.5 * (jnp.exp(2.0 * (logstd_q - logstd_p)) + d * d - 1.0)
  return jnp.sum(kl, axis=-1)


class WeightNormed(nn.Module):
  """Weight normalisation (``nn.WeightNorm``: kernel = scale * v / ||v|| per output feature) of
  ``layer``.

  Parameters: ``layer/{kernel, bias}`` (v and the bias) and ``WeightNorm_0/'layer/kernel/scale'``.
  """

  layer: nn.Module

  @nn.compact
  def __call__(self, x):
    return nn.WeightNorm(self.layer)(x)


def dense(
  features: int,
  weight_norm: bool = False,
  name: Optional[str] = None,
  detached: bool = False,
  **kwargs,
):
  """A ``nn.Dense``, optionally weight-normalised (``nn.WeightNorm``, as in Multiface's
  ``LinearWN``); ``detached``: not a submodule of the module whose method builds it."""
  where = dict(parent=None) if detached else {}
  if weight_norm:
    return WeightNormed(nn.Dense(features, parent=None, **kwargs), name=name, **where)
  return nn.Dense(features, name=name, **kwargs, **where)


def dense_columns(params, x, cols, weight_norm: bool = False):
  """Only the output columns ``cols`` ([C] int) of a ``dense`` layer with parameters ``params``:
  x [..., D_in] -> [..., C], equal to the full layer's output [..., cols] in O(C) work (every leaf
  of a dense layer's parameters, weight norm's scale too, has the output features last)."""
  sub = jax.tree_util.tree_map(lambda a: jnp.take(a, cols, axis=-1), params)
  return dense(len(cols), weight_norm, detached=True).apply({"params": sub}, x)


def conv(
  features: int,
  kernel: int,
  stride: int = 1,
  weight_norm: bool = False,
  name: Optional[str] = None,
  **kwargs,
):
  """A SAME-padded ``nn.Conv``, optionally weight-normalised."""
  kwargs = dict(kernel_size=(kernel, kernel), strides=(stride, stride), padding="SAME", **kwargs)
  if weight_norm:
    return WeightNormed(nn.Conv(features, parent=None, **kwargs), name=name)
  return nn.Conv(features, name=name, **kwargs)


def upsample_nearest(x):
  """[B, H, W, C] -> [B, 2H, 2W, C] by nearest-neighbour repetition (broadcast + reshape, no
  gather); ``upsample_conv`` convolves it without building it."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def _phase_taps(kernel, phase: int, axis: int):
  """The 3 taps of a SAME convolution after a nearest 2x upsampling along ``axis``, as the 2 taps
  at the low resolution of output phase ``phase`` (output 2i + phase reads low-res entries i +
  phase - 1 and i + phase): [..., 3, ...] -> [..., 2, ...]."""
  t0, t1, t2 = (jnp.take(kernel, i, axis=axis) for i in range(3))
  return jnp.stack((t0, t1 + t2) if phase == 0 else (t0 + t1, t2), axis=axis)


def upsample_conv(
  x,
  kernel,
  window_strides=(1, 1),
  padding="SAME",
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
):
  """``conv(upsample_nearest(x), kernel)`` (3x3, stride 1, SAME) as a sub-pixel convolution at the
  low resolution: the four output phases of each 2x2 low-res window in one matmul (im2col), then
  depth-to-space. 2.25x fewer multiply-adds, the upsampled input is never built, and there is no
  convolution op (XLA's CPU compiler runs convolutions inside loops, e.g. a fit's ``lax.scan``, and
  their transposes on a slow path).

  Takes ``lax.conv_general_dilated``'s arguments (``nn.Conv(conv_general_dilated=...)``; the
  parameters are those of the 3x3 conv) and accepts only the configuration above.

  Args:
    x: [B, H, W, Ci]; kernel: [3, 3, Ci, Co] (HWIO).
  Returns:
    [B, 2H, 2W, Co].
  """
  ones = (None, (1, 1), [1, 1])
  if (
    kernel.shape[:2] != (3, 3)
    or tuple(window_strides) != (1, 1)
    or padding != "SAME"
    or lhs_dilation not in ones
    or rhs_dilation not in ones
    or feature_group_count != 1
    or x.ndim != 4
  ):
    raise ValueError(
      "upsample_conv: only a 3x3 stride-1 SAME convolution of an NHWC batch, got kernel "
      f"{kernel.shape}, strides {window_strides}, padding {padding!r}, input {x.shape}"
    )
  b, h, w, ci = x.shape
  co = kernel.shape[-1]
  rows = [_phase_taps(kernel, a, 0) for a in (0, 1)]
  # [2, 2, Ci, 4 Co]: low-res taps (t, s) -> phases (a, c) in the output channels.
  k2 = jnp.concatenate([_phase_taps(r, c, 1) for r in rows for c in (0, 1)], axis=-1)
  # Window (r, q) covers low-res rows r - 1, r and columns q - 1, q; phase (a, c) of output (i, j)
  # is window (i + a, j + c).
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  windows = jnp.concatenate(
    [xp[:, t : t + h + 1, s : s + w + 1] for t in (0, 1) for s in (0, 1)], axis=-1
  )
  y = jnp.matmul(windows.reshape(-1, 4 * ci), k2.reshape(4 * ci, 4 * co), precision=precision)
  y = y.reshape(b, h + 1, w + 1, 2, 2, co)
  out = [jnp.stack([y[:, a : a + h, c : c + w, a, c] for c in (0, 1)], axis=3) for a in (0, 1)]
  return jnp.stack(out, axis=2).reshape(b, 2 * h, 2 * w, co)


class MLP(nn.Module):
  """Dense layers with LeakyReLU(0.2) between them (none after the last).

  Attributes:
    features: output width of each layer; the last entry is the output width.
    zero_init_last: zero-initialise the last layer's kernel and bias (output 0 at init).
    activate_last: apply the activation after the last layer too.
    weight_norm: weight-normalise every layer.
  """

  features: Sequence[int]
  zero_init_last: bool = False
  activate_last: bool = False
  weight_norm: bool = False

  @nn.compact
  def __call__(self, x, out_columns=None):
    """[..., D_in] -> [..., features[-1]], or [..., len(out_columns)] with ``out_columns`` (static
    integer indices of the last layer's outputs): then, outside initialisation, the last layer
    computes only those columns (``dense_columns``: a caller that reads part of the output skips
    the rest of the last matmul)."""
    if not self.features:
      raise ValueError("MLP needs at least one layer (features is empty).")
    n = len(self.features)
    for i, f in enumerate(self.features):
      if i == n - 1 and out_columns is not None and not self.is_initializing():
        params = self.variables["params"][f"dense_{i}"]
        weight_norm = self.weight_norm and not self.zero_init_last  # as ``_layer`` builds it
        x = dense_columns(params, x, np.asarray(out_columns), weight_norm)
      else:
        x = self._layer(i, f)(x)
        if i == n - 1 and out_columns is not None:
          x = x[..., np.asarray(out_columns)]
      if i < n - 1 or self.activate_last:
        x = leaky_relu(x)
    return x

  def _layer(self, i, f):
    if i == len(self.features) - 1 and self.zero_init_last:
      return nn.Dense(f, kernel_init=nn.initializers.zeros, name=f"dense_{i}")
    return dense(f, self.weight_norm, name=f"dense_{i}")


class ConvTower(nn.Module):
  """Stride-2 convolutions with LeakyReLU(0.2), then flatten and a dense layer.

  Every entry of ``channels`` is one ``kernel x kernel`` stride-2 SAME convolution, so the spatial
  size shrinks by 2 per entry (rounded up for odd sizes).

  Attributes:
    channels: output channels of each stride-2 convolution.
    features: width of the final dense layer (0: return the flattened conv features).
    kernel: convolution kernel size (4 as in the Multiface DAM).
    weight_norm: weight-normalise every layer.
  """

  channels: Sequence[int]
  features: int
  kernel: int = 4
  weight_norm: bool = False

  @nn.compact
  def __call__(self, x):
    """[B, H, W, C] -> [B, features]."""
    if x.ndim != 4:
      raise ValueError(f"ConvTower expects [B, H, W, C] images, got shape {x.shape}.")
    for i, c in enumerate(self.channels):
      x = leaky_relu(conv(c, self.kernel, 2, self.weight_norm, name=f"conv_{i}")(x))
    x = x.reshape(x.shape[0], -1)
    if self.features:
      x = leaky_relu(dense(self.features, self.weight_norm, name="dense")(x))
    return x


class UntiedBias(nn.Module):
  """Adds a learned bias per position and channel (``[H, W, C]``, zero-initialised), as in DAM's
  decoder."""

  @nn.compact
  def __call__(self, x):
    """[B, H, W, C] -> [B, H, W, C]."""
    bias = self.param("bias", nn.initializers.zeros, x.shape[1:], jnp.float32)
    return x + bias


def num_doublings(size: int, start: int) -> int:
  """Number of 2x steps from ``start`` to ``size``; raises ValueError if ``size != start *
  2**n``."""
  if start <= 0 or size < start or size % start:
    raise ValueError(f"Texture size {size} is not the start grid {start} times a power of 2.")
  ratio = size // start
  n = ratio.bit_length() - 1
  if ratio != 1 << n:
    raise ValueError(f"Texture size {size} is not the start grid {start} times a power of 2.")
  return n


def batch_size_of(tree) -> int:
  """Leading axis of the first array leaf of a batch dict."""
  leaves = [x for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape") and x.ndim > 0]
  if not leaves:
    raise ValueError("Cannot infer the batch size: the batch holds no arrays.")
  return leaves[0].shape[0]
