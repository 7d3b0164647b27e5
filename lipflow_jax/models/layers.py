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


def dense(features: int, weight_norm: bool = False, name: Optional[str] = None, **kwargs):
  """A ``nn.Dense``, optionally weight-normalised (``nn.WeightNorm``, as in Multiface's
  ``LinearWN``)."""
  if weight_norm:
    return WeightNormed(nn.Dense(features, parent=None, **kwargs), name=name)
  return nn.Dense(features, name=name, **kwargs)


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
  gather)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


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
    integer indices of the last layer's outputs): then, outside initialisation and without weight
    norm, the last layer computes only those columns (a caller that reads part of the output skips
    the rest of the last matmul)."""
    if not self.features:
      raise ValueError("MLP needs at least one layer (features is empty).")
    n = len(self.features)
    for i, f in enumerate(self.features):
      if i == n - 1 and out_columns is not None:
        cols = np.asarray(out_columns)
        if self.is_initializing() or self.weight_norm:
          x = self._layer(i, f)(x)[..., cols]
        else:
          last = self.variables["params"][f"dense_{i}"]
          x = x @ jnp.take(last["kernel"], cols, axis=-1) + jnp.take(last["bias"], cols, axis=-1)
      else:
        x = self._layer(i, f)(x)
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
