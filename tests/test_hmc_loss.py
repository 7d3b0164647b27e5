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


def _decode_example(batch, seen):
  """A stand-in decoder: code [i, ...] -> example i's normalised verts and average texture; records
  the views it is asked for."""

  def decode(z, view):
    seen.append(view)
    i = z[:, 0].astype(jnp.int32)
    return batch["avg_tex"][i], batch["verts"][i]

  return decode


def _reference_crops(batch, mesh, settings, n):
  """Per example and headset camera, one ``render_avatar`` call: [n, C, h, w, 1] grey crops."""
  out = []
  for b in range(n):
    row = []
    for c in range(batch["hmc_K"].shape[1]):
      cam = geometry.Camera(K=batch["hmc_K"][b, c], Rt=batch["hmc_Rt"][b, c])
      tex = data.denormalize_tex(batch["avg_tex"][b], mesh)
      row.append(
        models.to_grey(models.render_avatar(mesh, batch["verts"][b], tex, cam, settings).rgb)
      )
    out.append(jnp.stack(row))
  return jnp.stack(out)


def test_hmc_loss_matches_per_camera_renders(setup):
  meta, batch, mesh, settings = setup
  del meta
  n = batch["verts"].shape[0]
  z = jnp.tile(jnp.arange(n, dtype=jnp.float32)[:, None], (1, 3))
  ref = _reference_crops(batch, mesh, settings, n)
  target = dict(batch, hmc=ref)
  seen = []
  loss = models.hmc_loss(
    _decode_example(batch, seen), {"z": z}, target, mesh=mesh, settings=settings
  )
  assert float(loss) < 1e-10, float(loss)
  # The decoder is asked for each headset camera's view direction, example-major.
  views = jnp.stack(
    [
      geometry.view_direction(geometry.Camera(K=batch["hmc_K"][b, c], Rt=batch["hmc_Rt"][b, c]))
      for b in range(n)
      for c in range(batch["hmc_K"].shape[1])
    ]
  )
  np.testing.assert_allclose(np.asarray(seen[0]), np.asarray(views), atol=1e-6)
  # Masked MSE normalisation: +0.1 on every crop pixel gives 0.01 over the masked pixels.
  shifted = dict(target, hmc=ref + 0.1)
  got = models.hmc_loss(_decode_example(batch, []), {"z": z}, shifted, mesh=mesh, settings=settings)
  np.testing.assert_allclose(float(got), 0.01, rtol=1e-4)
  # num_examples: only the first examples count (a wrong crop of the last one changes nothing).
  last_wrong = dict(target, hmc=ref.at[n - 1].add(0.3))
  first = models.hmc_loss(
    _decode_example(batch, []), {"z": z}, last_wrong, mesh=mesh, settings=settings, num_examples=2
  )
  assert float(first) < 1e-10
  # Against the capture's own (noisy, view-shaded) crops the average texture is close, not exact.
  real = float(
    models.hmc_loss(_decode_example(batch, []), {"z": z}, batch, mesh=mesh, settings=settings)
  )
  assert 1e-5 < real < 0.05, real


def test_model_loss_with_hmc_weight_has_finite_nonzero_decoder_gradients(setup):
  meta, batch, _, _ = setup
  config = dam_synthetic.get_config("tiny")
  sizes = tasks_lib.data_sizes(batch, meta)
  model = tasks_lib.build_model(config.model.to_dict(), sizes)
  weights = dict(config.loss.to_dict(), tex=0.0, geo=0.0, kl=0.0, hmc=1.0)  # the headset term alone
  task = tasks_lib.avatar_task(
    model, loss_weights=weights, meta=meta, render_images=False, hmc_examples=2
  )
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0), jax.tree.map(lambda x: x[:1], batch))
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
