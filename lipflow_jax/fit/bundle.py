"""What fitting needs from a trained model: the module, its variables and the mesh/normalisation
constants.

A ``ModelBundle`` is a pytree (variables and constants are leaves; modules and render settings are
static), so it is passed *into* jitted functions instead of being baked into them as constants.
Objectives and priors receive the bundle as their "model parts" and reach the model only through the
small functions below, which follow the ``LipFlowModel`` method protocol (``decode``,
``encode_condition``, ``flow_forward``, ``flow_inverse``) with a batch axis of one. Any Flax module
implementing the methods a given objective or prior uses can stand in (the tests use a small random
decoder).
"""

from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lipflow_jax import geometry, models
from lipflow_jax.data import schema


@flax.struct.dataclass
class ModelBundle:
  """A trained model ready for fitting.

  Attributes:
    model: the Flax module (static), e.g. ``lipflow_jax.models.LipFlowModel``.
    variables: its variables (``{'params': ...}``).
    meta: ``lipflow_jax.data.MeshMeta``.
    hmc_settings: ``lipflow_jax.render.RasterSettings`` for rendering into the HMC cameras (static;
      None if HMC fitting is not used).
    regressors: optional static tuple of (condition name, module) pairs, each module mapping a
      condition batch to codes (``lipflow_jax.models.Regressor``), used for ``init='regressor'``;
      ``regressor_variables`` a dict {condition name: variables}.
    prior: the model's prior type ('gaussian', 'conditional_gaussian', 'lipflow', 'flow'), static.
    latent_dim: Z, static.
  """

  model: Any = flax.struct.field(pytree_node=False)
  variables: Any
  meta: schema.MeshMeta
  hmc_settings: Any = flax.struct.field(pytree_node=False, default=None)
  regressors: Tuple[Tuple[str, Any], ...] = flax.struct.field(pytree_node=False, default=())
  regressor_variables: Any = None
  prior: str = flax.struct.field(pytree_node=False, default="gaussian")
  latent_dim: int = flax.struct.field(pytree_node=False, default=0)


def _one(x):
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], x)


def decode(bundle: ModelBundle, z, view, camera_index=None):
  """Decodes one code. z: [Z], view: [3], camera_index: [] int (dome camera colour response) or None
  -> (texture [T, T, 3] normalised, verts [V, 3] normalised)."""
  if camera_index is None:
    tex, verts = bundle.model.apply(bundle.variables, z[None], view[None], method="decode")
  else:
    tex, verts = bundle.model.apply(
      bundle.variables, z[None], view[None], jnp.reshape(camera_index, (1,)), method="decode"
    )
  return tex[0], verts[0]


def decode_verts(bundle: ModelBundle, z, view=None):
  """[Z] -> [V, 3] de-normalised vertices (the texture branch is dead code under jit and is
  removed)."""
  if view is None:
    view = jnp.array([0.0, 0.0, 1.0], z.dtype)
  _, verts = decode(bundle, z, view)
  return schema.denormalize_verts(verts, bundle.meta)


def decode_keypoint_verts(bundle: ModelBundle, z):
  """[Z] -> [P, 3] de-normalised keypoint vertices (``meta.keypoint_vertex_ids``). For a
  ``LipFlowModel`` only their columns of the decoder's vertex layer are computed (equal to slicing
  ``decode_verts``); other models decode every vertex."""
  ids = bundle.meta.keypoint_vertex_ids
  params = bundle.variables.get("params", {}) if isinstance(bundle.variables, dict) else {}
  if not isinstance(bundle.model, models.LipFlowModel) or "decoder" not in params:
    return decode_verts(bundle, z)[ids]
  decoder = models.decoder_of(bundle.model)
  verts = models.decode_vertex_subset(decoder, params["decoder"], z[None], ids)[0]
  std = jnp.asarray(bundle.meta.vert_std)
  return verts * (std[ids] if std.ndim == 2 else std) + bundle.meta.vert_mean[ids]


def render_views(bundle: ModelBundle, z, K, Rt, settings, camera_index=None):
  """Decodes one code for each view (its view direction and colour response) and renders it there.

  Args:
    bundle: ``ModelBundle``.
    z: [Z]; K: [C, 3, 3]; Rt: [C, 3, 4] (head coordinates -> camera).
    settings: ``render.RasterSettings`` (static).
    camera_index: optional [C] int32 dome camera indices (the decoder's per-camera colour
      gain/bias).
  Returns:
    ``render.Rendered`` with a leading view axis (rgb [C, H, W, 3] in [0, 1], alpha [C, H, W, 1],
    ...).
  """

  def one(k, rt, ci):
    camera = geometry.Camera(K=k, Rt=rt)
    tex, verts = decode(bundle, z, geometry.view_direction(camera), ci)
    return models.render_avatar(
      bundle.meta, verts, schema.denormalize_tex(tex, bundle.meta), camera, settings
    )

  if camera_index is None:
    return jax.vmap(lambda k, rt: one(k, rt, None))(K, Rt)
  return jax.vmap(one)(K, Rt, camera_index)


