"""What a run trains: the model, its parameter initialiser, loss and image summaries, built from plain values.

A ``Task`` is everything the train loop needs to know about a model:

  init_params(rng, batch) -> params
  loss_fn(params, frozen, batch, rng) -> (loss [], metrics {name: []})
  images_fn(params, frozen, batch) -> {name: [H, W, 3] in [0, 1]}   (first example of the batch)
  frozen: a pytree of fixed arrays the loss reads (the DAM teacher of the regressor), passed to the jitted
    step as an argument rather than baked into it as constants.

Kinds: 'lipflow' (``LipFlowModel``: DAM, LiP-Flow, conditional Gaussian, flow prior, direct encoder) and
'regressor' (one ``Regressor`` per condition, trained to the frozen DAM posterior mean of a teacher workdir).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lipflow_jax import models

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Task:
  """See the module docstring; ``model`` is the Flax module (or {condition: module}) that was built."""
  model: Any
  init_params: Callable[[jax.Array, dict], PyTree]
  loss_fn: Callable[[PyTree, PyTree, dict, jax.Array], tuple]
  images_fn: Optional[Callable[[PyTree, PyTree, dict], dict]] = None
  frozen: PyTree = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------ augmentation
def augment_keypoints(batch: Mapping[str, Any], rng, noise_px: float = 0.0, dropout: float = 0.0) -> dict:
  """Fresh detector noise on the run-time keypoints of a training batch.

  Every (frame, camera) example of a frame carries the same keypoints, so without augmentation a keypoint
  encoder sees one noisy detection per frame and can memorise it. Adds N(0, noise_px^2) pixels to
  ``keypoints`` [B, P, 2] and marks each keypoint invisible in ``keypoints_visible`` [B, P] with probability
  ``dropout``; other entries are returned unchanged. A no-op for batches without keypoints.
  """
  if 'keypoints' not in batch or (noise_px <= 0 and dropout <= 0):
    return dict(batch)
  k_noise, k_drop = jax.random.split(rng)
  out = dict(batch)
  kp = batch['keypoints']
  out['keypoints'] = kp + noise_px * jax.random.normal(k_noise, kp.shape, kp.dtype)
  if dropout > 0 and 'keypoints_visible' in batch:
    vis = batch['keypoints_visible']
    keep = jax.random.bernoulli(k_drop, 1.0 - dropout, vis.shape)
    out['keypoints_visible'] = jnp.where(keep, vis, jnp.zeros_like(vis))
  return out


def with_keypoint_augmentation(task: Task, noise_px: float, dropout: float) -> Task:
  """The task with ``augment_keypoints`` applied to every training batch (not to image summaries)."""
  if noise_px < 0 or not 0 <= dropout < 1:
    raise ValueError(f'keypoint augmentation needs noise_px >= 0 and 0 <= dropout < 1, got {noise_px}, {dropout}')
  if noise_px == 0 and dropout == 0:
    return task
  loss_fn = task.loss_fn

  def augmented_loss_fn(params, frozen, batch, rng):
    rng, k = jax.random.split(rng)
    return loss_fn(params, frozen, augment_keypoints(batch, k, noise_px, dropout), rng)

  return dataclasses.replace(task, loss_fn=augmented_loss_fn)


# ------------------------------------------------------------------------------------ sizes from data
def _meta_get(meta, *names, default=None):
  for n in names:
    if meta is not None and hasattr(meta, n) and getattr(meta, n) is not None:
      return getattr(meta, n)
    if isinstance(meta, Mapping) and meta.get(n) is not None:
      return meta[n]
  return default


def data_sizes(example: Mapping[str, np.ndarray], meta=None) -> dict:
  """Model sizes implied by a batch (``[B, ...]`` arrays) and the dataset's ``DatasetMeta``.

  Returns {num_vertices, tex_size, keypoint_image_size (the frontal camera's (H, W)), num_cameras} (the last
  two None / 0 without ``meta``).
  """
  sizes = dict(num_vertices=int(example['verts'].shape[-2]), tex_size=int(example['avg_tex'].shape[-2]))
  kp_size = _meta_get(meta, 'frontal_size')  # the keypoints' pixel frame
  sizes['keypoint_image_size'] = None if kp_size is None else tuple(int(s) for s in kp_size)
  cameras = _meta_get(meta, 'camera_names')  # the decoder's per-camera colour gain and bias
  sizes['num_cameras'] = 0 if cameras is None else len(cameras)
  return sizes


def tex_to_rgb(tex, meta=None):
  """Normalised texture [..., T, T, 3] -> [0, 1] colours, with the dataset's mean/std when known."""
  tex_mean = _meta_get(meta, 'tex_mean')
  tex_std = _meta_get(meta, 'tex_std')
  if tex_mean is None or tex_std is None:
    return jnp.clip(0.5 + 0.25 * tex, 0.0, 1.0)
  tex_mean = jnp.asarray(np.asarray(tex_mean, np.float32))
  if tex_mean.shape[-3:-1] != tex.shape[-3:-1]:
    tex_mean = jax.image.resize(tex_mean, tex.shape[-3:-1] + tex_mean.shape[-1:], 'linear')
  return jnp.clip((tex * jnp.asarray(np.asarray(tex_std, np.float32)) + tex_mean) / 255.0, 0.0, 1.0)


# ------------------------------------------------------------------------------------ LipFlowModel
def build_model(model_config: Mapping[str, Any], sizes: Mapping[str, Any]) -> models.LipFlowModel:
  """``LipFlowModel`` from the config's model fields; None fields are filled from ``sizes``."""
  kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(model_config).items()}
  for k, v in sizes.items():
    if kwargs.get(k) is None:
      kwargs[k] = v
  needs_kp = (kwargs.get('prior') in models.CONDITIONAL_PRIORS and 'keypoints' in kwargs.get('conditions', ())
              ) or kwargs.get('encoder_input') == 'keypoints'
  if not needs_kp and kwargs.get('keypoint_image_size') is None:
    kwargs.pop('keypoint_image_size', None)
  return models.LipFlowModel(**kwargs)


