"""Tests of the paired headset training loss (``lipflow_jax.models.hmc_loss``): the decoded avatar
rendered into each training frame's headset cameras, masked MSE against its crops, wired into
``avatar_task`` by an 'hmc' loss weight > 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dam_synthetic
from lipflow_jax import data, geometry, models
from lipflow_jax.train import tasks as tasks_lib


@pytest.fixture(scope="module")
def setup(tiny_capture):
  meta = tiny_capture.meta
  batch = jax.tree.map(jnp.asarray, tiny_capture.batch(batch_size=4))
  mesh = tasks_lib.mesh_meta(meta)
  settings = models.hmc_raster_settings(batch["hmc"].shape[-3:-1])
  return meta, batch, mesh, settings


def _decode_example(batch):
  """A stand-in decoder: code [i, ...] and view -> example i's normalised verts and its average
  texture brightened by the view's z component (so that the views asked for show in the loss)."""

  def decode(z, view):
    i = z[:, 0].astype(jnp.int32)
    return batch["avg_tex"][i] + 3.0 * view[:, 2, None, None, None], batch["verts"][i]

  return decode


def _reference_crops(batch, mesh, settings):
  """Per example and headset camera, one ``render_avatar`` call: [B, C, h, w, 1] grey crops."""

  @jax.jit
  def one(verts, avg_tex, K, Rt):
    cam = geometry.Camera(K=K, Rt=Rt)
    tex = data.denormalize_tex(avg_tex + 3.0 * geometry.view_direction(cam)[2], mesh)
    return models.to_grey(models.render_avatar(mesh, verts, tex, cam, settings).rgb)

  n, c = batch["hmc_K"].shape[:2]
  return jnp.stack(
    [
      jnp.stack(
        [
          one(batch["verts"][b], batch["avg_tex"][b], batch["hmc_K"][b, j], batch["hmc_Rt"][b, j])
          for j in range(c)
        ]
      )
      for b in range(n)
    ]
  )


def test_hmc_loss_matches_per_camera_renders(setup):
  _, batch, mesh, settings = setup
  n = batch["verts"].shape[0]
  z = jnp.tile(jnp.arange(n, dtype=jnp.float32)[:, None], (1, 3))
  ref = _reference_crops(batch, mesh, settings)
  loss = jax.jit(
    lambda target, k: models.hmc_loss(
      _decode_example(batch), {"z": z}, target, mesh=mesh, settings=settings, num_examples=k
    ),
    static_argnums=1,
  )
  target = dict(batch, hmc=ref)
  assert float(loss(target, None)) < 1e-10, float(loss(target, None))
  # Masked MSE normalisation: +0.1 on every crop pixel gives 0.01 over the masked pixels.
  np.testing.assert_allclose(float(loss(dict(target, hmc=ref + 0.1), None)), 0.01, rtol=1e-4)
  # num_examples: only the first examples count (a wrong crop of the last one changes nothing).
  last_wrong = dict(target, hmc=ref.at[n - 1].add(0.3))
  assert float(loss(last_wrong, 2)) < 1e-10 < float(loss(last_wrong, None))
  # Against the capture's own (noisy, view-shaded) crops the stand-in is close, not exact.
  real = float(loss(batch, None))
  assert 1e-5 < real < 0.1, real


def test_model_loss_with_hmc_weight_has_finite_nonzero_decoder_gradients(setup, tiny_dam_params):
  meta, batch, _, _ = setup
  config = dam_synthetic.get_config("tiny")
  sizes = tasks_lib.data_sizes(batch, meta)
  model = tasks_lib.build_model(config.model.to_dict(), sizes)
  weights = dict(config.loss.to_dict(), tex=0.0, geo=0.0, kl=0.0, hmc=1.0)  # the headset term alone
  task = tasks_lib.avatar_task(
    model, loss_weights=weights, meta=meta, render_images=False, hmc_examples=2
  )
  params = tiny_dam_params  # this model's initial parameters (shared: one init compilation)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))(
    params, {}, batch, jax.random.PRNGKey(1)
  )
  assert np.isfinite(float(metrics["hmc"])) and float(metrics["hmc"]) > 0
  np.testing.assert_allclose(float(loss), float(metrics["hmc"]), rtol=1e-5)
  decoder = jax.tree.leaves({k: v for k, v in grads.items() if "dec" in k.lower()})
  assert decoder and all(bool(jnp.all(jnp.isfinite(g))) for g in decoder)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in decoder) > 0
  # Encoder gradients flow through the posterior sample z too.
  encoder = jax.tree.leaves({k: v for k, v in grads.items() if "enc" in k.lower()})
  assert encoder and sum(float(jnp.sum(jnp.abs(g))) for g in encoder) > 0
  # Off by default; a negative weight or a weight without the topology is refused.
  task0 = tasks_lib.avatar_task(model, loss_weights=config.loss.to_dict(), meta=meta)
  _, m0 = jax.jit(task0.loss_fn)(params, {}, batch, jax.random.PRNGKey(1))
  assert "hmc" not in m0 and config.loss.hmc == 0.0
  with pytest.raises(ValueError, match=">= 0"):
    tasks_lib.avatar_task(model, loss_weights=dict(weights, hmc=-1.0), meta=meta)
  with pytest.raises(ValueError, match="topology"):
    tasks_lib.avatar_task(model, loss_weights=weights, meta=None)
  with pytest.raises(ValueError, match="hmc_loss_fn"):
    models.model_loss(model, params, batch, jax.random.PRNGKey(1), weights=weights)