def encode_condition(bundle: ModelBundle, obs, name: str):
  """Batched conditional prior stats. obs: dict of [B, ...] -> (mu [B, Z], logstd [B, Z], h [B,
  H] or None)."""
  return bundle.model.apply(bundle.variables, obs, name, method="encode_condition")


def flow_forward(bundle: ModelBundle, y, h, name: str):
  """z = f(y | h) for one code. y: [Z], h: [H] or None -> [Z]."""
  hb = None if h is None else h[None]
  out = bundle.model.apply(bundle.variables, y[None], hb, name, method="flow_forward")
  if isinstance(out, tuple):  # (z, logdet) variants
    out = out[0]
  return out[0]


def flow_inverse(bundle: ModelBundle, z, h, name: str):
  """(y, log|det d f^-1 / dz|) for one code. z: [Z] -> ([Z], [])."""
  hb = None if h is None else h[None]
  y, logdet = bundle.model.apply(bundle.variables, z[None], hb, name, method="flow_inverse")
  return y[0], jnp.reshape(logdet, (-1,))[0]


def regress(bundle: ModelBundle, obs, name: str):
  """Regressor codes for a batch: obs dict of [B, ...] -> [B, Z]."""
  modules = dict(bundle.regressors)
  if name not in modules:
    raise ValueError(
      f"init='regressor' needs a regressor for {name!r} in the bundle; it has "
      f"{sorted(modules)} (see load_fitter(..., regressor_workdirs=))"
    )
  return modules[name].apply(bundle.regressor_variables[name], obs)


def prior_mode(bundle: ModelBundle, obs, name: str):
  """Batched prior mode: f(mu_c) (lipflow), mu_c (conditional Gaussian), f(0) (flow), 0
  (gaussian); [B, Z]."""
  return bundle.model.apply(bundle.variables, obs, name, method="prior_mode")


_DECODER_FIELDS = (
  "num_vertices",
  "z_dim",
  "tex_size",
  "dec_z_features",
  "dec_view_features",
  "dec_start_size",
  "dec_start_channels",
  "dec_channels",
  "dec_upsample",
  "dec_untied_bias",
  "num_cameras",
  "weight_norm",
)


def decoder_only(bundle: ModelBundle) -> ModelBundle:
  """The same decoder without the encoders, flows and regressors.

  Models that differ only in their prior or encoder (DAM, LiP-Flow, conditional Gaussian, direct
  encoders) then share one static module and one variables structure, so jitted decode-and-render
  functions compile once for all of them. Bundles whose model is not a ``LipFlowModel`` are returned
  unchanged.
  """
  model = bundle.model
  params = bundle.variables.get("params", {}) if isinstance(bundle.variables, dict) else {}
  if not isinstance(model, models.LipFlowModel) or "decoder" not in params:
    return bundle
  fields = {f: getattr(model, f) for f in _DECODER_FIELDS}
  fields["dec_channels"] = tuple(fields["dec_channels"])
  canonical = models.LipFlowModel(prior="gaussian", conditions=(), encoder_input="x", **fields)
  return ModelBundle(
    model=canonical,
    variables={"params": {"decoder": params["decoder"]}},
    meta=bundle.meta,
    hmc_settings=bundle.hmc_settings,
    prior="gaussian",
    latent_dim=bundle.latent_dim,
  )


class MeanDecoder(nn.Module):
  """A decoder without parameters that returns the training means (zeros, normalised) for any
  code: the ``mean_mesh`` reference of the report."""

  num_vertices: int
  tex_size: int

  def decode(self, z, view, camera_index=None):
    """z [B, Z], view [B, 3] -> (tex [B, T, T, 3], verts [B, V, 3]), all zeros (= the means)."""
    del view, camera_index
    b = z.shape[0]
    zeros = jnp.zeros((b, self.tex_size, self.tex_size, 3), z.dtype)
    return zeros, jnp.zeros((b, self.num_vertices, 3), z.dtype)


def mean_bundle(meta: schema.MeshMeta, hmc_settings=None) -> ModelBundle:
  """A bundle whose decoder returns the training-mean mesh and texture (latent size 1)."""
  model = MeanDecoder(
    num_vertices=int(meta.vert_mean.shape[0]), tex_size=int(meta.tex_mean.shape[0])
  )
  return ModelBundle(model=model, variables={}, meta=meta, hmc_settings=hmc_settings, latent_dim=1)
