"""What a run trains: the model, its parameter initialiser, loss and image summaries, built from
plain values.

A ``Task`` is everything the train loop needs to know about a model:

  init_params(rng, batch) -> params
  loss_fn(params, frozen, batch, rng) -> (loss [], metrics {name: []})
  images_fn(params, frozen, batch) -> {name: [H, W, 3] in [0, 1]}   (first example of the batch)
  frozen: a pytree of fixed arrays the loss reads (the DAM teacher of the regressor), passed to the
    jitted step as an argument rather than baked into it as constants.

Kinds: 'avatar' (``LipFlowModel``: DAM, LiP-Flow, conditional Gaussian, flow prior, direct encoder)
and 'regressor' (one ``Regressor`` per condition, trained to the frozen DAM posterior mean of a
teacher workdir).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lipflow_jax import geometry, models, render
from lipflow_jax.data import schema

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Task:
  """See the module docstring; ``model`` is the Flax module (or {condition: module}) that was
  built."""

  model: Any
  init_params: Callable[[jax.Array, dict], PyTree]
  loss_fn: Callable[[PyTree, PyTree, dict, jax.Array], tuple]
  images_fn: Optional[Callable[[PyTree, PyTree, dict], dict]] = None
  frozen: PyTree = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------ augmentation
def augment_keypoints(
  batch: Mapping[str, Any], rng, noise_px: float = 0.0, dropout: float = 0.0
) -> dict:
  """Fresh detector noise on the run-time keypoints of a training batch.

  Every (frame, camera) example of a frame carries the same keypoints, so without augmentation a
  keypoint encoder sees one noisy detection per frame and can memorise it. Adds N(0, noise_px^2)
  pixels to ``keypoints`` [B, P, 2] and marks each keypoint invisible in ``keypoints_visible`` [B,
  P] with probability ``dropout``; other entries are returned unchanged. A no-op for batches without
  keypoints.
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
  """The task with ``augment_keypoints`` applied to every training batch (not to image
  summaries)."""
  if noise_px < 0 or not 0 <= dropout < 1:
    raise ValueError(
      f'keypoint augmentation needs noise_px >= 0 and 0 <= dropout < 1, got {noise_px}, {dropout}'
    )
  if noise_px == 0 and dropout == 0:
    return task
  loss_fn = task.loss_fn

  def augmented_loss_fn(params, frozen, batch, rng):
    rng, k = jax.random.split(rng)
    return loss_fn(params, frozen, augment_keypoints(batch, k, noise_px, dropout), rng)

  return dataclasses.replace(task, loss_fn=augmented_loss_fn)


# ------------------------------------------------------------------------------------ sizes from
# data
def _meta_get(meta, *names, default=None):
  for n in names:
    if meta is not None and hasattr(meta, n) and getattr(meta, n) is not None:
      return getattr(meta, n)
    if isinstance(meta, Mapping) and meta.get(n) is not None:
      return meta[n]
  return default


def data_sizes(example: Mapping[str, np.ndarray], meta=None) -> dict:
  """Model sizes implied by a batch (``[B, ...]`` arrays) and the dataset's ``DatasetMeta``.

  Returns {num_vertices, tex_size, keypoint_image_size (the frontal camera's (H, W)), num_cameras}
  (the last two None / 0 without ``meta``).
  """
  sizes = dict(
    num_vertices=int(example['verts'].shape[-2]), tex_size=int(example['avg_tex'].shape[-2])
  )
  kp_size = _meta_get(meta, 'frontal_size')  # the keypoints' pixel frame
  sizes['keypoint_image_size'] = None if kp_size is None else tuple(int(s) for s in kp_size)
  cameras = _meta_get(meta, 'camera_names')  # the decoder's per-camera colour gain and bias
  sizes['num_cameras'] = 0 if cameras is None else len(cameras)
  return sizes


def _to_rgb(tex, mesh: Optional[schema.MeshMeta]):
  """Normalised texture [..., T, T, 3] -> [0, 1] colours for image summaries (a fixed map without
  the dataset's statistics)."""
  if mesh is None:
    return jnp.clip(0.5 + 0.25 * tex, 0.0, 1.0)
  return schema.denormalize_tex(tex, mesh)


