"""The fitting loop: z* = argmin_z sum_i w_i L_i(D(z), c) + lambda_prior * (-log p(z | c)), by Adam.

One jitted function: the condition statistics and initial codes are computed for the whole batch,
then ``lax.scan`` runs the Adam steps of one frame and ``vmap`` maps that over the frames. In
sequence mode a second ``lax.scan`` runs over the frames in order and starts each from the previous
frame's result.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lipflow_jax.fit import bundle as bundle_lib
from lipflow_jax.fit import methods as methods_lib
from lipflow_jax.fit import objectives as objectives_lib
from lipflow_jax.fit import priors as priors_lib

ObjectiveSpec = Tuple[Union[str, Callable], float, Tuple[Tuple[str, Any], ...]]


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """Static description of one fitting problem (hashable; a jit static argument).

  Attributes:
    objectives: tuple of (objective name in ``objectives.OBJECTIVES`` or a callable ``(z, obs,
      bundle, **kw)``, weight, tuple of (keyword, value) options).
    prior: name in ``priors.PRIORS`` or a callable ``(z, obs, bundle) -> -log p``.
    condition: the condition whose encoder/flow the prior uses ('keypoints' or 'hmc').
    lambda_prior: weight of the prior term.
    space: 'z' (optimise the code) or 'y' (optimise the flow's base variable, z = f(y); conditional
      priors).
    init: 'zeros', 'prior_mode' (f(mu_c) or mu_c), 'regressor', or 'given' (``z0`` passed to the
      fit).
    num_steps: Adam steps per frame.
    lr: Adam learning rate.
    schedule: 'constant' or 'cosine' (decay to 10% of lr).
    sequence: fit the frames in order, each warm-started from the previous one's result.
    warm_steps: Adam steps for warm-started frames in sequence mode (None = num_steps).
  """

  objectives: Tuple[ObjectiveSpec, ...] = (("keypoints", 1.0, ()),)
  prior: Union[str, Callable] = "gaussian"
  condition: str = "keypoints"
  lambda_prior: float = 1.0
  space: str = "z"
  init: str = "zeros"
  num_steps: int = 100
  lr: float = 0.05
  schedule: str = "cosine"
  sequence: bool = False
  warm_steps: Optional[int] = None

  def __post_init__(self):
    if self.space not in ("z", "y"):
      raise ValueError(f"FitConfig.space must be 'z' or 'y', got {self.space!r}")
    if self.init not in ("zeros", "prior_mode", "regressor", "given"):
      raise ValueError(
        f"FitConfig.init must be zeros/prior_mode/regressor/given, got {self.init!r}"
      )
    if self.schedule not in ("constant", "cosine"):
      raise ValueError(f"FitConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
    if isinstance(self.prior, str) and self.prior not in priors_lib.PRIORS:
      raise ValueError(
        f"FitConfig.prior: unknown {self.prior!r}; one of {sorted(priors_lib.PRIORS)}"
      )
    if self.space == "y" and self.prior not in priors_lib.CONDITIONAL:
      raise ValueError(
        "FitConfig.space='y' needs a conditional prior (lipflow or conditional_gaussian)"
      )
    if self.num_steps < 0:
      raise ValueError(f"FitConfig.num_steps must be >= 0, got {self.num_steps}")
    if self.warm_steps is not None and not 1 <= self.warm_steps <= self.num_steps:
      raise ValueError(f"FitConfig.warm_steps must be in [1, num_steps], got {self.warm_steps}")
    for spec in self.objectives:
      if len(spec) != 3:
        raise ValueError(
          f"FitConfig.objectives entries are (objective, weight, options), got {spec!r}"
        )
      if isinstance(spec[0], str) and spec[0] not in objectives_lib.OBJECTIVES:
        raise ValueError(
          f"unknown objective {spec[0]!r}; one of {sorted(objectives_lib.OBJECTIVES)}"
        )


class FitResult(NamedTuple):
  """z: [B, Z] fitted codes; y: [B, Z] the optimised variable (= z for space 'z'); losses: dict of
  [B, steps] traces ('total', 'obs', 'prior') of the loss at each step's start; init: [B, Z] initial
  codes."""

  z: jax.Array
  y: jax.Array
  losses: dict
  init: jax.Array


def needs_condition(cfg: FitConfig) -> bool:
  """Whether fitting with ``cfg`` reads the condition statistics (``priors.condition_stats``)."""
  return cfg.prior in priors_lib.CONDITIONAL or cfg.space == "y" or cfg.init == "prior_mode"


def _flow_prior(cfg: FitConfig) -> bool:
  return cfg.prior in ("lipflow", "flow")


def to_code(bundle, cfg: FitConfig, v, obs):
  """Optimisation variable -> code for one frame: z = f(y | h) in space 'y' with the flow, else
  v."""
  if cfg.space == "y" and cfg.prior == "lipflow":
    return bundle_lib.flow_forward(bundle, v, obs.get("prior_h"), cfg.condition)
  return v


def loss_terms(v, obs, bundle, cfg: FitConfig):
  """(observation term, prior term) for one frame's optimisation variable ``v`` [Z]."""
  z = to_code(bundle, cfg, v, obs)
  obs_term = jnp.zeros((), jnp.float32)
  for objective, weight, options in cfg.objectives:
    fn = objectives_lib.OBJECTIVES[objective] if isinstance(objective, str) else objective
    obs_term = obs_term + weight * fn(z, obs, bundle, **dict(options))
  if cfg.space == "y":
    prior_term = priors_lib.base_gaussian_prior(v, obs, bundle)
  elif callable(cfg.prior):
    prior_term = cfg.prior(z, obs, bundle)
  elif _flow_prior(cfg):
    prior_term = priors_lib.PRIORS[cfg.prior](z, obs, bundle, name=cfg.condition)
  else:
    prior_term = priors_lib.PRIORS[cfg.prior](z, obs, bundle)
  return obs_term, prior_term


