"""Train state and optimiser.

The whole mutable state of a run is one pytree, ``TrainState``, so that the jitted step maps state
-> state and one orbax item saves and restores all of it (parameters, optimiser moments, step, RNG
and the non-finite counters).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
  """Everything a resumed run needs besides the data iterator.

  Attributes:
    step: [] int32, number of batches consumed (skipped non-finite steps included).
    params: the model parameters (the ``'params'`` collection).
    opt_state: the optax state; not advanced by a skipped step.
    rng: [2] uint32 raw PRNG key; the key of step ``s`` is ``fold_in(rng, s)``, so it never changes.
    nonfinite_total: [] int32, skipped steps so far.
    nonfinite_consecutive: [] int32, skipped steps in a row up to and including the last step.
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array
  nonfinite_total: jax.Array
  nonfinite_consecutive: jax.Array


def make_learning_rate_schedule(
  learning_rate: float,
  total_steps: int,
  warmup_steps: int = 0,
  decay: str = 'cosine',
  end_factor: float = 0.0,
) -> optax.Schedule:
  """Linear warm-up from 0 to ``learning_rate`` then ``decay`` in {'cosine', 'linear',
  'constant'}."""
  if total_steps <= 0:
    raise ValueError(f'total_steps must be positive, got {total_steps}')
  warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))
  decay_steps = total_steps - warmup_steps
  end_value = learning_rate * end_factor
  if decay == 'cosine':
    after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_factor)
  elif decay == 'linear':
    after = optax.linear_schedule(learning_rate, end_value, decay_steps)
  elif decay == 'constant':
    after = optax.constant_schedule(learning_rate)
  else:
    raise ValueError(f"decay must be 'cosine', 'linear' or 'constant', got {decay!r}")
  if warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(
  learning_rate: float | optax.Schedule,
  *,
  clip_norm: float | None = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """Global-norm clipping followed by Adam (AdamW when ``weight_decay > 0``)."""
  parts = []
  if clip_norm is not None and clip_norm > 0:
    parts.append(optax.clip_by_global_norm(clip_norm))
  if weight_decay > 0:
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  else:
    parts.append(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))
  return optax.chain(*parts)


def create_train_state(
  params: PyTree, tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
  """A fresh state at step 0 (``rng``: a raw [2] uint32 key)."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=jnp.asarray(rng),
    nonfinite_total=jnp.zeros((), jnp.int32),
    nonfinite_consecutive=jnp.zeros((), jnp.int32),
  )


def init_train_state(
  init_params_fn: Callable[[jax.Array], PyTree], tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
  """``create_train_state`` with parameters from ``init_params_fn(init_rng)``; jit it with
  out_shardings."""
  init_rng, train_rng = jax.random.split(rng)
  return create_train_state(init_params_fn(init_rng), tx, train_rng)