def mesh_meta(meta) -> Optional[schema.MeshMeta]:
  """The dataset's ``MeshMeta``, or None without a dataset meta."""
  return None if meta is None else schema.MeshMeta.from_dataset_meta(meta)


# ------------------------------------------------------------------------------------ LipFlowModel
def build_model(model_config: Mapping[str, Any], sizes: Mapping[str, Any]) -> models.LipFlowModel:
  """``LipFlowModel`` from the config's model fields; None fields are filled from ``sizes``."""
  kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(model_config).items()}
  for k, v in sizes.items():
    if kwargs.get(k) is None:
      kwargs[k] = v
  needs_kp = (
    kwargs.get('prior') in models.CONDITIONAL_PRIORS and 'keypoints' in kwargs.get('conditions', ())
  ) or kwargs.get('encoder_input') == 'keypoints'
  if not needs_kp and kwargs.get('keypoint_image_size') is None:
    kwargs.pop('keypoint_image_size', None)
  return models.LipFlowModel(**kwargs)


def avatar_task(
  model: models.LipFlowModel,
  *,
  loss_weights: Mapping[str, float],
  meta=None,
  render_images: bool = True,
  render_max_size: int = 256,
  screen_settings: Optional[Mapping[str, Any]] = None,
  hmc_examples: Optional[int] = None,
) -> Task:
  """Task of a ``LipFlowModel`` trained with ``models.model_loss``.

  With a 'screen' loss weight > 0 the loss adds ``weight * screen_loss`` (the decoded avatar
  soft-rendered into each example's camera at the photo's size, masked MSE against the photo); this
  needs the dataset's mesh topology in ``meta``. ``screen_settings`` overrides
  ``models.SCREEN_RASTER_DEFAULTS`` (``RasterSettings`` fields).

  With an 'hmc' loss weight > 0 (paired headset training) the loss adds ``weight * hmc_loss``: the
  decoded avatar rendered into the first ``hmc_examples`` examples' headset cameras (None = all) at
  the crop size with ``models.hmc_raster_settings``, masked MSE against the batch's ``hmc`` crops.

  Image summaries (first example of the batch, z = posterior mean): the decoded texture beside the
  target (unobserved texels black), and with ``render_images`` (needs the dataset's mesh topology in
  ``meta``) the decoded avatar rendered into the example's camera beside its photo, at most
  ``render_max_size`` pixels high.
  """
  weights = dict(loss_weights)
  mesh = mesh_meta(meta)
  renderer = _make_renderer(mesh, render_max_size) if render_images and mesh is not None else None
  screen_loss_fn = None
  screen_w = weights.get('screen', 0.0)
  if screen_w is not None and float(screen_w) > 0:
    if mesh is None:
      raise ValueError(
        "A 'screen' loss weight > 0 needs the dataset's mesh topology in meta (faces, uvs, "
        "uv_faces, vert_mean, vert_std)."
      )
    raster_kwargs = dict(screen_settings or {})

    def screen_loss_fn(outputs, batch):
      settings = models.screen_raster_settings(batch['image'].shape[-3:-1], **raster_kwargs)
      return models.screen_loss(outputs, batch, mesh=mesh, settings=settings)
  elif screen_w is not None and float(screen_w) < 0:
    raise ValueError(f"The 'screen' loss weight must be >= 0, got {screen_w}")
  hmc_loss_fn = None
  hmc_w = weights.get('hmc', 0.0)
  if hmc_w is not None and float(hmc_w) > 0:
    if mesh is None:
      raise ValueError("An 'hmc' loss weight > 0 needs the dataset's mesh topology in meta.")

    def hmc_loss_fn(decode, outputs, batch):
      settings = models.hmc_raster_settings(batch['hmc'].shape[-3:-1])
      return models.hmc_loss(
        decode, outputs, batch, mesh=mesh, settings=settings, num_examples=hmc_examples
      )
  elif hmc_w is not None and float(hmc_w) < 0:
    raise ValueError(f"The 'hmc' loss weight must be >= 0, got {hmc_w}")

  def init_params(rng, batch):
    k1, k2 = jax.random.split(rng)
    return model.init({'params': k1, 'sample': k2}, batch)['params']

  def loss_fn(params, frozen, batch, rng):
    del frozen
    return models.model_loss(
      model,
      params,
      batch,
      rng,
      weights=weights,
      screen_loss_fn=screen_loss_fn,
      hmc_loss_fn=hmc_loss_fn,
    )

  def images_fn(params, frozen, batch):
    del frozen
    one = jax.tree.map(lambda x: x[:1], batch)
    out = model.apply({'params': params}, one, train=False)
    mask = one['tex_mask'][0]
    decoded = _to_rgb(out['tex'][0], mesh)
    images = {
      'texture/decoded_vs_target': jnp.concatenate(
        [decoded, _to_rgb(one['tex'][0], mesh) * mask], axis=1
      )
    }
    if renderer is not None and 'image' in one and 'camera_K' in one:
      images['render/decoded_vs_photo'] = renderer(
        out['verts'][0], decoded, one['camera_K'][0], one['camera_Rt'][0], one['image'][0]
      )
    return images

  return Task(model=model, init_params=init_params, loss_fn=loss_fn, images_fn=images_fn)


