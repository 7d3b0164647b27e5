"""Samples from the latent priors, decoded and rendered: DAM's N(0, I) vs the flow prior, and the
conditional LiP-Flow prior given one frame's inference-time signal."""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lipflow_jax import fit
from lipflow_jax.evaluate import evaluation, figures


def prior_samples(
  bundle, rng, num_samples: int, batch: Optional[Dict[str, Any]] = None, name: Optional[str] = None
):
  """z ~ the bundle's prior.

  Args:
    bundle: ``fit.ModelBundle``; prior 'gaussian' samples N(0, I), the others call the model's
      ``prior_sample`` (unconditional priors need no batch; conditional ones read ``batch`` of one
      frame).
    rng: PRNG key.
    num_samples: n.
    batch: condition batch of one frame ([1, ...] arrays) for conditional priors.
    name: the condition name.
  Returns:
    [n, Z] codes.
  """
  if bundle.prior == "gaussian":
    return jax.random.normal(rng, (num_samples, bundle.latent_dim), jnp.float32)
  if batch is None:
    batch = {"view": jnp.zeros((1, 3), jnp.float32)}
  return _sample_jit(bundle, rng, batch, name, num_samples)


@functools.partial(jax.jit, static_argnames=("name", "num_samples"))
def _sample_jit(bundle, rng, batch, name, num_samples):
  z = bundle.model.apply(bundle.variables, rng, batch, name, num_samples, method="prior_sample")
  return z[:, 0]


@functools.partial(jax.jit, static_argnames=("name",))
def _mode_jit(bundle, batch, name):
  return bundle.model.apply(bundle.variables, batch, name, method="prior_mode")


def render_codes(bundle, z, K, Rt, settings) -> np.ndarray:
  """[n, Z] codes rendered into one camera (K [3, 3], Rt [3, 4]) -> [n, H, W, 3] numpy in [0, 1]."""
  # Through the host: a code committed to a device (a jitted function's output) and one that is
  # not (an eager sample) are different keys of render_frames' compilation cache.
  z = jnp.asarray(np.asarray(z))
  n = z.shape[0]
  Ks = jnp.broadcast_to(jnp.asarray(K), (n, 1, 3, 3))
  Rts = jnp.broadcast_to(jnp.asarray(Rt), (n, 1, 3, 4))
  rgb, _ = evaluation.render_frames(fit.decoder_only(bundle), z, Ks, Rts, settings)
  return np.asarray(rgb[:, 0])


def random_samples_figure(
  bundles: Dict[str, Any],
  rng,
  num_samples: int,
  K,
  Rt,
  settings,
  path: str,
  temperature: float = 1.0,
) -> str:
  """One row per bundle (e.g. {'DAM N(0, I)': dam, 'flow prior': flow}) of decoded random samples
  (PNG)."""
  rows, labels = [], []
  for label, bundle in bundles.items():
    z = (
      prior_samples(bundle, rng, num_samples)
      if temperature == 1.0
      else _tempered(bundle, rng, num_samples, temperature)
    )
    rows.append(list(render_codes(bundle, z, K, Rt, settings)))
    labels.append(label)
  return figures.save_png(figures.grid(rows, labels, title="Random samples from the prior"), path)


def _tempered(bundle, rng, n, t):
  if bundle.prior == "gaussian":
    return t * jax.random.normal(rng, (n, bundle.latent_dim), jnp.float32)
  eps = t * jax.random.normal(rng, (n, bundle.latent_dim), jnp.float32)
  return jax.jit(lambda b, e: b.model.apply(b.variables, e, None, None, method="flow_forward")[0])(
    bundle, eps
  )


def conditional_samples_figure(
  bundle,
  rng,
  frame: Dict[str, Any],
  name: str,
  num_samples: int,
  K,
  Rt,
  settings,
  path: str,
  ground_truth=None,
  target=None,
) -> str:
  """Samples of the conditional prior p(z | c) of one frame, rendered beside its target and ground
  truth.

  Args:
    frame: the frame's condition batch ([1, ...] arrays).
    ground_truth: optional [H, W, 3] image of the frame in this camera; target: optional image of c.
  """
  # The mode plus num_samples - 1 samples: num_samples renders (the same compiled shape as the
  # random samples).
  z = prior_samples(
    bundle, rng, max(num_samples - 1, 1), {k: jnp.asarray(v) for k, v in frame.items()}, name
  )
  mode = _mode_jit(bundle, {k: jnp.asarray(v) for k, v in frame.items()}, name)
  imgs = render_codes(bundle, jnp.concatenate([mode, z]), K, Rt, settings)
  row, cols = [], []
  if target is not None:
    row.append(target)
    cols.append("target")
  if ground_truth is not None:
    row.append(ground_truth)
    cols.append("ground truth")
  row += list(imgs)
  cols += ["mode f(mu_c)"] + [f"sample {i + 1}" for i in range(len(imgs) - 1)]
  return figures.save_png(
    figures.grid([row], col_labels=cols, title=f"Conditional prior p(z | {name})"), path
  )
