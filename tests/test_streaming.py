"""Tests of live driving: the streaming fitter (``fit.streaming``) and the decode of only the
observed keypoint vertices. The toy bundle is the one of ``test_fit``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fit import make_toy

from lipflow_jax import data, fit, models


# ----------------------------------------------------------------------------------------------
# only what is observed: the keypoint vertices
@pytest.mark.parametrize("weight_norm", [False, True])
def test_sliced_keypoint_decode_equals_slicing_the_full_decode(weight_norm):
  v_count, z_dim = 40, 6
  model = models.LipFlowModel(
    prior="gaussian",
    conditions=(),
    encoder_input="x",
    num_vertices=v_count,
    z_dim=z_dim,
    tex_size=16,
    dec_z_features=16,
    dec_start_channels=8,
    dec_channels=(8,),
    weight_norm=weight_norm,
    enc_channels=(8,),
    enc_tex_features=8,
    enc_vert_features=8,
  )
  batch = {
    "avg_tex": jnp.zeros((1, 16, 16, 3)),
    "verts": jnp.zeros((1, v_count, 3)),
    "view": jnp.asarray([[0.0, 0.0, 1.0]]),
  }
  variables = model.init({"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(1)}, batch)
  r = np.random.RandomState(0)
  ids = jnp.asarray([5, 0, 39, 17, 5], jnp.int32)  # unordered, with a repeat
  meta = data.MeshMeta(
    faces=jnp.zeros((1, 3), jnp.int32),
    uvs=jnp.zeros((1, 2)),
    uv_faces=jnp.zeros((1, 3), jnp.int32),
    keypoint_vertex_ids=ids,
    vert_mean=jnp.asarray(r.randn(v_count, 3).astype(np.float32)),
    vert_std=jnp.float32(3.0),
    tex_mean=jnp.zeros((16, 16, 3)),
    tex_std=jnp.float32(1.0),
  )
  bundle = fit.ModelBundle(model=model, variables=variables, meta=meta, latent_dim=z_dim)
  z = jnp.asarray(r.randn(z_dim).astype(np.float32))
  full = fit.decode_verts(bundle, z)[ids]
  sliced = jax.jit(fit.bundle.decode_keypoint_verts)(bundle, z)
  np.testing.assert_allclose(sliced, full, rtol=1e-5, atol=1e-5)
  # Only the P keypoint vertices are computed: no matrix product has 3 V outputs.
  jaxpr = jax.make_jaxpr(fit.bundle.decode_keypoint_verts)(bundle, z)
  widths = [e.outvars[0].aval.shape[-1] for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert widths and 3 * v_count not in widths and 3 * ids.size in widths, widths


# ----------------------------------------------------------------------------------------------
# the streaming fitter
@pytest.fixture(scope="module")
def toy():
  return make_toy()


def _frames(obs, index):
  return [jax.tree_util.tree_map(lambda x, i=i: x[i], obs) for i in index]


def _keypoint_obs(obs):
  return {k: v for k, v in obs.items() if k.startswith(("keypoints", "frontal"))}


def _stream(bundle, cfg, frames, steps):
  step = fit.stream_step_fn(cfg, steps)
  state = fit.stream_init(bundle, cfg)
  codes = []
  for f in frames:
    state = step(bundle, state, f)
    codes.append(np.asarray(state.z))
  return state, np.stack(codes)


@pytest.mark.parametrize("method", ["dam_fit", "lipflow_fit"])
def test_stream_of_identical_frames_converges_to_the_batch_fit(toy, method):
  bundle, _, obs = toy
  obs = _keypoint_obs(obs)
  kw = dict(lr=0.02, lambda_prior=0.1)
  batch = fit.fit_latents(bundle, {k: v[:1] for k, v in obs.items()}, method, num_steps=400, **kw)
  cfg = fit.fit_config(method, "keypoints", **kw)
  state, codes = _stream(bundle, cfg, _frames(obs, [0] * 80), steps=5)
  z_batch = np.asarray(batch.z[0])
  start = np.linalg.norm(codes[0] - z_batch)
  assert np.linalg.norm(codes[-1] - z_batch) < 0.05 * max(start, 1e-3), (codes[-1], z_batch)
  assert int(state.frames) == 80 and int(state.skipped) == 0


def test_one_compilation_for_every_frame(toy):
  bundle, _, obs = toy
  bundle = jax.device_put(bundle, jax.devices()[0])  # committed, like a restored checkpoint
  cfg = fit.fit_config("lipflow_fit", "keypoints", lr=0.05, lambda_prior=0.1)
  _stream(bundle, cfg, _frames(_keypoint_obs(obs), [0, 1, 2]), steps=2)
  assert fit.stream_step_fn(cfg, 2)._cache_size() == 1


def test_first_frame_starts_from_the_prior_mode(toy):
  bundle, _, obs = toy
  obs = _keypoint_obs(obs)
  cfg = fit.fit_config("lipflow_fit", "keypoints", lr=1e-9, lambda_prior=0.1)
  _, codes = _stream(bundle, cfg, _frames(obs, [1]), steps=1)
  mode = fit.prior_mode(bundle, {k: v[1:2] for k, v in obs.items()}, "keypoints")[0]
  np.testing.assert_allclose(codes[0], mode, atol=1e-6)


@pytest.mark.parametrize("input_", ["keypoints", "hmc"])
def test_stream_with_dropped_frames_keeps_the_previous_code(toy, input_):
  bundle, _, obs = toy
  frames = _frames(obs, [0, 1, 1, 2, 2, 0])
  if input_ == "keypoints":
    frames[2] = dict(frames[2], keypoints=jnp.full_like(frames[2]["keypoints"], jnp.nan))
    frames[4] = dict(frames[4], keypoints_visible=jnp.zeros_like(frames[4]["keypoints_visible"]))
  else:
    frames[2] = dict(frames[2], hmc=jnp.full_like(frames[2]["hmc"], jnp.nan))
    frames[4] = dict(frames[4], hmc_mask=jnp.zeros_like(frames[4]["hmc_mask"]))
  cfg = fit.fit_config("dam_fit", input_, lr=0.05, lambda_prior=1e-3)
  state, codes = _stream(bundle, cfg, frames, steps=3)
  assert np.all(np.isfinite(codes))
  np.testing.assert_array_equal(codes[2], codes[1])
  np.testing.assert_array_equal(codes[4], codes[3])
  assert not np.array_equal(codes[3], codes[2]) and not np.array_equal(codes[5], codes[4])
  assert int(state.skipped) == 2 and int(state.frames) == 6 and bool(state.started)


def test_unusable_first_frame_keeps_the_initial_code_and_waits(toy):
  bundle, _, obs = toy
  frames = _frames(_keypoint_obs(obs), [0, 0])
  frames[0] = dict(frames[0], keypoints=jnp.full_like(frames[0]["keypoints"], jnp.nan))
  cfg = fit.fit_config("dam_fit", "keypoints", lr=0.05, lambda_prior=1e-3)
  step = fit.stream_step_fn(cfg, 2)
  state = step(bundle, fit.stream_init(bundle, cfg), frames[0])
  np.testing.assert_array_equal(state.z, np.zeros_like(state.z))  # dam_fit starts from zeros
  assert not bool(state.started) and int(state.skipped) == 1
  state = step(bundle, state, frames[1])
  assert bool(state.started) and np.all(np.isfinite(state.z)) and np.any(state.z != 0)