def make_loss(cfg: FitConfig, lambda_prior=None):
  """The per-frame loss ``(v [Z], obs, bundle) -> (total, (obs_term, prior_term))``;
  ``lambda_prior`` (a float or a traced scalar) replaces ``cfg.lambda_prior`` when given."""
  lam = cfg.lambda_prior if lambda_prior is None else lambda_prior

  def loss(v, obs, bundle):
    obs_term, prior_term = loss_terms(v, obs, bundle, cfg)
    return obs_term + lam * prior_term, (obs_term, prior_term)

  return loss


def _optimizer(cfg: FitConfig, num_steps: int):
  lr = cfg.lr
  if cfg.schedule == "cosine" and num_steps > 0:
    lr = optax.cosine_decay_schedule(cfg.lr, max(num_steps, 1), alpha=0.1)
  return optax.adam(lr)


def adam_step(grad_fn, opt, v, state, obs, bundle):
  """One optimiser step on one frame's variable v [Z]: -> (v, state, {'total', 'obs', 'prior'} at
  the step's start). ``grad_fn`` is ``value_and_grad(make_loss(...), has_aux=True)``; non-finite
  gradient entries are zeroed, so they never enter the code."""
  (total, (o, p)), g = grad_fn(v, obs, bundle)
  g = jnp.where(jnp.isfinite(g), g, 0.0)
  updates, state = opt.update(g, state, v)
  return optax.apply_updates(v, updates), state, {"total": total, "obs": o, "prior": p}


def optimize_frame(
  v0, obs, bundle, cfg: FitConfig, num_steps: Optional[int] = None, lambda_prior=None
):
  """Adam on one frame, as a ``lax.scan``. v0: [Z] -> (v [Z], traces dict of [num_steps])."""
  num_steps = cfg.num_steps if num_steps is None else num_steps
  opt = _optimizer(cfg, num_steps)
  grad_fn = jax.value_and_grad(make_loss(cfg, lambda_prior), has_aux=True)

  def step(carry, _):
    v, state, terms = adam_step(grad_fn, opt, *carry, obs, bundle)
    return (v, state), terms

  (v, _), traces = jax.lax.scan(step, (v0, opt.init(v0)), None, length=num_steps)
  return v, traces


def _numeric(obs):
  """Keeps the array-valued entries of an observation dict (drops strings and other metadata)."""
  out = {}
  for k, x in obs.items():
    if isinstance(x, (str, bytes)):
      continue
    a = x if isinstance(x, jax.Array) else np.asarray(x)
    if a.dtype.kind in "fiub":
      out[k] = a
  return out


