"""Evaluation of latent codes on held-out frames: decode, render into every held-out dome view,
compare.

An *evaluation set* is a dict of numpy arrays over N held-out frames (see ``lipflow_jax.data``'s
eval helper):

  observations (fitting inputs): keypoints [N, P, 2], keypoints_visible [N, P], frontal_K [N, 3, 3],
      frontal_Rt [N, 3, 4], hmc [N, 3, h, w, 1], hmc_K [N, 3, 3, 3], hmc_Rt [N, 3, 3, 4]
  ground truth: verts [N, V, 3] (normalised), camera_K [N, C, 3, 3], camera_Rt [N, C, 3, 4] (head ->
    view),
      image [N, C, H, W, 3] in [0, 1], image_mask [N, C, H, W, 1]
  identity:  segment_index [N], frame_index [N]

Methods produce codes for the N frames (and the bundle whose decoder reads them); ``evaluate_codes``
turns codes into per-frame metrics, ``summarize`` into a report row.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lipflow_jax import data, fit, render
from lipflow_jax.evaluate import metrics, stats
from lipflow_jax.evaluate import report as report_lib

OBSERVATION_KEYS = (
  "keypoints",
  "keypoints_visible",
  "frontal_K",
  "frontal_Rt",
  "hmc",
  "hmc_K",
  "hmc_Rt",
  "hmc_mask",
  "image_frontal",
)


def observations(eval_set: Dict[str, Any]) -> Dict[str, np.ndarray]:
  """The fitting inputs of an evaluation set (a dict of [N, ...] arrays)."""
  return {k: eval_set[k] for k in OBSERVATION_KEYS if k in eval_set}


def take(eval_set: Dict[str, Any], index) -> Dict[str, Any]:
  """The frames ``index`` (slice or index array) of every [N, ...] entry."""
  return {
    k: (v[index] if hasattr(v, "shape") and np.ndim(v) > 0 else v) for k, v in eval_set.items()
  }


# ----------------------------------------------------------------------------------------------
# rendering
@functools.partial(jax.jit, static_argnames=("settings",))
def render_frames(bundle, z, K, Rt, settings, camera_index=None):
  """Each frame's code rendered into its views (``fit.render_views`` over frames), jitted (one
  compilation per shape and settings; a call outside jit would dispatch the renderer's switches
  one by one, each compiled on its own).

  Args:
    bundle: ``fit.ModelBundle``; z: [N, Z]; K: [N, C, 3, 3]; Rt: [N, C, 3, 4]; settings:
      ``RasterSettings``;
    camera_index: optional [N, C] dome camera indices.
  Returns:
    (rgb [N, C, H, W, 3] in [0, 1], alpha [N, C, H, W, 1]).
  """
  if camera_index is None:
    out = jax.vmap(lambda a, k, r: fit.render_views(bundle, a, k, r, settings))(z, K, Rt)
  else:
    out = jax.vmap(lambda a, k, r, c: fit.render_views(bundle, a, k, r, settings, c))(
      z, K, Rt, camera_index
    )
  return out.rgb, out.alpha


@jax.jit
def geometry_errors(bundle, z, verts_gt):
  """[N] mean per-vertex distance (dataset units) of the meshes decoded from z [N, Z] to
  ``verts_gt`` [N, V, 3] (normalised, as stored)."""
  verts = jax.vmap(lambda a: fit.decode_verts(bundle, a))(z)
  return metrics.geometry_error(verts, data.denormalize_verts(verts_gt, bundle.meta))


@functools.partial(jax.jit, static_argnames=("settings",))
def _frame_metrics(bundle, z, verts_gt, K, Rt, camera_index, image, mask, settings):
  geo = geometry_errors(bundle, z, verts_gt)
  rgb, _ = render_frames(bundle, z, K, Rt, settings, camera_index)
  m = metrics.image_metrics(rgb, image, mask)  # each [N, C]
  return {"geometry_error": geo, "image_mse": m["mse"], "psnr": m["psnr"], "ssim": m["ssim"]}, rgb


def eval_settings(image_size) -> render.RasterSettings:
  """Hard rasterisation of the dome views (H, W), as the synthetic capture renders its ground
  truth."""
  return render.RasterSettings.hard(
    tuple(image_size), tile_size=4, max_faces_per_tile=128, cull_backfaces=True
  )


def evaluate_codes(
  bundle, z, eval_set: Dict[str, Any], settings, chunk: int = 8, keep_images: Sequence[int] = ()
) -> Dict[str, np.ndarray]:
  """Per-frame metrics of codes on an evaluation set.

  Args:
    bundle: the bundle whose decoder reads ``z``.
    z: [N, Z] codes.
    eval_set: see the module docstring.
    settings: ``render.RasterSettings`` of the dome views.
    chunk: frames rendered per call (bounds memory).
    keep_images: frame indices whose renders are returned (for figures).
  Returns:
    dict of numpy arrays: geometry_error [N]; image_mse, psnr, ssim [N, C] (per view; NaN for a view
    whose ``image_mask`` is empty: nothing to compare, and the masked metrics would read as a
    perfect match); with ``keep_images`` also images [len(keep_images), C, H, W, 3].
  """
  bundle = fit.decoder_only(bundle)  # one compilation for every model with this decoder
  n = z.shape[0]
  outs, kept = [], {}
  keep = set(int(i) for i in keep_images)
  for s in range(0, n, chunk):
    e = slice(s, min(n, s + chunk))
    pad = chunk - (e.stop - e.start)  # pad the last chunk to the chunk size: one compiled shape
    sel = lambda x: np.concatenate([x[e], np.repeat(x[e][-1:], pad, axis=0)]) if pad else x[e]
    out = _frame_metrics(
      bundle,
      jnp.asarray(sel(np.asarray(z))),
      sel(eval_set["verts"]),
      sel(eval_set["camera_K"]),
      sel(eval_set["camera_Rt"]),
      sel(eval_set["camera_index"]),
      sel(eval_set["image"]),
      sel(eval_set["image_mask"]),
      settings,
    )
    out, rgb = out
    outs.append({k: np.asarray(v)[: chunk - pad] for k, v in out.items()})
    for i in range(e.start, e.stop):
      if i in keep:
        kept[i] = np.asarray(rgb[i - e.start])
  result = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  empty = ~np.any(np.asarray(eval_set["image_mask"]) > 0, axis=(-3, -2, -1))  # [N, C]
  for k in ("image_mse", "psnr", "ssim"):
    result[k] = np.where(empty, np.nan, result[k])
  if len(keep_images):
    result["images"] = np.stack([kept[int(i)] for i in keep_images])
  return result


def summarize(
  method: str, input: str, per_frame: Dict[str, np.ndarray], seconds: float
) -> Dict[str, Any]:  # pylint: disable=redefined-builtin
  """One report row: means over frames (and views) of the per-frame metrics (PSNR is the mean
  per-view PSNR), with 95% bootstrap intervals over frames of geometry error and image MSE. Views
  without a metric (NaN: an empty mask) do not count; NaN if none has one."""
  n = int(per_frame["geometry_error"].shape[0])

  def mean(x):
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(np.mean(x)) if x.size else float("nan")

  return report_lib.make_row(
    method,
    input,
    mean(per_frame["geometry_error"]),
    mean(per_frame["image_mse"]),
    mean(per_frame["psnr"]),
    mean(per_frame["ssim"]),
    1000.0 * seconds / max(n, 1),
    n,
    geometry_error_ci=stats.bootstrap_ci(per_frame["geometry_error"]),
    image_mse_ci=stats.bootstrap_ci(per_frame["image_mse"]),
  )


# -----------------------------------------------------------------------------------------------
# methods
@dataclasses.dataclass
class MethodOutput:
  """Codes of one method on N frames: z [N, Z], the bundle that decodes them, and the wall time
  (seconds) of producing them (compilation excluded)."""

  z: np.ndarray
  bundle: Any
  seconds: float
  losses: Optional[Dict[str, np.ndarray]] = None


_COMPILED: Dict[Any, Any] = {}


def timed_call(fn: Callable, *args, cache_key=None):
  """Compiles ``fn`` (a jitted function) ahead of time, then times one execution. Returns (out,
  seconds).

  With a hashable ``cache_key`` that determines ``fn``, the executable is kept and reused for
  arguments of the same structure, shapes and dtypes (``jit(...).lower().compile()`` alone compiles
  again every time).
  """
  leaves, treedef = jax.tree_util.tree_flatten(args)
  key = (
    None
    if cache_key is None
    else (cache_key, treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
  )
  compiled = _COMPILED.get(key) if key is not None else None
  if compiled is None:
    compiled = fn.lower(*args).compile()
    if key is not None:
      _COMPILED[key] = compiled
  t0 = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  return out, time.perf_counter() - t0


@jax.jit
def _encode_direct(bundle, obs):
  return bundle.model.apply(bundle.variables, obs, method="encode_input")[0]


def _regress_jit(name):
  return jax.jit(lambda bundle, obs: fit.regress(bundle, obs, name))


def _mode_jit(name):
  return jax.jit(lambda bundle, obs: fit.prior_mode(bundle, obs, name))


def run_method(
  method: str,
  input: str,
  bundles: Dict[str, Any],
  obs: Dict[str, np.ndarray],  # pylint: disable=redefined-builtin
  fit_options: Optional[Dict[str, Any]] = None,
) -> MethodOutput:
  """Codes of a method of ``fit.METHODS`` for an input on a batch of observations.

  Args:
    method: a key of ``fit.METHODS``.
    input: 'keypoints' or 'hmc'.
    bundles: {model name of the method table ('dam', 'lipflow', 'conditional_gaussian',
      'direct_keypoints', 'direct_hmc', 'mean')} -> ModelBundle (the 'dam' bundle carries the
      regressors; 'mean' is ``fit.mean_bundle``).
    obs: fitting inputs [N, ...].
    fit_options: ``fit.fit_config`` overrides for a fitted method (num_steps, lr, lambda_prior,
      ...).
  """
  spec = fit.METHODS[method]
  bundle = bundles[spec.model_for(input)]
  obs = {k: jnp.asarray(v) for k, v in obs.items()}
  if spec.fitted:
    options = dict(fit_options or {})
    # The prior weight is a traced argument: fits that differ only in it share one compilation.
    lambda_prior = jnp.float32(options.pop("lambda_prior", fit.FitConfig.lambda_prior))
    cfg = fit.fit_config(method, input, **options)
    z0 = None
    if cfg.init == "zeros":
      z0 = jnp.zeros((next(iter(obs.values())).shape[0], bundle.latent_dim), jnp.float32)
    fn = jax.jit(lambda b, o, z, lam: fit.fit_jit(b, o, z, cfg, lam))
    res, sec = timed_call(fn, bundle, obs, z0, lambda_prior, cache_key=("fit", cfg))
    return MethodOutput(
      np.asarray(res.z), bundle, sec, {k: np.asarray(v) for k, v in res.losses.items()}
    )
  if spec.codes == "regressor":
    z, sec = timed_call(_regress_jit(input), bundle, obs)
  elif spec.codes == "direct":
    z, sec = timed_call(_encode_direct, bundle, obs)
  elif spec.codes == "mean":  # no input: one dummy coordinate per frame
    z, sec = np.zeros((next(iter(obs.values())).shape[0], 1), np.float32), 0.0
  else:  # prior_mode
    z, sec = timed_call(_mode_jit(input), bundle, obs)
  return MethodOutput(np.asarray(z), bundle, sec)


# -------------------------------------------------------------------------------------------
# evaluation set
def select_frames(frame_index: np.ndarray, max_frames: Optional[int]) -> np.ndarray:
  """Up to ``max_frames`` distinct frame ids of a split, spread evenly over it (sorted)."""
  frames = np.unique(np.asarray(frame_index))
  if max_frames is None or max_frames >= len(frames):
    return frames
  pick = np.round(np.linspace(0, len(frames) - 1, max_frames)).astype(int)
  return frames[np.unique(pick)]


def load_eval_set(
  source,
  meta,
  split: str = "test",
  frames: Optional[Sequence[int]] = None,
  max_frames: Optional[int] = None,
  view_stride: int = 1,
  cameras: Optional[Sequence[str]] = None,
) -> Dict[str, np.ndarray]:
  """Held-out frames with every dome view (``lipflow_jax.data.load_frames``), frames spread over the
  split.

  Args:
    source: data source of the split; meta: ``DatasetMeta``.
    frames: global frame ids (default: ``select_frames(split frames, max_frames)``).
    view_stride: keep every n-th dome camera (1 = all); cameras: explicit camera names instead.
  Returns:
    The evaluation set (see the module docstring), numpy, batch form.
  """
  if frames is None:
    frames = select_frames(meta.splits[split]["frame_index"], max_frames)
  if cameras is None:
    cameras = list(meta.camera_names)[:: max(1, int(view_stride))]
  return data.load_frames(
    source, meta, split=split, cameras=list(cameras), frames=[int(f) for f in frames]
  )