def _make_renderer(mesh: schema.MeshMeta, max_size: int):
  """(verts [V, 3] normalised, texture [T, T, 3] in [0, 1], K, Rt, photo [H, W, 3]) -> [h, 2w, 3]
  render | photo, at most ``max_size`` pixels high."""

  def renderer(verts, texture, K, Rt, photo):
    h, w = photo.shape[:2]
    scale = min(1.0, max_size / max(h, w))
    size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
    K = jnp.diag(jnp.array([size[1] / w, size[0] / h, 1.0], jnp.float32)) @ K
    settings = render.RasterSettings.hard(
      size, tile_size=8, max_faces_per_tile=256, cull_backfaces=True
    )
    out = models.render_avatar(mesh, verts, texture, geometry.Camera(K=K, Rt=Rt), settings)
    photo = jax.image.resize(photo, size + photo.shape[-1:], 'linear') if size != (h, w) else photo
    return jnp.concatenate([out.rgb, photo], axis=1)

  return renderer


# ------------------------------------------------------------------------------------ regressor
def regressor_task(
  conditions: Sequence[str],
  regressor_config: Mapping[str, Any],
  teacher,
  teacher_params,
  sizes: Mapping[str, Any],
  meta=None,
) -> Task:
  """One ``Regressor`` per condition (params {condition: ...}), each trained by MSE to the frozen
  posterior mean of ``teacher`` (a DAM ``LipFlowModel``) on the batch's rich data; the loss is the
  mean over conditions."""
  mesh = mesh_meta(meta)
  rc = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(regressor_config).items()}
  if rc.get('keypoint_image_size') is None:
    rc['keypoint_image_size'] = sizes.get('keypoint_image_size')
  regressors = {c: models.Regressor(condition=c, z_dim=teacher.z_dim, **rc) for c in conditions}

  def target_mu(frozen, batch):
    mu, _ = teacher.apply(
      {'params': frozen['teacher']}, batch, method=models.LipFlowModel.encode_input
    )
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
      tex, _ = teacher.apply(
        {'params': frozen['teacher']},
        z,
        one['view'],
        one.get('camera_index'),
        method=models.LipFlowModel.decode,
      )
      row.append(_to_rgb(tex[0], mesh))
    tex, _ = teacher.apply(
      {'params': frozen['teacher']},
      mu,
      one['view'],
      one.get('camera_index'),
      method=models.LipFlowModel.decode,
    )
    row.append(_to_rgb(tex[0], mesh))
    return {
      'texture/regressed_' + '_'.join(conditions) + '_vs_teacher': jnp.concatenate(row, axis=1)
    }

  return Task(
    model=regressors,
    init_params=init_params,
    loss_fn=loss_fn,
    images_fn=images_fn,
    frozen={'teacher': teacher_params},
  )