# What each built-in observation needs: key -> shape after the batch axis (None: any length).
_OBSERVATION_SHAPES = {
  "keypoints": {"keypoints": (None, 2), "frontal_K": (3, 3), "frontal_Rt": (3, 4)},
  "hmc": {"hmc": (3, None, None, 1), "hmc_K": (3, 3, 3), "hmc_Rt": (3, 3, 4)},
}
_CAMERA_KEYS = ("frontal_K", "frontal_Rt", "hmc_K", "hmc_Rt")


def check_observations(bundle, obs, cfg: FitConfig):
  """Rejects observations the fit cannot use, with a ``ValueError`` naming the key and frames.

  Checked: the keys and shapes each objective and the condition need, one batch size, finite
  cameras, headset crops in [0, 1] and sized like ``bundle.hmc_settings``, the keypoint count of
  the bundle. Non-finite keypoints and crop pixels are not errors: they are masked
  (``objectives.sanitize_keypoints``, ``objectives.mask_hmc``). Traced values are checked for
  shape only.
  """
  names = {spec[0] for spec in cfg.objectives if isinstance(spec[0], str)}
  if needs_condition(cfg) or cfg.init == "regressor":
    names.add(cfg.condition)
  sizes = {k: np.shape(x)[0] for k, x in obs.items() if np.ndim(x) > 0}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"fit: observations disagree on the batch size: {sizes}")
  for name in sorted(names & set(_OBSERVATION_SHAPES)):
    for key, want in _OBSERVATION_SHAPES[name].items():
      if key not in obs:
        raise ValueError(f"fit: input {name!r} needs observation {key!r}; got keys {sorted(obs)}")
      got = np.shape(obs[key])[1:]
      if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
        shape = ", ".join("*" if w is None else str(w) for w in want)
        raise ValueError(f"fit: observation {key!r} must be [B, {shape}], got {np.shape(obs[key])}")
  meta = getattr(bundle, "meta", None)
  ids = getattr(meta, "keypoint_vertex_ids", None)
  if "keypoints" in names and ids is not None and np.shape(obs["keypoints"])[1] != len(ids):
    raise ValueError(
      f"fit: {np.shape(obs['keypoints'])[1]} keypoints per frame, the model has {len(ids)}"
    )
  settings = getattr(bundle, "hmc_settings", None)
  if "hmc" in names and settings is not None:
    if tuple(np.shape(obs["hmc"])[2:4]) != tuple(settings.image_size):
      raise ValueError(
        f"fit: headset crops are {np.shape(obs['hmc'])[2:4]}, the bundle renders "
        f"{tuple(settings.image_size)} (bundle.hmc_settings.image_size)"
      )
  for key in _CAMERA_KEYS:
    if key in obs and not isinstance(obs[key], jax.core.Tracer):
      finite = np.isfinite(np.asarray(obs[key])).reshape(len(obs[key]), -1).all(-1)
      if not finite.all():
        raise ValueError(
          f"fit: camera {key!r} has non-finite values in frames {np.flatnonzero(~finite)[:10]}"
        )
  if "hmc" in obs and not isinstance(obs["hmc"], jax.core.Tracer):
    hmc = np.asarray(obs["hmc"], np.float32)
    fin = hmc[np.isfinite(hmc)]
    if fin.size and (fin.min() < 0 or fin.max() > 1):
      raise ValueError(
        f"fit: headset crops must be grey values in [0, 1] (NaN = missing pixel), got "
        f"[{fin.min():.4g}, {fin.max():.4g}]; uint8 crops: divide by 255"
      )


def initial_values(bundle, obs, cfg: FitConfig, z0=None):
  """Batched initial variables [B, Z] and codes [B, Z] for a (condition-augmented) observation
  batch."""
  to_z = jax.vmap(lambda v, o: to_code(bundle, cfg, v, o))
  flow_y = cfg.space == "y" and cfg.prior == "lipflow"
  if cfg.init == "prior_mode":
    if cfg.space == "y":
      return obs["prior_mu"], to_z(obs["prior_mu"], obs)
    if cfg.prior == "lipflow":
      f = lambda y, o: bundle_lib.flow_forward(bundle, y, o.get("prior_h"), cfg.condition)
      return None, jax.vmap(f)(obs["prior_mu"], obs)
    return None, obs["prior_mu"]
  if cfg.init == "zeros":
    if "prior_mu" in obs:
      shape = jnp.shape(obs["prior_mu"])
    elif z0 is not None:
      shape = jnp.shape(z0)
    elif bundle.latent_dim > 0:
      shape = (_batch_size(obs), bundle.latent_dim)
    else:
      raise ValueError("init='zeros' needs z0 (for the shape) or a bundle with latent_dim set")
    zeros = jnp.zeros(shape, jnp.float32)
    if flow_y:  # the origin of the base space, not f^-1(0)
      return zeros, to_z(zeros, obs)
    return zeros, zeros
  if cfg.init == "regressor":
    z_init = bundle_lib.regress(bundle, obs, cfg.condition)
  else:  # given
    if z0 is None:
      raise ValueError("init='given' needs z0")
    z_init = jnp.asarray(z0, jnp.float32)
  if flow_y:
    inv = lambda z, o: bundle_lib.flow_inverse(bundle, z, o.get("prior_h"), cfg.condition)[0]
    return jax.vmap(inv)(z_init, obs), z_init
  return z_init, z_init


