"""Tests of lipflow_jax.fit with a small randomly initialised (fixed) model that follows the
model protocol."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lipflow_jax import data, fit, geometry

Z = 4
V = 30
T = 16
P = 20


class ToyModel(nn.Module):
  """decode / encode_condition / flow_forward / flow_inverse / prior_mode with tiny dense layers.

  The flow is conditional affine: z = y * exp(s) + t(h), so every prior density has a closed form.
  """

  def __call__(self, z, view, batch):  # touches every parameter (for init)
    mu, _, h = self.encode_condition(batch, "keypoints")
    return self.decode(z, view), self.flow_inverse(
      self.flow_forward(mu, h, "keypoints"), h, "keypoints"
    )

  def setup(self):
    self.verts_hidden = nn.Dense(32)
    self.verts_out = nn.Dense(V * 3, kernel_init=nn.initializers.normal(0.3))
    self.tex_out = nn.Dense(T * T * 3, kernel_init=nn.initializers.normal(0.5))
    self.view_tex = nn.Dense(T * T * 3, use_bias=False)
    self.cond = nn.Dense(2 * Z + 3)
    self.flow_log_scale = self.param("flow_log_scale", nn.initializers.normal(0.3), (Z,))
    self.flow_shift = nn.Dense(Z, kernel_init=nn.initializers.normal(0.5))

  def decode(self, z, view):
    verts = self.verts_out(jnp.tanh(self.verts_hidden(z))).reshape(z.shape[0], V, 3)
    tex = (self.tex_out(z) + 0.1 * self.view_tex(view)).reshape(z.shape[0], T, T, 3)
    return tex, verts

  def encode_condition(self, batch, name):
    del name
    kp, valid = jax.vmap(fit.sanitize_keypoints)(batch["keypoints"], batch.get("keypoints_visible"))
    x = (kp * valid[..., None] / 100.0).reshape(kp.shape[0], -1)
    out = self.cond(x)
    return out[:, :Z], 0.1 * out[:, Z : 2 * Z] - 0.5, out[:, 2 * Z :]

  def flow_forward(self, y, h, name):
    del name
    return y * jnp.exp(self.flow_log_scale) + self.flow_shift(h)

  def flow_inverse(self, z, h, name):
    del name
    y = (z - self.flow_shift(h)) * jnp.exp(-self.flow_log_scale)
    return y, jnp.broadcast_to(-jnp.sum(self.flow_log_scale), z.shape[:1])

  def prior_mode(self, batch, name):
    mu, _, h = self.encode_condition(batch, name)
    return self.flow_forward(mu, h, name)


def _grid_mesh(rows=5, cols=6, size=20.0):
  """A rows x cols vertex grid in the plane z = 0 (facing +z): verts [V, 3], faces [F, 3],
  per-vertex uvs."""
  yy, xx = np.meshgrid(np.linspace(0, 1, rows), np.linspace(0, 1, cols), indexing="ij")
  uvs = np.stack([xx.ravel(), 1 - yy.ravel()], -1).astype(np.float32)
  verts = np.stack(
    [(xx.ravel() - 0.5) * size, (0.5 - yy.ravel()) * size, np.zeros(rows * cols)], -1
  )
  faces = []
  for r in range(rows - 1):
    for c in range(cols - 1):
      a, b, d, e = r * cols + c, r * cols + c + 1, (r + 1) * cols + c, (r + 1) * cols + c + 1
      faces += [[a, d, b], [b, d, e]]  # counter-clockwise seen from +z
  return verts.astype(np.float32), np.asarray(faces, np.int32), uvs


def _hmc_cameras(n=3):
  eyes = [(-5.0, 4.0, 25.0), (5.0, 4.0, 25.0), (0.0, -5.0, 25.0)][:n]
  targets = [(-4.0, 3.0, 0.0), (4.0, 3.0, 0.0), (0.0, -4.0, 0.0)][:n]
  K = geometry.intrinsics(geometry.focal_for_fov(40.0, 16), (16, 16))
  return (
    jnp.broadcast_to(K, (n, 3, 3)),
    jnp.stack([geometry.look_at(e, t) for e, t in zip(eyes, targets)]),
  )


def _frontal_camera():
  Rt = geometry.look_at((0.0, 0.0, 60.0), (0.0, 0.0, 0.0))
  K = geometry.intrinsics(geometry.focal_for_fov(30.0, 64), (64, 64))
  return K, Rt


@pytest.fixture(scope="module")
def toy():
  return make_toy()


def make_toy():
  """A fixed random model bundle, ground-truth codes and their keypoint observations (B = 3)."""
  model = ToyModel()
  dummy = {"keypoints": jnp.zeros((1, P, 2)), "keypoints_visible": jnp.ones((1, P))}
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, Z)), jnp.zeros((1, 3)), dummy)
  rng = np.random.RandomState(0)
  vert_mean, faces, uvs = _grid_mesh()
  meta = data.MeshMeta(
    faces=jnp.asarray(faces),
    uvs=jnp.asarray(uvs),
    uv_faces=jnp.asarray(faces),
    keypoint_vertex_ids=jnp.arange(P, dtype=jnp.int32),
    vert_mean=jnp.asarray(vert_mean),
    vert_std=jnp.float32(1.0),
    tex_mean=jnp.full((T, T, 3), 128.0),
    tex_std=jnp.float32(40.0),
  )
  bundle = fit.ModelBundle(
    model=model,
    variables=variables,
    meta=meta,
    prior="lipflow",
    latent_dim=Z,
    hmc_settings=fit.hmc_fit_settings((16, 16), max_faces_per_tile=64),
  )
  z_true = jnp.asarray(rng.normal(0.0, 0.7, (3, Z)).astype(np.float32))
  K, Rt = _frontal_camera()
  camera = geometry.Camera(K=K, Rt=Rt)
  kps = jax.jit(jax.vmap(lambda z: fit.project_keypoints(bundle, z, camera)))(z_true)
  hK, hRt = _hmc_cameras()
  hmc, alpha = jax.jit(jax.vmap(lambda z: fit.render_hmc(bundle, z, hK, hRt)))(z_true)
  obs = {
    "keypoints": kps,
    "keypoints_visible": jnp.ones((3, P), jnp.float32),
    "frontal_K": jnp.broadcast_to(K, (3, 3, 3)),
    "frontal_Rt": jnp.broadcast_to(Rt, (3, 3, 4)),
    "hmc": hmc,
    "hmc_mask": alpha,
    "hmc_K": jnp.broadcast_to(hK, (3, 3, 3, 3)),
    "hmc_Rt": jnp.broadcast_to(hRt, (3, 3, 3, 4)),
  }
  return bundle, z_true, obs


def _frame(obs, i):
  return jax.tree_util.tree_map(lambda x: x[i], obs)


# ----------------------------------------------------------------------------------------------
# objectives
@pytest.mark.parametrize("robust", ["l2", "huber", "geman_mcclure"])
def test_keypoint_objective_zero_at_truth_positive_away(toy, robust):
  bundle, z_true, obs = toy
  vg = jax.jit(
    jax.vmap(
      jax.value_and_grad(functools.partial(fit.keypoint_objective, robust=robust, scale=2.0)),
      in_axes=(0, 0, None),
    )
  )
  at, g = vg(z_true, obs, bundle)
  away, g_away = vg(z_true + 0.3, obs, bundle)
  np.testing.assert_allclose(at, 0.0, atol=1e-6)
  assert np.all(np.asarray(away) > 1e-3)
  assert np.all(np.isfinite(g)) and np.all(np.isfinite(g_away))


def test_hmc_objective_zero_at_truth_positive_away(toy):
  bundle, z_true, obs = toy
  assert float(jnp.mean(obs["hmc_mask"])) > 0.3  # the crops see the mesh
  vg = jax.jit(jax.vmap(jax.value_and_grad(fit.hmc_objective), in_axes=(0, 0, None)))
  at, _ = vg(z_true, obs, bundle)
  np.testing.assert_allclose(at, 0.0, atol=1e-10)
  v, g = vg(z_true + 0.3, obs, bundle)
  assert (
    np.all(np.asarray(v) > 1e-5)
    and np.all(np.isfinite(g))
    and np.all(np.linalg.norm(g, axis=-1) > 0)
  )
  # Without a mask key every pixel counts; NaN pixels in the target are ignored.
  o2 = {k: v for k, v in obs.items() if k != "hmc_mask"}
  o2["hmc"] = o2["hmc"].at[:, 0, 0, 0, 0].set(jnp.nan)
  v2, g2 = vg(z_true + 0.3, o2, bundle)
  assert np.all(np.isfinite(v2)) and np.all(np.isfinite(g2))


def test_fit_hmc_reduces_loss_and_error(toy):
  bundle, z_true, obs = toy
  res = fit.fit_latents(
    bundle, obs, method="dam_fit", input="hmc", num_steps=60, lr=0.05, lambda_prior=1e-4
  )
  tr = np.asarray(res.losses["obs"])
  assert np.all(tr[:, -1] < 0.2 * tr[:, 0]), tr[:, [0, -1]]


def test_robust_costs_agree_near_zero_and_huber_is_linear_far():
  d2 = jnp.array([0.0, 1e-4, 0.25, 4.0, 100.0])
  np.testing.assert_allclose(fit.huber_cost(d2[:3]), fit.l2_cost(d2[:3]), rtol=1e-6)
  np.testing.assert_allclose(fit.huber_cost(d2[3:]), 2 * jnp.sqrt(d2[3:]) - 1, rtol=1e-6)
  assert (
    float(fit.geman_mcclure_cost(jnp.float32(1e8))) <= 1.0 < float(fit.huber_cost(jnp.float32(1e8)))
  )
  for cost in fit.ROBUST_COSTS.values():
    g = jax.grad(lambda x, c=cost: jnp.sum(c(x)))(d2)
    assert np.all(np.isfinite(g))


def test_nan_keypoints_are_invisible_and_give_finite_gradients(toy):
  bundle, z_true, obs = toy
  o = dict(_frame(obs, 0))
  kp = np.array(o["keypoints"])
  kp[:5] = np.nan
  kp[6, 1] = np.inf
  o_nan = dict(o, keypoints=jnp.asarray(kp))
  vis = np.ones(P, np.float32)
  vis[:5] = 0
  vis[6] = 0
  kp_clean = np.array(o["keypoints"])
  o_inv = dict(o, keypoints=jnp.asarray(kp_clean), keypoints_visible=jnp.asarray(vis))
  z = z_true[0] + 0.2
  vg = jax.jit(jax.value_and_grad(fit.keypoint_objective))
  v1, g1 = vg(z, o_nan, bundle)
  v2, g2 = vg(z, o_inv, bundle)
  assert np.all(np.isfinite(g1))
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-6)
  # No visible keypoint at all: zero objective, zero gradient.
  o_none = dict(o, keypoints=jnp.full((P, 2), jnp.nan))
  v, g = vg(z, o_none, bundle)
  assert float(v) == 0.0 and np.all(np.asarray(g) == 0.0)


# --------------------------------------------------------------------------------------------------
# priors
def test_priors_match_closed_forms(toy):
  bundle, z_true, obs = toy
  aug = fit.condition_stats(bundle, obs, "keypoints")
  o = _frame(aug, 1)
  z = z_true[1]
  params = bundle.variables["params"]
  s = params["flow_log_scale"]
  t = bundle.model.apply(bundle.variables, o["prior_h"][None], method=lambda m, h: m.flow_shift(h))[
    0
  ]
  # z = y exp(s) + t with y ~ N(mu, sigma^2)  =>  z ~ N(mu exp(s) + t, (sigma exp(s))^2).
  expected = fit.gaussian_nll(z, o["prior_mu"] * jnp.exp(s) + t, o["prior_logstd"] + s)
  np.testing.assert_allclose(fit.lipflow_prior(z, o, bundle, name="keypoints"), expected, rtol=1e-5)
  np.testing.assert_allclose(
    fit.standard_normal_prior(z, o, bundle),
    0.5 * jnp.sum(z * z) + 0.5 * Z * np.log(2 * np.pi),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    fit.conditional_gaussian_prior(o["prior_mu"], o, bundle),
    jnp.sum(o["prior_logstd"]) + 0.5 * Z * np.log(2 * np.pi),
    rtol=1e-5,
  )
  assert float(fit.no_prior(z, o, bundle)) == 0.0
  # The negative log density is smallest at the mode f(mu_c) and grows away from it.
  mode = bundle.model.apply(
    bundle.variables, {k: v[1:2] for k, v in obs.items()}, "keypoints", method="prior_mode"
  )[0]
  assert float(fit.lipflow_prior(mode + 0.2, o, bundle)) > float(fit.lipflow_prior(mode, o, bundle))


# --------------------------------------------------------------------------------------------------
# fitting
def test_fit_recovers_mesh_from_keypoints(toy):
  bundle, z_true, obs = toy
  res = fit.fit_latents(bundle, obs, method="none", input="keypoints", num_steps=300, lr=0.05)
  chex.assert_shape(res.z, (3, Z))
  chex.assert_shape(res.losses["total"], (3, 300))
  verts = jax.vmap(lambda z: fit.decode_verts(bundle, z))
  err = jnp.linalg.norm(verts(res.z) - verts(z_true), axis=-1).mean(-1)
  err0 = jnp.linalg.norm(verts(jnp.zeros_like(z_true)) - verts(z_true), axis=-1).mean(-1)
  assert np.all(np.asarray(err) < 0.02 * np.asarray(err0)), (err, err0)
  assert np.all(
    np.asarray(res.losses["total"][:, -1]) < 1e-2 * np.asarray(res.losses["total"][:, 0])
  )


def test_nan_keypoints_do_not_produce_nan_codes(toy):
  bundle, _, obs = toy
  kp = np.array(obs["keypoints"])
  kp[0, :4] = np.nan
  kp[1, :] = np.nan  # a frame with no keypoint at all
  kp[2, 3, 0] = -np.inf
  obs_nan = dict(obs, keypoints=jnp.asarray(kp))
  for method in ("dam_fit", "lipflow", "conditional_gaussian"):
    res = fit.fit_latents(bundle, obs_nan, method=method, num_steps=30, lr=0.05, lambda_prior=0.1)
    assert np.all(np.isfinite(res.z)), method
    assert np.all(np.isfinite(res.losses["total"])), method


@pytest.mark.parametrize("method,space", [("dam_fit", "z"), ("lipflow", "z"), ("lipflow", "y")])
def test_jitted_vmapped_fit_equals_per_frame_fit(toy, method, space):
  bundle, _, obs = toy
  obs = {k: v[:2] for k, v in obs.items() if k.startswith(("keypoints", "frontal"))}
  kw = dict(method=method, num_steps=12, lr=0.05, lambda_prior=0.1, space=space)
  batched = fit.fit_latents(bundle, obs, **kw)
  # The same optimisation frame by frame and step by step, without jit.
  cfg = fit.fit_config(method, "keypoints", **{k: v for k, v in kw.items() if k != "method"})
  reference = fit.fit_unjitted(bundle, obs, cfg)
  np.testing.assert_allclose(batched.z, reference.z, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
    batched.losses["total"], reference.losses["total"], rtol=1e-4, atol=1e-4
  )
  # One frame at a time through the jitted function gives the same codes as the batch.
  single = fit.fit_latents(bundle, {k: v[1:2] for k, v in obs.items()}, **kw)
  np.testing.assert_allclose(batched.z[1], single.z[0], rtol=1e-4, atol=1e-5)


def test_traced_prior_weight_equals_static_one(toy):
  bundle, _, obs = toy
  obs = {k: v[:2] for k, v in obs.items() if k.startswith(("keypoints", "frontal"))}
  cfg = fit.fit_config("lipflow", "keypoints", num_steps=10, lr=0.05, lambda_prior=1.0)
  for lam in (0.0, 0.3):
    static = fit.fit_latents(bundle, obs, config=dataclasses.replace(cfg, lambda_prior=lam))
    traced = fit.fit_jit(bundle, obs, None, cfg, jnp.float32(lam))
    np.testing.assert_allclose(traced.z, static.z, rtol=1e-5, atol=1e-6)
  # ... and the weight matters: the two fits differ.
  assert not np.allclose(
    fit.fit_jit(bundle, obs, None, cfg, jnp.float32(0.0)).z,
    fit.fit_jit(bundle, obs, None, cfg, jnp.float32(0.3)).z,
    atol=1e-4,
  )


def test_sequence_mode_warm_starts_from_previous_frame(toy):
  bundle, _, obs = toy
  kw = dict(method="dam_fit", num_steps=20, lr=0.05, lambda_prior=0.1)
  seq = fit.fit_latents(bundle, obs, sequence=True, warm_steps=10, **kw)
  z_prev = None
  for i in range(3):
    o = {k: v[i : i + 1] for k, v in obs.items()}
    if z_prev is None:
      r = fit.fit_latents(bundle, o, **kw)
    else:
      r = fit.fit_latents(
        bundle,
        o,
        init="given",
        z0=z_prev,
        num_steps=10,
        **{k: v for k, v in kw.items() if k != "num_steps"},
      )
    np.testing.assert_allclose(seq.z[i], r.z[0], rtol=1e-4, atol=1e-5)
    z_prev = r.z
  chex.assert_shape(seq.losses["total"], (3, 20))


def test_prior_mode_init_and_learned_prior_pull_towards_mode(toy):
  bundle, _, obs = toy
  res0 = fit.fit_latents(bundle, obs, method="lipflow", num_steps=0)
  mode = bundle.model.apply(bundle.variables, obs, "keypoints", method="prior_mode")
  np.testing.assert_allclose(res0.z, mode, rtol=1e-5, atol=1e-6)
  # With only the prior term (no observation), fitting from zeros converges to the prior mode.
  cfg = fit.FitConfig(
    objectives=(), prior="lipflow", condition="keypoints", init="zeros", num_steps=400, lr=0.05
  )
  res = fit.fit_latents(bundle, obs, config=cfg)
  np.testing.assert_allclose(res.z, mode, atol=2e-2)


def test_fit_config_rejects_bad_arguments():
  with pytest.raises(ValueError):
    fit.fit_config("nope")
  with pytest.raises(ValueError):
    fit.FitConfig(space="w")
  with pytest.raises(ValueError):
    fit.FitConfig(prior="gaussian", space="y")
  with pytest.raises(ValueError):
    fit.FitConfig(num_steps=5, warm_steps=6)


class _ToyRegressor(nn.Module):
  """Maps a condition batch to codes (stands in for ``models.Regressor``)."""

  @nn.compact
  def __call__(self, batch):
    kp, valid = jax.vmap(fit.sanitize_keypoints)(batch["keypoints"], batch.get("keypoints_visible"))
    return nn.Dense(Z)((kp * valid[..., None] / 100.0).reshape(kp.shape[0], -1))


def test_regressor_initialisation(toy):
  bundle, _, obs = toy
  reg = _ToyRegressor()
  reg_vars = reg.init(jax.random.PRNGKey(3), obs)
  b = bundle.replace(regressors=(("keypoints", reg),), regressor_variables={"keypoints": reg_vars})
  res = fit.fit_latents(b, obs, method="dam_fit", init="regressor", num_steps=0)
  np.testing.assert_allclose(res.z, reg.apply(reg_vars, obs), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError):
    fit.fit_latents(bundle, obs, method="dam_fit", init="regressor", num_steps=0)
