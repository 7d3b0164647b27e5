"""The latent flow f: Y -> Z, a distrax chain of masked coupling layers whose conditioners are Flax
MLPs.

distrax bijectors are plain Python objects that take their parameters as arrays, so the chain is
built inside a method of a Flax module (``LatentFlow.bijector``): the conditioners are the module's
submodules and are called from within the distrax ``MaskedCoupling`` layers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import distrax
import flax.linen as nn
from jax import lax
import jax.numpy as jnp
import numpy as np

from lipflow_jax.models import layers, spline

BIJECTORS = ("spline", "affine")
MASKS = ("checkerboard", "half")


def coupling_masks(z_dim: int, num_layers: int, kind: str = "checkerboard"):
  """Boolean masks [num_layers, Z]; True = passed through unchanged (and read by the conditioner).

  'checkerboard': even/odd dimensions, alternating per layer; 'half': first/second half,
  alternating.
  """
  if kind not in MASKS:
    raise ValueError(f"Unknown mask {kind!r}; expected one of {MASKS}.")
  idx = np.arange(z_dim)
  base = (idx % 2 == 0) if kind == "checkerboard" else (idx < z_dim // 2)
  return np.stack([base if i % 2 == 0 else ~base for i in range(num_layers)])


def transformed_dims(mask) -> slice:
  """The dimensions a coupling layer transforms (``mask`` [Z] False) as a static slice of the last
  axis (the masks of ``coupling_masks`` are arithmetic progressions)."""
  idx = np.flatnonzero(~np.asarray(mask))
  step = int(idx[1] - idx[0]) if len(idx) > 1 else 1
  if len(idx) == 0 or not np.array_equal(idx, np.arange(idx[0], idx[-1] + 1, step)):
    raise ValueError(f"The transformed dimensions {idx} are not a slice.")
  return slice(int(idx[0]), int(idx[-1]) + 1, step)


class OnDims(distrax.Bijector):
  """An elementwise bijector applied to ``x[..., dims]`` only (the identity on the other entries),
  so that a coupling layer evaluates its bijector on the dimensions it transforms and no others.

  Args:
    inner: elementwise bijector for the [..., len(dims)] entries (its parameters sized for them).
    dims: static slice of the last axis.
    size: Z, the last axis' length.
  """

  def __init__(self, inner: distrax.Bijector, dims: slice, size: int):
    super().__init__(event_ndims_in=0)
    self._inner, self._dims = inner, dims
    self._mask = np.zeros(size, bool)
    self._mask[dims] = True
    idx = np.flatnonzero(self._mask)
    self._pad = (int(idx[0]), size - 1 - int(idx[-1]), dims.step - 1)  # lax.pad of the last axis

  def _embed(self, sub, full):
    """full [..., Z] with full[..., dims] = sub [..., len(dims)]."""
    config = [(0, 0, 0)] * (sub.ndim - 1) + [self._pad]
    return jnp.where(self._mask, lax.pad(sub, jnp.zeros((), sub.dtype), config), full)

  def forward_and_log_det(self, x):
    y, logdet = self._inner.forward_and_log_det(x[..., self._dims])
    return self._embed(y, x), self._embed(logdet, jnp.zeros_like(x))

  def inverse_and_log_det(self, y):
    x, logdet = self._inner.inverse_and_log_det(y[..., self._dims])
    return self._embed(x, y), self._embed(logdet, jnp.zeros_like(y))


class LatentFlow(nn.Module):
  """Conditional coupling flow z = f(y; h) on R^Z.

  f = L_K o ... o L_1, each L_k a masked coupling layer with mask m_k (alternating between layers):

    forward:  z = m * y + (1 - m) * g(y; theta_k([m * y, h]))
    inverse:  y = m * z + (1 - m) * g^-1(z; theta_k([m * z, h]))
    log-det:  log|det df/dy| = sum_{i: m_i = 0} log|g'(y_i; theta_k,i)|,   summed over layers;
              the inverse's log-det is its negative.

  g is elementwise: a rational-quadratic spline on [-range_bound, range_bound] with ``num_bins``
  bins (``bijector='spline'``, ``spline.RationalQuadraticSpline``: distrax's spline with
  ``boundary_slopes='identity'`` in faster whole-array ops; outside that interval g is the identity,
  and the spline's end slopes are 1, so g is C^1 across the boundary), or
  an affine map g(x) = exp(s) * x + t with s = max_log_scale * tanh(raw / max_log_scale)
  (``bijector='affine'``). theta_k is an MLP on the masked input concatenated with the context h
  (when ``use_context``); its last layer is zero-initialised, so f is exactly the identity at
  initialisation.

  Attributes:
    z_dim: Z.
    num_layers: number of coupling layers (even numbers transform every dimension equally often).
    hidden: hidden widths of each conditioner MLP.
    bijector: 'spline' or 'affine'.
    num_bins: spline bins.
    range_bound: the spline acts on [-range_bound, range_bound].
    mask: 'checkerboard' or 'half'.
    use_context: conditioners read h (a conditional flow); False: h is ignored (must be None).
    max_log_scale: bound of the affine log-scale.
    max_spline_param: the raw spline parameters (bin-width/height logits, slope pre-activations) are
      soft-clipped to (-max_spline_param, max_spline_param) (0: no clipping); this keeps bins and
      slopes away from float32-degenerate values (ratios of bin sizes <= e^(2 max)) and leaves the
      identity at 0.
  """

  z_dim: int
  num_layers: int = 4
  hidden: Sequence[int] = (128, 128)
  bijector: str = "spline"
  num_bins: int = 8
  range_bound: float = 5.0
  mask: str = "checkerboard"
  use_context: bool = True
  max_log_scale: float = 3.0
  max_spline_param: float = 5.0

  def __post_init__(self):
    super().__post_init__()
    if self.bijector not in BIJECTORS:
      raise ValueError(f"Unknown flow bijector {self.bijector!r}; expected one of {BIJECTORS}.")
    if self.mask not in MASKS:
      raise ValueError(f"Unknown flow mask {self.mask!r}; expected one of {MASKS}.")
    if self.z_dim < 2:
      raise ValueError(f"A coupling flow needs z_dim >= 2, got {self.z_dim}.")
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}.")
    if self.bijector == "spline" and (self.num_bins < 1 or self.range_bound <= 0):
      raise ValueError(
        f"Spline needs num_bins >= 1 and range_bound > 0, got {self.num_bins}, {self.range_bound}."
      )

  @property
  def params_per_dim(self) -> int:
    """Bijector parameters per dimension: 3 * num_bins + 1 (spline) or 2 (affine)."""
    return 3 * self.num_bins + 1 if self.bijector == "spline" else 2

  def setup(self):
    self.conditioners = [
      layers.MLP(
        tuple(self.hidden) + (self.z_dim * self.params_per_dim,),
        zero_init_last=True,
        name=f"coupling_{i}",
      )
      for i in range(self.num_layers)
    ]

  def _inner(self, params):
    if self.bijector == "spline":
      if self.max_spline_param > 0:
        params = layers.soft_clip(params, self.max_spline_param)
      return spline.RationalQuadraticSpline(params, -self.range_bound, self.range_bound)
    shift, raw = params[..., 0], params[..., 1]
    return distrax.ScalarAffine(shift=shift, log_scale=layers.soft_clip(raw, self.max_log_scale))

  def bijector_for(self, h: Optional[jnp.ndarray] = None) -> distrax.Chain:
    """The distrax bijector f(.; h) (a ``Chain`` of ``MaskedCoupling``), for use within this module.

    Args:
      h: [B, H] context, broadcast against the leading axes of the inputs ([..., B, Z]); None when
        ``use_context`` is False.
    """
    if self.use_context and h is None:
      raise ValueError("This flow is conditional (use_context=True); pass the context h.")
    if not self.use_context and h is not None:
      raise ValueError("This flow is unconditional (use_context=False); h must be None.")
    masks = coupling_masks(self.z_dim, self.num_layers, self.mask)

    ppd = self.params_per_dim

    def coupling(mask, net):
      dims = transformed_dims(mask)
      # Only the parameters of the transformed dimensions: MaskedCoupling never reads the rest.
      cols = (np.arange(self.z_dim)[dims, None] * ppd + np.arange(ppd)).ravel()

      def conditioner(x):
        if h is not None:
          ctx = jnp.broadcast_to(h, x.shape[:-1] + h.shape[-1:])
          x = jnp.concatenate([x, ctx], axis=-1)
        out = net(x, out_columns=cols)
        return out.reshape(out.shape[:-1] + (-1, ppd))

      inner = lambda params: OnDims(self._inner(params), dims, self.z_dim)
      return distrax.MaskedCoupling(
        mask=jnp.asarray(mask), conditioner=conditioner, bijector=inner, event_ndims=1
      )

    couplings = [coupling(m, net) for m, net in zip(masks, self.conditioners)]
    # distrax.Chain applies the last bijector first; reverse so that coupling_0 acts first on y.
    return distrax.Chain(couplings[::-1])

  def forward(self, y, h=None):
    """y: [..., Z] (h: [B, H] or None) -> (z [..., Z], log|det dz/dy| [...])."""
    return self.bijector_for(h).forward_and_log_det(y)

  def inverse(self, z, h=None):
    """z: [..., Z] (h: [B, H] or None) -> (y [..., Z], log|det dy/dz| [...])."""
    return self.bijector_for(h).inverse_and_log_det(z)

  def __call__(self, y, h=None):
    """Same as ``forward``."""
    return self.forward(y, h)