def _batch_size(obs) -> int:
  return int(jax.tree_util.tree_leaves(obs)[0].shape[0])


def start_values(bundle, obs, cfg: FitConfig, z0=None):
  """(variables [B, Z] the optimisation starts from, initial codes [B, Z]) of a
  (condition-augmented) observation batch."""
  v0, z_init = initial_values(bundle, obs, cfg, z0)
  return (z_init if v0 is None else v0), z_init


def _fit_impl(bundle, obs, z0, cfg: FitConfig, lambda_prior=None):
  obs = objectives_lib.mask_hmc(obs)
  if needs_condition(cfg):
    obs = priors_lib.condition_stats(bundle, obs, cfg.condition)
  v0, z_init = start_values(bundle, obs, cfg, z0)
  to_z = jax.vmap(lambda v, o: to_code(bundle, cfg, v, o))

  if not cfg.sequence:
    v, traces = jax.vmap(lambda a, o: optimize_frame(a, o, bundle, cfg, lambda_prior=lambda_prior))(
      v0, obs
    )
    return FitResult(z=to_z(v, obs), y=v, losses=traces, init=z_init)

  # Sequence mode: frame 0 from its initial value, each later frame from the previous frame's
  # result.
  first = jax.tree_util.tree_map(lambda x: x[0], obs)
  rest = jax.tree_util.tree_map(lambda x: x[1:], obs)
  v_first, tr_first = optimize_frame(v0[0], first, bundle, cfg, lambda_prior=lambda_prior)
  warm = cfg.num_steps if cfg.warm_steps is None else cfg.warm_steps

  def frame(v_prev, o):
    v, tr = optimize_frame(v_prev, o, bundle, cfg, num_steps=warm, lambda_prior=lambda_prior)
    return v, (v, tr)

  _, (v_rest, tr_rest) = jax.lax.scan(frame, v_first, rest)
  v = jnp.concatenate([v_first[None], v_rest], axis=0)
  if (
    0 < warm < cfg.num_steps
  ):  # pad the shorter traces with their last value so that all have num_steps
    pad = lambda t: jnp.concatenate(
      [t, jnp.repeat(t[:, -1:], cfg.num_steps - warm, axis=1)], axis=1
    )
    tr_rest = jax.tree_util.tree_map(pad, tr_rest)
  traces = jax.tree_util.tree_map(
    lambda a, b: jnp.concatenate([a[None], b], axis=0), tr_first, tr_rest
  )
  return FitResult(z=to_z(v, obs), y=v, losses=traces, init=z_init)


# ``lambda_prior`` (a scalar array) overrides ``cfg.lambda_prior`` without a recompilation
# (prior-weight sweeps).
fit_jit = jax.jit(_fit_impl, static_argnames=("cfg",))