def lipflow_task(model: models.LipFlowModel, *, loss_weights: Mapping[str, float], meta=None,
                 render_images: bool = True, render_max_size: int = 256,
                 screen_settings: Optional[Mapping[str, Any]] = None) -> Task:
  """Task of a ``LipFlowModel`` trained with ``models.model_loss``.

  With a 'screen' loss weight > 0 the loss adds ``weight * screen_loss`` (the decoded avatar soft-rendered into
  each example's camera at the photo's size, masked MSE against the photo); this needs the dataset's mesh
  topology in ``meta``. ``screen_settings`` overrides ``SCREEN_RASTER_DEFAULTS`` (``RasterSettings`` fields).

  Image summaries (first example of the batch, z = posterior mean): the decoded texture beside the target
  (unobserved texels black), and with ``render_images`` (needs the dataset's mesh topology in ``meta``) the
  decoded avatar rendered into the example's camera beside its photo, at most ``render_max_size`` pixels high.
  """
  weights = dict(loss_weights)
  renderer = _make_renderer(meta, render_max_size) if render_images else None
  screen_loss_fn = None
  screen_w = weights.get('screen', 0.0)
  if screen_w is not None and float(screen_w) > 0:
    topology = mesh_topology(meta)
    if topology is None:
      raise ValueError("A 'screen' loss weight > 0 needs the dataset's mesh topology in meta (faces, uvs, "
                       "uv_faces, vert_mean, vert_std) and lipflow_jax.render.")
    raster_kwargs = dict(SCREEN_RASTER_DEFAULTS, **dict(screen_settings or {}))

    def screen_loss_fn(outputs, batch):
      settings = screen_raster_settings(batch['image'].shape[-3:-1], **raster_kwargs)
      return screen_loss(outputs, batch, topology=topology, settings=settings, meta=meta)
  elif screen_w is not None and float(screen_w) < 0:
    raise ValueError(f"The 'screen' loss weight must be >= 0, got {screen_w}")

  def init_params(rng, batch):
    k1, k2 = jax.random.split(rng)
    return model.init({'params': k1, 'sample': k2}, batch)['params']

  def loss_fn(params, frozen, batch, rng):
    del frozen
    return models.model_loss(model, params, batch, rng, weights=weights, screen_loss_fn=screen_loss_fn)

  def images_fn(params, frozen, batch):
    del frozen
    one = jax.tree.map(lambda x: x[:1], batch)
    out = model.apply({'params': params}, one, train=False)
    mask = one['tex_mask'][0]
    decoded = tex_to_rgb(out['tex'][0], meta)
    images = {'texture/decoded_vs_target': jnp.concatenate([decoded, tex_to_rgb(one['tex'][0], meta) * mask],
                                                           axis=1)}
    if renderer is not None and 'image' in one and 'camera_K' in one:
      images['render/decoded_vs_photo'] = renderer(out['verts'][0], decoded, one['camera_K'][0],
                                                   one['camera_Rt'][0], one['image'][0])
    return images

  return Task(model=model, init_params=init_params, loss_fn=loss_fn, images_fn=images_fn)


