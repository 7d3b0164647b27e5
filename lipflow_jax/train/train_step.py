"""The update step and the evaluation step, jitted with their shardings on the data-parallel mesh.

``loss_fn(params, frozen, batch, rng) -> (loss [], metrics {name: []})`` is the only thing a step
knows about the model (``frozen``: fixed arrays the loss reads, e.g. a teacher's parameters; ``{}``
when none), so every variant (DAM, LiP-Flow, regressor, ...) shares the same step. A non-finite loss
or gradient skips the update inside the jitted step (``optax.apply_if_finite`` semantics: parameters
and optimiser state are kept) and is counted in the state.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from lipflow_jax import distributed
from lipflow_jax.train.train_state import TrainState

PyTree = Any
LossFn = Callable[[PyTree, PyTree, dict, jax.Array], tuple[jax.Array, dict]]

DATA_AXIS = distributed.DATA_AXIS


# ------------------------------------------------------------------------------------ shardings
# The mesh: ``distributed.make_mesh``; a batch enters it through ``distributed.shard_batch``.
def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``'data'`` (how ``distributed.shard_batch`` places a batch)."""
  return NamedSharding(mesh, P(DATA_AXIS))


# --------------------------------------------------------------------------------------------------
# steps
def _select(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def train_step(
  state: TrainState,
  batch: dict,
  frozen: PyTree = None,
  *,
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  learning_rate_fn: optax.Schedule | None = None,
) -> tuple[TrainState, dict]:
  """One update. Returns (new state, metrics {name: [] float32}).

  The step's key is ``fold_in(state.rng, state.step)``. If the loss or the gradient norm is not
  finite, the parameters and optimiser state are returned unchanged, ``nonfinite_total`` and
  ``nonfinite_consecutive`` are incremented, and ``metrics['skipped'] = 1``; ``step`` advances
  either way (the batch is consumed).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params, frozen, batch, rng
  )
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
    step=state.step + 1,
    params=_select(finite, new_params, state.params),
    opt_state=_select(finite, new_opt_state, state.opt_state),
    nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    nonfinite_consecutive=jnp.where(finite, 0, state.nonfinite_consecutive + 1).astype(jnp.int32),
  )
  metrics = dict(metrics)
  metrics.update(
    loss=loss,
    grad_norm=grad_norm,
    skipped=(~finite).astype(jnp.float32),
    param_norm=optax.tree.norm(new_state.params),
  )
  if learning_rate_fn is not None:
    # Number of applied updates = optax's count (skipped steps do not advance the schedule).
    metrics['learning_rate'] = learning_rate_fn(state.step - state.nonfinite_total)
  metrics = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)
  return new_state, metrics


def eval_step(
  params: PyTree, frozen: PyTree, batch: dict, rng: jax.Array, *, loss_fn: LossFn
) -> dict:
  """Loss metrics without an update (the same ``loss_fn``, fixed key)."""
  loss, metrics = loss_fn(params, frozen, batch, rng)
  metrics = dict(metrics, loss=loss)
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)


def jit_train_step(
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  learning_rate_fn: optax.Schedule | None = None,
) -> Callable[..., tuple]:
  """``train_step`` jitted over ``mesh``: ``(state, batch, frozen) -> (state, metrics)`` with a
  replicated, donated state, the batch split over ``'data'`` and replicated ``frozen`` arrays."""
  step = functools.partial(train_step, loss_fn=loss_fn, tx=tx, learning_rate_fn=learning_rate_fn)
  rep = replicated_sharding(mesh)
  return jax.jit(
    step, in_shardings=(rep, batch_sharding(mesh), rep), out_shardings=(rep, rep), donate_argnums=0
  )


def jit_eval_step(loss_fn: LossFn, mesh: Mesh) -> Callable[[PyTree, PyTree, dict, jax.Array], dict]:
  """``eval_step`` jitted over ``mesh``: ``(params, frozen, batch, rng) -> metrics``."""
  rep = replicated_sharding(mesh)
  return jax.jit(
    functools.partial(eval_step, loss_fn=loss_fn),
    in_shardings=(rep, rep, batch_sharding(mesh), rep),
    out_shardings=rep,
  )