# pylint: disable=redefined-builtin
def fit_config(method: str = "lipflow", input: str = "keypoints", **overrides) -> FitConfig:
  """A ``FitConfig`` for a named method and input.

  Args:
    method: a fitted method of ``methods.METHODS`` ('dam_fit', 'lipflow_fit',
      'conditional_gaussian_fit'), or a prior of ``priors.PRIORS`` ('gaussian', 'lipflow',
      'conditional_gaussian', 'flow', 'none'), initialised at the prior's mode for conditional
      priors and at zeros otherwise.
    input: 'keypoints' or 'hmc' (the objective and the condition).
    **overrides: any ``FitConfig`` field, plus ``objective_options`` (a dict of options for the
      input's objective, e.g. ``{'robust': 'huber', 'scale': 2.0}``).
  """
  if method in methods_lib.FITTED:
    prior, init = methods_lib.METHODS[method].prior, methods_lib.METHODS[method].init
  elif method in priors_lib.PRIORS:
    prior, init = method, ("prior_mode" if method in priors_lib.CONDITIONAL else "zeros")
  else:
    raise ValueError(
      f"fit: unknown method {method!r}; one of {sorted(methods_lib.FITTED)} or a prior of "
      f"{sorted(priors_lib.PRIORS)}"
    )
  if input not in objectives_lib.OBJECTIVES:
    raise ValueError(f"fit: unknown input {input!r}; one of {sorted(objectives_lib.OBJECTIVES)}")
  options = tuple(sorted(dict(overrides.pop("objective_options", None) or {}).items()))
  kwargs = dict(objectives=((input, 1.0, options),), prior=prior, condition=input, init=init)
  kwargs.update(overrides)
  return FitConfig(**kwargs)


def fit_latents(
  bundle,
  observations,
  method: str = "lipflow",
  input: str = "keypoints",
  z0=None,  # pylint: disable=redefined-builtin
  config: Optional[FitConfig] = None,
  **overrides,
) -> FitResult:
  """Fits latent codes to a batch of observations (one jitted call).

  Args:
    bundle: ``ModelBundle`` (see ``load_fitter``).
    observations: dict of [B, ...] arrays with the data batch keys the objective needs (see
      ``objectives``); other keys are ignored.
    method: see ``fit_config``; ignored when ``config`` is given.
    input: 'keypoints' or 'hmc'.
    z0: [B, Z] initial codes for ``init='given'``.
    config: a full ``FitConfig`` (overrides ``method``, ``input`` and ``overrides``).
    **overrides: ``FitConfig`` fields, e.g. ``num_steps=200, lr=0.05, lambda_prior=0.1, space='y'``.
  Returns:
    ``FitResult`` with ``z`` [B, Z] and loss traces [B, num_steps].
  Raises:
    ValueError: observations the fit cannot use (``check_observations``). Missing data is not an
      error: NaN keypoints count as invisible and NaN headset-crop pixels are masked.
  """
  cfg = config if config is not None else fit_config(method, input, **overrides)
  obs = _numeric(observations)
  check_observations(bundle, obs, cfg)
  return fit_jit(bundle, obs, z0, cfg)


def fit_unjitted(bundle, observations, cfg: FitConfig, z0=None) -> FitResult:
  """The same optimisation frame by frame and step by step, without jit (a slow reference and
  benchmark)."""
  obs = _numeric(observations)
  check_observations(bundle, obs, cfg)
  obs = objectives_lib.mask_hmc(jax.tree_util.tree_map(jnp.asarray, obs))
  if needs_condition(cfg):
    obs = priors_lib.condition_stats(bundle, obs, cfg.condition)
  v0, z_init = start_values(bundle, obs, cfg, z0)
  grad_fn = jax.value_and_grad(make_loss(cfg), has_aux=True)
  vs, zs, traces = [], [], []
  n = v0.shape[0]
  v_prev = None
  for i in range(n):
    o = jax.tree_util.tree_map(lambda x: x[i], obs)
    steps = (
      cfg.num_steps if (not cfg.sequence or i == 0 or cfg.warm_steps is None) else cfg.warm_steps
    )
    opt = _optimizer(cfg, steps)
    v = v0[i] if (not cfg.sequence or i == 0) else v_prev
    state = opt.init(v)
    tr = {"total": [], "obs": [], "prior": []}
    for _ in range(steps):
      v, state, terms = adam_step(grad_fn, opt, v, state, o, bundle)
      for k, x in terms.items():
        tr[k].append(x)
    v_prev = v
    vs.append(v)
    zs.append(to_code(bundle, cfg, v, o))
    traces.append({k: jnp.stack(t) if t else jnp.zeros((0,)) for k, t in tr.items()})
  if cfg.sequence and cfg.warm_steps is not None and cfg.warm_steps < cfg.num_steps:
    traces = [
      {
        k: jnp.concatenate([t, jnp.repeat(t[-1:], cfg.num_steps - t.shape[0])])
        for k, t in tr.items()
      }
      for tr in traces
    ]
  stacked = {k: jnp.stack([t[k] for t in traces]) for k in traces[0]}
  return FitResult(z=jnp.stack(zs), y=jnp.stack(vs), losses=stacked, init=z_init)