class MeshTopology(NamedTuple):
  """The dataset's mesh: faces [F, 3] int32, uvs [U, 2], uv_faces [F, 3] int32, and the vertex normalisation
  (vert_mean [V, 3], vert_std scalar) that maps the model's normalised vertices back to world units."""
  faces: np.ndarray
  uvs: np.ndarray
  uv_faces: np.ndarray
  vert_mean: np.ndarray
  vert_std: np.float32

  def denormalize(self, verts):
    """Normalised vertices [..., V, 3] -> world units."""
    return verts * self.vert_std + self.vert_mean


def mesh_topology(meta) -> Optional[MeshTopology]:
  """``MeshTopology`` from the dataset meta, or None when it lacks a field or the renderer is unavailable."""
  needed = ('faces', 'uvs', 'uv_faces', 'vert_mean', 'vert_std')
  if meta is None or any(_meta_get(meta, n) is None for n in needed):
    return None
  try:
    from lipflow_jax import render  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return None
  return MeshTopology(faces=np.asarray(_meta_get(meta, 'faces'), np.int32),
                      uvs=np.asarray(_meta_get(meta, 'uvs'), np.float32),
                      uv_faces=np.asarray(_meta_get(meta, 'uv_faces'), np.int32),
                      vert_mean=np.asarray(_meta_get(meta, 'vert_mean'), np.float32),
                      vert_std=np.float32(_meta_get(meta, 'vert_std')))


# Soft rasterisation for the screen loss (pixels): K faces per pixel blended, coverage width sigma. The blur radius
# is kept at 1 px (not derived from sigma, ~3.8 px): the candidates per tile, and so the cost and the risk of
# overflow (faces dropped; check ``overflow``), grow with it, and coverage below 2 * sigmoid(-1 / sigma) = 0.24
# at 1 px outside a silhouette is what it drops.
SCREEN_RASTER_DEFAULTS = dict(faces_per_pixel=4, sigma=0.5, blur_radius=1.0, tile_size=8, max_faces_per_tile=256,
                              cull_backfaces=True)


def screen_raster_settings(image_size, **kwargs):
  """Soft ``RasterSettings`` of the screen loss at ``image_size`` (H, W); kwargs override the defaults."""
  from lipflow_jax import render  # pylint: disable=g-import-not-at-top
  return render.RasterSettings(image_size=tuple(int(s) for s in image_size),
                               **dict(SCREEN_RASTER_DEFAULTS, **kwargs))


def render_batch(verts, texture, camera_K, camera_Rt, *, topology: MeshTopology, settings):
  """Normalised verts [B, V, 3] and [0, 1] textures [B, T, T, 3] rendered into cameras K [B, 3, 3],
  Rt [B, 3, 4] -> ``render.Rendered`` with a leading batch axis (rgb [B, H, W, 3])."""
  from lipflow_jax import geometry  # pylint: disable=g-import-not-at-top
  from lipflow_jax import render  # pylint: disable=g-import-not-at-top

  def one(v, tex, K, Rt):
    return render.render_mesh(topology.denormalize(v), topology.faces, topology.uvs, topology.uv_faces, tex,
                              geometry.Camera(K=K, Rt=Rt), settings)

  return jax.vmap(one)(verts, texture, camera_K, camera_Rt)


def screen_loss(outputs, batch, *, topology: MeshTopology, settings, meta=None, eps: float = 1e-6):
  """Masked MSE between the decoded avatar rendered into each example's camera and the example's photo.

  Args:
    outputs: the model's outputs; reads ``verts`` [B, V, 3] (normalised) and ``tex`` [B, T, T, 3] (normalised,
      mapped to [0, 1] colours by ``tex_to_rgb`` with ``meta``).
    batch: reads ``image`` [B, H, W, 3] in [0, 1], ``image_mask`` [B, H, W, 1], ``camera_K``, ``camera_Rt``.
    topology: ``MeshTopology`` of the dataset.
    settings: ``RasterSettings`` at the photo's size (soft, for gradients w.r.t. the vertices).
    meta: dataset meta (texture mean/std) for ``tex_to_rgb``.
  Returns:
    sum(mask * (render - photo)^2) / (3 * sum(mask) + eps), a scalar.
  """
  rendered = render_batch(outputs['verts'], tex_to_rgb(outputs['tex'], meta), batch['camera_K'],
                          batch['camera_Rt'], topology=topology, settings=settings)
  image = batch['image'].astype(rendered.rgb.dtype)
  mask = batch['image_mask'].astype(rendered.rgb.dtype)
  return jnp.sum(mask * jnp.square(rendered.rgb - image)) / (jnp.sum(mask) * image.shape[-1] + eps)


