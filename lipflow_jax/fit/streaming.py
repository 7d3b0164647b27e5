"""Live driving: a streaming fitter that follows a sequence frame by frame.

One compiled step takes the previous frame's ``StreamState`` (the optimised variable, its Adam
moments, the code) and the new frame's observation, runs a fixed number of Adam steps warm-started
from the previous frame, and returns the new state. Every frame has the initial value the batch
fitter would give it (``FitConfig.init``: the prior mode of this frame's signal for LiP-Flow and the
conditional Gaussian, the DAM-Regressor's code, or zeros); the first usable frame starts there, and
each later one from its own initial value plus the previous frame's fitted correction,
``v_init(t) + (v(t-1) - v_init(t-1))``: the inference-time encoder follows the motion in one
pass, the steps refine it. (With ``init='zeros'`` this is the previous frame's result.) The step
size is constant (``FitConfig.lr``; no per-frame schedule) and the Adam moments carry over.

A frame with nothing usable (every keypoint invisible or non-finite; every headset pixel non-finite
or masked out) keeps the previous state and code and is counted in ``StreamState.skipped``; nothing
becomes NaN. Within a usable frame, NaN headset pixels are masked as in the batch fit
(``objectives.mask_hmc``).

    step = fit.stream_step_fn(fit.fit_config("lipflow_fit", "keypoints", lr=0.05), steps=4)
    state = fit.stream_init(bundle, cfg)
    for frame in frames:                    # dicts of per-frame arrays (no batch axis)
      state = step(bundle, state, frame)     # state.z: [Z], this frame's code
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lipflow_jax.fit import fitting
from lipflow_jax.fit import objectives as objectives_lib
from lipflow_jax.fit import priors as priors_lib


class StreamState(NamedTuple):
  """The streaming fitter after a frame.

  v: [Z] the optimised variable (the code, or the flow's base variable in space 'y'); v_init: [Z]
  its initial value for that frame; opt_state: its Adam state; z: [Z] the frame's code; started:
  [] bool, a usable frame was fitted;
  frames: [] int32 frames seen; skipped: [] int32 frames with nothing usable (previous code kept).
  """

  v: jax.Array
  v_init: jax.Array
  opt_state: Any
  z: jax.Array
  started: jax.Array
  frames: jax.Array
  skipped: jax.Array


def _optimizer(cfg: fitting.FitConfig):
  return optax.adam(cfg.lr)


def stream_init(bundle, cfg: fitting.FitConfig) -> StreamState:
  """The state before the first frame (nothing fitted yet), on the default device like the step's
  outputs (so that the first and the later frames share one compiled step)."""
  zeros = jnp.zeros((bundle.latent_dim,), jnp.float32)
  state = StreamState(
    v=zeros,
    v_init=zeros,
    opt_state=_optimizer(cfg).init(zeros),
    z=zeros,
    started=jnp.zeros((), bool),
    frames=jnp.zeros((), jnp.int32),
    skipped=jnp.zeros((), jnp.int32),
  )
  return jax.device_put(state, jax.devices()[0])


def usable(obs, cfg: fitting.FitConfig):
  """[] bool: the frame holds at least one usable observation for the objectives of ``cfg``."""
  ok = jnp.zeros((), bool)
  for objective, _, _ in cfg.objectives:
    if objective == "keypoints":
      _, valid = objectives_lib.sanitize_keypoints(obs["keypoints"], obs.get("keypoints_visible"))
      ok = ok | jnp.any(valid > 0)
    elif objective == "hmc":
      valid = jnp.isfinite(obs["hmc"])
      if "hmc_mask" in obs:
        valid = valid & (obs["hmc_mask"] > 0)
      ok = ok | jnp.any(valid)
    else:  # a custom objective: the frame counts as usable
      ok = jnp.ones((), bool)
  return ok


def _where(cond, a, b):
  return jax.tree_util.tree_map(lambda x, y: jnp.where(cond, x, y), a, b)


def _stream_step(
  bundle, state: StreamState, obs, cfg: fitting.FitConfig, steps: int, lambda_prior=None
) -> StreamState:
  one = objectives_lib.mask_hmc(jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], obs))
  if fitting.needs_condition(cfg):
    one = priors_lib.condition_stats(bundle, one, cfg.condition)
  v_init, z_init = fitting.start_values(bundle, one, cfg)
  frame = jax.tree_util.tree_map(lambda x: x[0], one)
  opt = _optimizer(cfg)
  v0 = jnp.where(state.started, v_init[0] + (state.v - state.v_init), v_init[0])
  s0 = _where(state.started, state.opt_state, opt.init(v_init[0]))
  grad_fn = jax.value_and_grad(fitting.make_loss(cfg, lambda_prior), has_aux=True)

  def step(carry, _):
    v, s, _ = fitting.adam_step(grad_fn, opt, *carry, frame, bundle)
    return (v, s), None

  (v, s), _ = jax.lax.scan(step, (v0, s0), None, length=steps)
  z = fitting.to_code(bundle, cfg, v, frame)
  ok = usable(obs, cfg)
  return StreamState(
    v=jnp.where(ok, v, state.v),
    v_init=jnp.where(ok, v_init[0], state.v_init),
    opt_state=_where(ok, s, state.opt_state),
    z=jnp.where(ok, z, jnp.where(state.started, state.z, z_init[0])),
    started=state.started | ok,
    frames=state.frames + 1,
    skipped=state.skipped + (~ok).astype(jnp.int32),
  )


@functools.lru_cache(maxsize=None)
def stream_step_fn(cfg: fitting.FitConfig, steps: int):
  """The compiled step ``(bundle, state, obs[, lambda_prior]) -> StreamState`` for ``cfg``,
  ``steps`` Adam steps a frame. ``obs``: one frame's observation dict (no batch axis)."""
  if steps < 1:
    raise ValueError(f"stream steps must be >= 1, got {steps}")
  return jax.jit(functools.partial(_stream_step, cfg=cfg, steps=steps))
