"""Numerically risky maths in one place (multinerf's ``math.py`` style): each helper keeps its value
and its gradient finite where the textbook formula does not.

Every stage may import this module; it imports only JAX.
"""

from __future__ import annotations

import jax.numpy as jnp


def safe_div(x, y, eps=1e-12):
  """x / y with |y| clamped to >= eps (sign kept; y = 0 counts as positive). Finite values and
  gradients."""
  y = jnp.where(jnp.abs(y) < eps, jnp.where(y < 0, -eps, eps), y)
  return x / y


def safe_sqrt(x, eps=1e-20):
  """sqrt(max(x, eps)): a finite gradient at 0 (callers pick ``eps`` for their scale)."""
  return jnp.sqrt(jnp.maximum(x, eps))