def _make_renderer(meta, max_size: int):
  """(verts [V, 3] normalised, texture [T, T, 3] in [0, 1], K, Rt, photo [H, W, 3]) -> [h, 2w, 3] render | photo,
  or None when ``meta`` lacks the topology or the renderer is unavailable."""
  topology = mesh_topology(meta)
  if topology is None:
    return None
  from lipflow_jax import geometry  # pylint: disable=g-import-not-at-top
  from lipflow_jax import render  # pylint: disable=g-import-not-at-top

  def renderer(verts, texture, K, Rt, photo):
    h, w = photo.shape[:2]
    scale = min(1.0, max_size / max(h, w))
    size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
    K = jnp.diag(jnp.array([size[1] / w, size[0] / h, 1.0], jnp.float32)) @ K
    settings = render.RasterSettings.hard(size, tile_size=8, max_faces_per_tile=256, cull_backfaces=True)
    out = render.render_mesh(topology.denormalize(verts), topology.faces, topology.uvs, topology.uv_faces,
                             texture, geometry.Camera(K=K, Rt=Rt), settings)
    photo = jax.image.resize(photo, size + photo.shape[-1:], 'linear') if size != (h, w) else photo
    return jnp.concatenate([out.rgb, photo], axis=1)

  return renderer


# ------------------------------------------------------------------------------------ regressor
def regressor_task(conditions: Sequence[str], regressor_config: Mapping[str, Any], teacher, teacher_params,
                   sizes: Mapping[str, Any], meta=None) -> Task:
  """One ``Regressor`` per condition (params {condition: ...}), each trained by MSE to the frozen posterior mean
  of ``teacher`` (a DAM ``LipFlowModel``) on the batch's rich data; the loss is the mean over conditions."""
  rc = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(regressor_config).items()}
  if rc.get('keypoint_image_size') is None:
    rc['keypoint_image_size'] = sizes.get('keypoint_image_size')
  regressors = {c: models.Regressor(condition=c, z_dim=teacher.z_dim, **rc) for c in conditions}

  def target_mu(frozen, batch):
    mu, _ = teacher.apply({'params': frozen['teacher']}, batch, method=models.LipFlowModel.encode_input)
    return jax.lax.stop_gradient(mu)

  def init_params(rng, batch):
    keys = jax.random.split(rng, len(conditions))
    return {c: regressors[c].init(k, batch)['params'] for c, k in zip(conditions, keys)}

  def loss_fn(params, frozen, batch, rng):
    del rng
    mu = target_mu(frozen, batch)
    total, metrics = 0.0, {}
    for c in conditions:
      loss, _ = models.regressor_loss(regressors[c], params[c], batch, mu)
      metrics[f'regressor_mse_{c}'] = loss
      total = total + loss / len(conditions)
    metrics['regressor_mse'] = total
    return total, metrics

  def images_fn(params, frozen, batch):
    one = jax.tree.map(lambda x: x[:1], batch)
    mu = target_mu(frozen, one)
    row = []
    for c in conditions:
      z = regressors[c].apply({'params': params[c]}, one)
      tex, _ = teacher.apply({'params': frozen['teacher']}, z, one['view'], one.get('camera_index'),
                             method=models.LipFlowModel.decode)
      row.append(tex_to_rgb(tex[0], meta))
    tex, _ = teacher.apply({'params': frozen['teacher']}, mu, one['view'], one.get('camera_index'),
                           method=models.LipFlowModel.decode)
    row.append(tex_to_rgb(tex[0], meta))
    return {'texture/regressed_' + '_'.join(conditions) + '_vs_teacher': jnp.concatenate(row, axis=1)}

  return Task(model=regressors, init_params=init_params, loss_fn=loss_fn, images_fn=images_fn,
              frozen={'teacher': teacher_params})
