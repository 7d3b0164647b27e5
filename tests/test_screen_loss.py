"""Tests of the screen loss (``lipflow_jax.models.screen_loss``): the decoded avatar soft-rendered
into the example's camera, masked MSE against the photo, wired into ``avatar_task`` by a 'screen'
loss weight > 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dam_synthetic
from lipflow_jax import data, models
from lipflow_jax.train import tasks as tasks_lib


@pytest.fixture(scope='module')
def setup(tiny_capture):
  meta = tiny_capture.meta
  batch = jax.tree.map(jnp.asarray, tiny_capture.batch(batch_size=4))
  mesh = tasks_lib.mesh_meta(meta)
  assert mesh is not None
  settings = models.screen_raster_settings(batch['image'].shape[-3:-1])
  return meta, batch, mesh, settings


def test_settings_are_soft_at_the_photo_size(setup):
  _, batch, _, settings = setup
  assert settings.image_size == tuple(batch['image'].shape[1:3])
  assert not settings.is_hard and settings.faces_per_pixel == 4 and settings.sigma == 0.5


def test_screen_loss_is_zero_on_its_own_render_and_positive_when_perturbed(setup):
  meta, batch, mesh, settings = setup
  tex = batch['avg_tex']  # a normalised [B, T, T, 3] texture, stands in for the decoded one
  rendered = jax.jit(
    lambda v, t: models.render_batch(
      mesh, v, data.denormalize_tex(t, mesh), batch['camera_K'], batch['camera_Rt'], settings
    )
  )(batch['verts'], tex)
  assert int(np.max(np.asarray(rendered.overflow))) == 0
  # The soft coverage matches the photo's (hard) mask up to the blurred silhouette.
  assert abs(float(jnp.mean(rendered.alpha)) - float(jnp.mean(batch['image_mask']))) < 0.08
  target = dict(batch, image=rendered.rgb, image_mask=(rendered.alpha > 0.5).astype(jnp.float32))
  loss = jax.jit(lambda o, b: models.screen_loss(o, b, mesh=mesh, settings=settings))
  same = float(loss({'verts': batch['verts'], 'tex': tex}, target))
  assert same < 1e-10, same
  offset = 0.1 * 255.0 / float(meta.tex_std)  # +0.1 in [0, 1] colour (less where it clips at 1)
  perturbed = float(loss({'verts': batch['verts'], 'tex': tex + offset}, target))
  assert 1e-3 < perturbed <= 0.0101, perturbed
  # Masked MSE normalisation: a constant offset d on all masked pixels gives d^2 (away from the clip
  # at 0, 1).
  shifted = dict(target, image=target['image'] + 0.1)
  np.testing.assert_allclose(
    float(loss({'verts': batch['verts'], 'tex': tex}, shifted)), 0.01, rtol=1e-3
  )
  # Against the dataset's own photo (a different, unobserved full texture) the loss is finite and
  # small.
  real = float(loss({'verts': batch['verts'], 'tex': tex}, batch))
  assert np.isfinite(real) and real < 0.1, real


def test_model_loss_with_screen_weight_has_finite_nonzero_decoder_gradients(setup, tiny_dam_params):
  meta, batch, _, _ = setup
  config = dam_synthetic.get_config('tiny')
  sizes = tasks_lib.data_sizes(batch, meta)
  model = tasks_lib.build_model(config.model.to_dict(), sizes)
  weights = dict(
    config.loss.to_dict(), tex=0.0, geo=0.0, kl=0.0, screen=1.0
  )  # the screen term alone
  task = tasks_lib.avatar_task(model, loss_weights=weights, meta=meta, render_images=False)
  params = tiny_dam_params  # this model's initial parameters (shared: one init compilation)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))(
    params, {}, batch, jax.random.PRNGKey(1)
  )
  assert np.isfinite(float(metrics['screen'])) and float(metrics['screen']) > 0
  np.testing.assert_allclose(float(loss), float(metrics['screen']), rtol=1e-5)
  decoder = {k: v for k, v in grads.items() if 'dec' in k.lower()}
  assert decoder, sorted(grads)
  leaves = jax.tree.leaves(decoder)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
  # The default weight (0) adds no screen term, and a screen weight without topology is refused.
  task0 = tasks_lib.avatar_task(
    model, loss_weights=config.loss.to_dict(), meta=meta, render_images=False
  )
  _, m0 = jax.jit(task0.loss_fn)(params, {}, batch, jax.random.PRNGKey(1))
  assert 'screen' not in m0
  with pytest.raises(ValueError, match='topology'):
    tasks_lib.avatar_task(model, loss_weights=weights, meta=None)
