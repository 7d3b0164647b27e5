"""Tests of lipflow_jax.models: flows, encoders, decoder, the composed model and the losses."""

from absl.testing import parameterized
import chex
import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lipflow_jax import models as M
from lipflow_jax.models import layers

B, T, V, P, Z = 3, 16, 200, 20, 8
KP_IMAGE = (64, 48)  # (H, W) of the frontal image.
SMALL = dict(
  num_vertices=V,
  z_dim=Z,
  tex_size=T,
  dec_channels=(16,),
  dec_start_channels=16,
  dec_z_features=32,
  enc_channels=(8, 16),
  enc_tex_features=32,
  enc_vert_features=32,
  context_dim=16,
  keypoint_hidden=(32,),
  hmc_channels=(8, 16),
  hmc_features=16,
  image_channels=(8, 16),
  flow_layers=2,
  flow_hidden=(32,),
  keypoint_image_size=KP_IMAGE,
  num_cameras=4,
)
BOTH = ("keypoints", "hmc")


def key(seed):
  """A typed 'rbg' PRNG key: XLA on CPU compiles its random ops ~10x faster than threefry's."""
  return jax.random.key(seed, impl="rbg")


def make_batch(seed=0, b=B, t=T):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  view = f(b, 3)
  batch = dict(
    verts=f(b, V, 3),
    avg_tex=f(b, t, t, 3),
    tex=f(b, t, t, 3),
    tex_mask=(rng.random((b, t, t, 1)) > 0.3).astype(np.float32),
    view=view / np.linalg.norm(view, axis=-1, keepdims=True),
    camera_index=np.arange(b, dtype=np.int32) % 4,
    keypoints=(rng.random((b, P, 2)) * np.array([KP_IMAGE[1], KP_IMAGE[0]])).astype(np.float32),
    keypoints_visible=(rng.random((b, P)) > 0.3).astype(np.float32),
    hmc=rng.random((b, 3, 16, 16, 1)).astype(np.float32),
    image_frontal=rng.random((b, 16, 16, 3)).astype(np.float32),
    segment=np.zeros((b,), np.int32),  # An unknown key: ignored.
  )
  return jax.tree.map(jnp.asarray, batch)


def perturb(tree, key, scale):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
    treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


def init_model(model, batch, seed=0):
  rngs = {"params": key(seed), "sample": key(seed + 1)}
  return model.init(rngs, batch)


@pytest.fixture(scope="module")
def batch():
  return make_batch()


@pytest.fixture(scope="module")
def models(batch):
  """One small model per prior (conditional ones carry both conditions) with its variables."""
  out = {}
  for prior in M.PRIORS:
    model = M.LipFlowModel(prior=prior, conditions=BOTH, **SMALL)
    out[prior] = (model, init_model(model, batch))
  return out


# -----------------------------------------------------------------------------------------------
# flow

# Unconditional flows (no context) are covered by the 'flow' prior in test_outputs_and_methods.
FLOW_CASES = [("spline", "spline", True), ("affine", "affine", True)]


def _flow_and_vars(bijector, use_context, z_dim=6, mask="checkerboard"):
  flow = M.LatentFlow(
    z_dim,
    num_layers=2,
    hidden=(16,),
    bijector=bijector,
    range_bound=3.0,
    use_context=use_context,
    mask=mask,
  )
  y = 1.5 * jax.random.normal(key(0), (5, z_dim))
  h = jax.random.normal(key(1), (5, 4)) if use_context else None
  variables = perturb(flow.init(key(2), y, h), key(3), 0.1)
  return flow, variables, y, h


class FlowTest(parameterized.TestCase):
  @parameterized.named_parameters(*FLOW_CASES)
  def test_inverse_undoes_forward(self, bijector, use_context):
    flow, variables, y, h = _flow_and_vars(bijector, use_context)
    z, ld_fwd = flow.apply(variables, y, h, method="forward")
    y2, ld_inv = flow.apply(variables, z, h, method="inverse")
    chex.assert_shape([z, y2], y.shape)
    chex.assert_shape([ld_fwd, ld_inv], y.shape[:1])
    self.assertGreater(float(jnp.max(jnp.abs(z - y))), 1e-2)  # Not the identity after perturbation.
    np.testing.assert_allclose(y2, y, atol=1e-4)
    np.testing.assert_allclose(ld_fwd, -ld_inv, atol=1e-4)

  @parameterized.named_parameters(*FLOW_CASES)
  def test_logdet_matches_jacobian(self, bijector, use_context):
    flow, variables, y, h = _flow_and_vars(bijector, use_context, mask="half")
    _, ld = flow.apply(variables, y, h)
    jac = jax.jit(
      jax.vmap(jax.jacfwd(lambda yi, hi: flow.apply(variables, yi[None], hi[None])[0][0]))
    )(y, h)
    np.testing.assert_allclose(ld, jnp.linalg.slogdet(jac)[1], atol=1e-4)

  @parameterized.parameters("checkerboard", "half")
  def test_spline_flow_matches_distrax_reference(self, mask):
    """Same parameters, same function: the flow against a chain of distrax MaskedCoupling layers
    with distrax's RationalQuadraticSpline on the full outputs of the conditioner MLPs."""
    flow, variables, y, h = _flow_and_vars("spline", True, mask=mask)
    shape = (flow.z_dim, flow.params_per_dim)

    def coupling(i, m):
      net = layers.MLP(tuple(flow.hidden) + (np.prod(shape),), zero_init_last=True)
      net_vars = {"params": variables["params"][f"coupling_{i}"]}
      cond = lambda x: net.apply(net_vars, jnp.concatenate([x, h], -1)).reshape(
        x.shape[:-1] + shape
      )
      inner = lambda q: distrax.RationalQuadraticSpline(
        layers.soft_clip(q, flow.max_spline_param),
        -flow.range_bound,
        flow.range_bound,
        boundary_slopes="identity",
      )
      return distrax.MaskedCoupling(jnp.asarray(m), cond, inner, event_ndims=1)

    masks = M.coupling_masks(flow.z_dim, flow.num_layers, mask)
    ref = distrax.Chain([coupling(i, m) for i, m in enumerate(masks)][::-1])
    for method, ref_fn in (
      ("forward", ref.forward_and_log_det),
      ("inverse", ref.inverse_and_log_det),
    ):
      out, ld = flow.apply(variables, y, h, method=method)
      ref_out, ref_ld = ref_fn(y)
      np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(ld, ref_ld, rtol=1e-5, atol=1e-5)

  def test_masks_alternate(self):
    m = M.coupling_masks(5, 4, "checkerboard")
    np.testing.assert_array_equal(m[0], [True, False, True, False, True])
    np.testing.assert_array_equal(m[1], ~m[0])
    np.testing.assert_array_equal(M.coupling_masks(4, 2, "half")[0], [True, True, False, False])

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "bijector"):
      M.LatentFlow(4, bijector="glow")
    with self.assertRaisesRegex(ValueError, "z_dim >= 2"):
      M.LatentFlow(1)
    flow = M.LatentFlow(4, hidden=(8,))
    with self.assertRaisesRegex(ValueError, "context"):
      flow.init(key(0), jnp.zeros((1, 4)))


@pytest.mark.parametrize(
  "weight_norm,zero_init_last", [(False, False), (True, False), (True, True)]
)
def test_mlp_out_columns_equal_the_full_output_sliced(weight_norm, zero_init_last):
  """``MLP(x, out_columns=c)`` computes only the last layer's columns c (the flow's couplings read
  the parameters of the dimensions they transform): equal to the full output's columns c, values
  and gradients, for a non-contiguous, unordered c (weight norm on the last layer or, with a
  zero-initialised last layer, on the others only)."""
  mlp = layers.MLP((8, 6, 10), weight_norm=weight_norm, zero_init_last=zero_init_last)
  x = jax.random.normal(key(0), (3, 5))
  variables = perturb(mlp.init(key(1), x), key(2), 0.5)
  cols = np.array([7, 0, 3, 4, 9])
  sliced = lambda v: mlp.apply(v, x)[..., cols]
  picked = lambda v: mlp.apply(v, x, out_columns=cols)
  np.testing.assert_allclose(picked(variables), sliced(variables), rtol=1e-6, atol=1e-6)
  g_picked = jax.grad(lambda v: jnp.sum(jnp.sin(picked(v))))(variables)
  g_sliced = jax.grad(lambda v: jnp.sum(jnp.sin(sliced(v))))(variables)
  for a, b in zip(jax.tree_util.tree_leaves(g_picked), jax.tree_util.tree_leaves(g_sliced)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- encoders


def test_keypoint_encoder_ignores_invisible(batch):
  net = M.KeypointNet(KP_IMAGE, hidden=(32,), features=16)
  kp, vis = batch["keypoints"], batch["keypoints_visible"]
  variables = net.init(key(0), kp, vis)
  h = net.apply(variables, kp, vis)
  invisible = (vis < 0.5)[..., None]
  assert bool(jnp.any(invisible))
  for junk in (1e4, jnp.nan):
    h2 = net.apply(variables, jnp.where(invisible, junk, kp), vis)
    np.testing.assert_array_equal(h, h2)
  # A visible keypoint does change the output; a NaN keypoint counts as invisible.
  moved = kp.at[:, :, 0].add(jnp.where(vis > 0.5, 5.0, 0.0))
  assert float(jnp.max(jnp.abs(net.apply(variables, moved, vis) - h))) > 0
  nan_kp = kp.at[0, 0].set(jnp.nan)
  vis0 = vis.at[0, 0].set(0.0)
  np.testing.assert_array_equal(net.apply(variables, nan_kp, vis), net.apply(variables, kp, vis0))


def test_condition_encoders_and_regressor_shapes(batch):
  for cond in M.CONDITIONS:
    e = M.ConditionEncoder(
      cond,
      Z,
      features=16,
      keypoint_image_size=KP_IMAGE,
      keypoint_hidden=(32,),
      hmc_channels=(8,),
      hmc_features=8,
      image_channels=(8,),
    )
    mu, logstd, h = e.apply(e.init(key(0), batch), batch)
    chex.assert_shape([mu, logstd], (B, Z))
    chex.assert_shape(h, (B, 16))
    assert float(jnp.max(jnp.abs(logstd))) < 5.0
    r = M.Regressor(
      cond,
      Z,
      features=16,
      keypoint_image_size=KP_IMAGE,
      keypoint_hidden=(32,),
      hmc_channels=(8,),
      hmc_features=8,
      image_channels=(8,),
    )
    params = r.init(key(0), batch)["params"]
    chex.assert_shape(r.apply({"params": params}, batch), (B, Z))
    if cond != "keypoints":
      continue
    target = jnp.ones((B, Z))
    (loss, metrics), grads = jax.value_and_grad(
      lambda p, bt: M.regressor_loss(r, p, bt, target), has_aux=True
    )(params, batch)
    assert np.isfinite(float(loss)) and float(loss) == float(metrics["regressor_mse"])
    chex.assert_tree_all_finite(grads)


def test_encoder_bad_arguments(batch):
  with pytest.raises(ValueError, match="Unknown condition"):
    M.ConditionEncoder("audio", Z)
  with pytest.raises(ValueError, match="keypoint_image_size"):
    M.ConditionNet("keypoints")
  with pytest.raises(ValueError, match="hmc must be"):
    net = M.HMCNet()
    net.init(key(0), batch["hmc"][:, :2])
  e = M.ConditionEncoder("hmc", Z)
  with pytest.raises(ValueError, match="needs batch keys"):
    e.init(key(0), {"verts": batch["verts"]})


# ------------------------------------------------------------------------------------------ decoder


@pytest.mark.parametrize(
  "tex_size,channels,upsample,weight_norm",
  [(8, (), "resize", False), (16, (8,), "transpose", False), (32, (8, 4), "resize", True)],
)
def test_decoder_shapes(tex_size, channels, upsample, weight_norm):
  dec = M.Decoder(
    tex_size,
    V,
    z_features=16,
    start_channels=8,
    channels=channels,
    upsample=upsample,
    num_cameras=3,
    weight_norm=weight_norm,
  )
  z, view = jnp.ones((2, Z)), jnp.ones((2, 3)) / np.sqrt(3.0)
  cam = jnp.array([0, 2], jnp.int32)
  variables = dec.init(key(0), z, view, cam)
  tex, verts = dec.apply(variables, z, view, cam)
  chex.assert_shape(tex, (2, tex_size, tex_size, 3))
  chex.assert_shape(verts, (2, V, 3))
  # The per-camera colour gain/bias is the identity at initialisation.
  tex_none, _ = dec.apply(variables, z, view, None)
  np.testing.assert_allclose(tex, tex_none, atol=1e-6)


@pytest.mark.parametrize("weight_norm", [False, True])
def test_upsample_conv_equals_conv_of_the_upsampled_input(weight_norm):
  """The decoder's 'resize' layer as a sub-pixel conv (``layers.upsample_conv``) equals the 3x3 SAME
  conv of the nearest 2x upsampled input with the same parameters: values and gradients (input
  and parameters), odd sizes and channel counts, with and without weight norm."""
  x = jax.random.normal(key(0), (2, 5, 3, 7))
  phase = layers.conv(5, 3, 1, weight_norm, conv_general_dilated=layers.upsample_conv)
  plain = layers.conv(5, 3, 1, weight_norm)
  variables = perturb(phase.init(key(1), x), key(2), 0.5)
  assert jax.tree.structure(variables) == jax.tree.structure(
    plain.init(key(1), layers.upsample_nearest(x))
  )
  fast = lambda v, x: phase.apply(v, x)
  ref = lambda v, x: plain.apply(v, layers.upsample_nearest(x))
  chex.assert_shape(fast(variables, x), (2, 10, 6, 5))
  np.testing.assert_allclose(fast(variables, x), ref(variables, x), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda v, x: jnp.sum(jnp.sin(f(v, x)) * jnp.arange(5.0))
  g_fast = jax.grad(loss(fast), argnums=(0, 1))(variables, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  with pytest.raises(ValueError, match="3x3 stride-1 SAME"):
    layers.conv(5, 3, 2, conv_general_dilated=layers.upsample_conv).init(key(1), x)


def test_decoder_bad_arguments():
  with pytest.raises(ValueError, match="len\\(channels\\) == 2"):
    M.Decoder(16, V, start_size=2, channels=(8,))
  with pytest.raises(ValueError, match="power of 2"):
    M.Decoder(24, V, channels=(8,))
  with pytest.raises(ValueError, match="upsample"):
    M.Decoder(16, V, channels=(8,), upsample="pixelshuffle")


# ------------------------------------------------------------------------------------ composed
# model


def _methods(model, variables, batch, name):
  """Everything the public methods return for one prior name (traced once under jit)."""
  ap = lambda *a, **kw: model.apply(variables, *a, **kw)
  r = {"out": ap(batch, rngs={"sample": key(5)})}
  z = r["out"]["z"]
  r["encode"] = ap(batch["avg_tex"], batch["verts"], method="encode")
  r["decode"] = ap(z, batch["view"], batch["camera_index"], method="decode")
  r["log_p"] = ap(z, batch, name, method="prior_log_prob")
  base = ap(batch, name, method="prior_base")
  r["log_p_base"] = ap(z, *base, name, method="prior_log_prob_from_base")
  r["mode"] = ap(batch, name, method="prior_mode")
  r["samples"] = ap(key(0), batch, name, 4, method="prior_sample")
  h = None
  if model.is_conditional:
    r["cond"] = ap(batch, name, method="encode_condition")
    h = r["cond"][2]
  if model.prior in ("lipflow", "flow"):
    r["inv"] = ap(r["samples"], h, name, method="flow_inverse")
    r["fwd"] = ap(r["inv"][0], h, name, method="flow_forward")
  return r


@pytest.mark.parametrize("prior", M.PRIORS)
def test_outputs_and_methods(models, batch, prior):
  model, variables = models[prior]
  names = BOTH if prior in M.CONDITIONAL_PRIORS else (M.UNCONDITIONAL,)
  for key in names:
    name = None if key == M.UNCONDITIONAL else key
    r = _methods(model, variables, batch, name)
    out = r["out"]
    chex.assert_shape([out["mu"], out["logstd"], out["z"]], (B, Z))
    chex.assert_shape(out["tex"], (B, T, T, 3))
    chex.assert_shape(out["verts"], (B, V, 3))
    assert set(out["log_p"]) == set(names) and set(out["kl"]) == set(names)
    chex.assert_shape([out["log_q"]] + list(out["log_p"].values()) + list(out["kl"].values()), (B,))
    chex.assert_tree_all_finite(r)
    np.testing.assert_allclose(r["encode"][0], out["mu"], atol=1e-6)
    np.testing.assert_allclose(r["decode"][0], out["tex"], atol=1e-5)
    np.testing.assert_allclose(r["log_p"], out["log_p"][key], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(r["log_p_base"], r["log_p"], rtol=1e-5, atol=1e-4)
    chex.assert_shape(r["mode"], (B, Z))
    chex.assert_shape(r["samples"], (4, B, Z))
    if prior == "gaussian":
      np.testing.assert_array_equal(r["mode"], 0.0)
    if prior in M.CONDITIONAL_PRIORS:
      mu_c, logstd_c, h = r["cond"]
      chex.assert_shape([mu_c, logstd_c], (B, Z))
      chex.assert_shape(h, (B, SMALL["context_dim"]))
      np.testing.assert_allclose(mu_c, out["prior_mu"][key], atol=1e-6)
      # The flows start as the identity, so the prior mode is mu_c for both conditional priors.
      np.testing.assert_allclose(r["mode"], mu_c, atol=1e-5)
    if prior in ("lipflow", "flow"):
      (y, ld_inv), (z, ld_fwd) = r["inv"], r["fwd"]
      chex.assert_shape(ld_inv, (4, B))  # Samples [4, B, Z] with the context h [B, H].
      # Zero-initialised conditioners: the flows start as the identity.
      np.testing.assert_allclose(y, r["samples"], atol=1e-5)
      np.testing.assert_allclose(ld_inv, 0.0, atol=1e-5)
      np.testing.assert_allclose(z, r["samples"], atol=1e-5)
      np.testing.assert_allclose(ld_inv, -ld_fwd, atol=1e-5)


def test_every_submodule_has_params(models):
  _, v = models["lipflow"]
  assert set(v["params"]) == {
    "encoder",
    "decoder",
    "condition_encoders_keypoints",
    "condition_encoders_hmc",
    "flows_keypoints",
    "flows_hmc",
  }
  assert set(models["flow"][1]["params"]) == {"encoder", "decoder", "flows_unconditional"}


def test_direct_encoder_baseline(batch):
  for cond in ("keypoints", "hmc"):
    model = M.LipFlowModel(prior="gaussian", encoder_input=cond, conditions=(), **SMALL)
    variables = init_model(model, batch)
    apply = lambda v, bt: model.apply(v, bt, train=False)
    out = apply(variables, batch)
    chex.assert_shape(out["z"], (B, Z))
    np.testing.assert_array_equal(out["z"], out["mu"])
    # The direct encoder never reads x: changing it leaves the output unchanged.
    batch2 = dict(batch, avg_tex=batch["avg_tex"] + 1.0, verts=batch["verts"] + 1.0)
    np.testing.assert_array_equal(apply(variables, batch2)["tex"], out["tex"])
    with pytest.raises(ValueError, match="encode_input"):
      model.apply(variables, batch["avg_tex"], batch["verts"], method="encode")


class JitTest(chex.TestCase):
  """The jitted functions against the plain eager calls (the references; a ``without_jit`` variant
  would compare an eager call with itself)."""

  @chex.variants(with_jit=True)
  def test_flow_jit_matches_no_jit(self):
    flow, variables, y, h = _flow_and_vars("spline", True)
    fwd = self.variant(lambda v, y, h: flow.apply(v, y, h, method="forward"))
    inv = self.variant(lambda v, z, h: flow.apply(v, z, h, method="inverse"))
    z, ld = fwd(variables, y, h)
    y2, ld2 = inv(variables, z, h)
    ref_z, ref_ld = flow.apply(variables, y, h)
    np.testing.assert_allclose(z, ref_z, atol=1e-5)
    np.testing.assert_allclose(ld, ref_ld, atol=1e-5)
    np.testing.assert_allclose(y2, y, atol=1e-4)
    np.testing.assert_allclose(ld2, -ld, atol=1e-4)

  @chex.variants(with_jit=True)
  def test_jit_matches_no_jit(self):
    batch = make_batch(1)
    model = M.LipFlowModel(prior="lipflow", conditions=BOTH, **SMALL)
    variables = init_model(model, batch)
    rng = key(3)

    @self.variant
    def loss_fn(params, batch, rng):
      return M.model_loss(model, params, batch, rng, weights={"kl": 0.1})

    loss, metrics = loss_fn(variables["params"], batch, rng)
    ref_loss, ref_metrics = M.model_loss(
      model, variables["params"], batch, rng, weights={"kl": 0.1}
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    chex.assert_trees_all_close(metrics, ref_metrics, rtol=1e-4, atol=1e-6)


def _mc_vs_analytic(model, variables, batch, analytic_fn, n=4000):
  keys = jax.random.split(key(11), n)
  kls = jax.jit(jax.vmap(lambda k: model.apply(variables, batch, rngs={"sample": k})["kl"]))(keys)
  out = model.apply(variables, batch, train=False)
  for name, samples in kls.items():
    analytic = analytic_fn(out, name)
    mean, std = jnp.mean(samples, 0), jnp.std(samples, 0)
    tol = 5.0 * std / np.sqrt(n) + 1e-4
    assert float(jnp.min(analytic)) > 0.05  # A non-trivial KL.
    np.testing.assert_array_less(jnp.abs(mean - analytic), tol)


def _spread_posterior_and_prior(variables, key):
  """Moves q(z|x) and p(y|c) away from N(0, I) so that the KLs are not tiny (flows stay the
  identity)."""
  params = jax.tree.map(lambda x: x, variables["params"])
  k1, k2 = jax.random.split(key)
  head = params["encoder"]["head"]
  head["bias"] = jnp.concatenate(
    [10.0 * jax.random.normal(k1, (Z,)), 40.0 * jax.random.normal(k2, (Z,))]
  )
  for name in list(params):
    if name.startswith("condition_encoders_"):
      params[name]["head"]["bias"] = 0.5 * jax.random.normal(
        jax.random.fold_in(key, len(name)), (2 * Z,)
      )
  return {"params": params}


@pytest.mark.parametrize("prior", ["lipflow", "flow"])
def test_monte_carlo_kl_matches_analytic_for_identity_flow(models, batch, prior):
  model, variables = models[prior]
  variables = _spread_posterior_and_prior(variables, key(4))
  if prior == "lipflow":
    fn = lambda out, name: M.gaussian_kl(
      out["mu"], out["logstd"], out["prior_mu"][name], out["prior_logstd"][name]
    )
  else:
    fn = lambda out, name: M.gaussian_kl(out["mu"], out["logstd"])
  _mc_vs_analytic(model, variables, batch, fn)


def _grad_norms(grads):
  return {name: optax.global_norm(g) for name, g in grads.items()}


# 'lipflow' is covered by the training test; 'gaussian' is the special case mu_c = 0, logstd_c = 0
# of 'conditional_gaussian' (same code path).
@pytest.mark.parametrize("prior", ["conditional_gaussian", "flow"])
def test_gradients_finite(models, batch, prior):
  model, variables = models[prior]
  grads = jax.jit(jax.grad(lambda p: M.model_loss(model, p, batch, key(0))[0]))(variables["params"])
  chex.assert_tree_all_finite(grads)
  norms = _grad_norms(grads)
  assert all(float(n) > 0 for n in norms.values()), norms  # Every submodule gets a training signal.


def test_full_multiface_size_is_expressible():
  b = 2
  model = M.LipFlowModel(
    num_vertices=7306,
    z_dim=256,
    tex_size=1024,
    prior="lipflow",
    conditions=BOTH,
    enc_channels=(16, 16, 32, 32, 64, 64, 128, 128),
    enc_tex_features=256,
    enc_vert_features=256,
    dec_z_features=256,
    dec_start_channels=256,
    dec_channels=(256, 64, 64, 32, 32, 16, 16),
    dec_upsample="transpose",
    num_cameras=40,
    weight_norm=True,
    keypoint_image_size=(2048, 1334),
  )
  spec = jax.ShapeDtypeStruct
  batch = dict(
    verts=spec((b, 7306, 3), jnp.float32),
    avg_tex=spec((b, 1024, 1024, 3), jnp.float32),
    view=spec((b, 3), jnp.float32),
    camera_index=spec((b,), jnp.int32),
    keypoints=spec((b, 68, 2), jnp.float32),
    keypoints_visible=spec((b, 68), jnp.float32),
    hmc=spec((b, 3, 64, 64, 1), jnp.float32),
  )
  shapes = jax.eval_shape(lambda bt: init_model(model, bt), batch)  # Traces only: no compilation.
  enc_kernel = shapes["params"]["encoder"]["tex"]["conv_7"]["layer"]["kernel"]
  assert enc_kernel.shape == (4, 4, 128, 128)
  assert shapes["params"]["decoder"]["tex_bias"]["bias"].shape == (1024, 1024, 3)
  out = jax.eval_shape(lambda v, bt: model.apply(v, bt, train=False), shapes, batch)
  assert out["tex"].shape == (b, 1024, 1024, 3) and out["verts"].shape == (b, 7306, 3)


def test_model_bad_arguments():
  with pytest.raises(ValueError, match="Unknown prior"):
    M.LipFlowModel(prior="vamp", **SMALL)
  with pytest.raises(ValueError, match="Unknown condition"):
    M.LipFlowModel(conditions=("audio",), **SMALL)
  with pytest.raises(ValueError, match="at least one condition"):
    M.LipFlowModel(prior="lipflow", conditions=(), **SMALL)
  with pytest.raises(ValueError, match="sequence of names"):
    M.LipFlowModel(conditions="hmc", **SMALL)
  with pytest.raises(ValueError, match="len\\(channels\\)"):
    M.LipFlowModel(**dict(SMALL, tex_size=32))
  with pytest.raises(ValueError, match="keypoint_image_size"):
    M.LipFlowModel(**dict(SMALL, keypoint_image_size=None))
  with pytest.raises(ValueError, match="encoder_input"):
    M.LipFlowModel(encoder_input="audio", **SMALL)
  with pytest.raises(ValueError, match="flow_bijector"):
    M.LipFlowModel(flow_bijector="glow", **SMALL)


# ------------------------------------------------------------------------------------------- losses


def test_masked_mse_matches_loop():
  rng = np.random.default_rng(0)
  pred = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  target = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  mask = (rng.random((2, 4, 4, 1)) > 0.5).astype(np.float32)
  num, den = 0.0, 0
  for idx in np.ndindex(2, 4, 4):
    if mask[idx][0]:
      num += float(np.sum((pred[idx] - target[idx]) ** 2))
      den += 3
  np.testing.assert_allclose(M.masked_mse(pred, target, mask), num / den, rtol=1e-5)
  assert float(M.masked_mse(pred, target, np.zeros_like(mask))) == 0.0


def test_gaussian_kl_and_log_prob_reference():
  mu_q, ls_q, mu_p, ls_p = 0.3, -0.2, -0.1, 0.4
  sq, sp = np.exp(ls_q), np.exp(ls_p)
  ref = np.log(sp / sq) + (sq**2 + (mu_q - mu_p) ** 2) / (2 * sp**2) - 0.5
  kl = M.gaussian_kl(
    jnp.full((3,), mu_q), jnp.full((3,), ls_q), jnp.full((3,), mu_p), jnp.full((3,), ls_p)
  )
  np.testing.assert_allclose(kl, 3 * ref, rtol=1e-5)
  x = jnp.array([0.5, -1.0])
  ref_lp = np.sum(
    -0.5 * ((np.array([0.5, -1.0]) - mu_p) / sp) ** 2 - np.log(sp) - 0.5 * np.log(2 * np.pi)
  )
  np.testing.assert_allclose(M.gaussian_log_prob(x, mu_p, ls_p), ref_lp, rtol=1e-5)


def test_model_loss_terms(models, batch):
  model, variables = models["conditional_gaussian"]
  w = {"tex": 2.0, "geo": 3.0, "kl": 0.5}
  loss, m = M.model_loss(model, variables["params"], batch, key(0), weights=w)
  np.testing.assert_allclose(
    loss, 2.0 * m["tex_mse"] + 3.0 * m["geo_mse"] + 0.5 * m["kl"], rtol=1e-5
  )
  np.testing.assert_allclose(m["kl"], 0.5 * (m["kl_keypoints"] + m["kl_hmc"]), rtol=1e-5)
  assert set(m) >= {"tex_mse", "geo_mse", "kl", "latent_nll", "total"}
  # The screen-loss hook.
  fn = lambda out, bt: jnp.mean(out["tex"] ** 2)
  loss2, m2 = M.model_loss(
    model, variables["params"], batch, key(0), weights=dict(w, screen=0.25), screen_loss_fn=fn
  )
  np.testing.assert_allclose(loss2, loss + 0.25 * m2["screen"], rtol=1e-5)
  with pytest.raises(ValueError, match="screen_loss_fn"):
    M.model_loss(model, variables["params"], batch, key(0), weights={"screen": 1.0})
  with pytest.raises(ValueError, match="Unknown loss weights"):
    M.model_loss(model, variables["params"], batch, key(0), weights={"texture": 1.0})


def test_training_reduces_reconstruction_losses(models):
  batch = make_batch(2)
  model, variables = models["lipflow"]
  params = variables["params"]
  opt = optax.adam(2e-3)
  weights = {"tex": 1.0, "geo": 1.0, "kl": 0.01}

  @jax.jit
  def step(params, opt_state, key):
    (_, metrics), grads = jax.value_and_grad(
      lambda p: M.model_loss(model, p, batch, key, weights=weights), has_aux=True
    )(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    metrics["grad_norms"] = _grad_norms(grads)
    metrics["grads_finite"] = jnp.all(
      jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    )
    return optax.apply_updates(params, updates), opt_state, metrics

  opt_state = opt.init(params)
  history = []
  for i in range(200):
    params, opt_state, metrics = step(params, opt_state, key(i))
    history.append(jax.device_get(metrics))
  first, last = history[0], history[-1]
  assert all(np.isfinite(h["total"]) and h["grads_finite"] for h in history)
  # Every submodule (E_x, decoder, both E_c and both flows) gets a gradient from the first step on.
  assert len(first["grad_norms"]) == 6 and all(n > 0 for n in first["grad_norms"].values()), first
  assert last["tex_mse"] < 0.5 * first["tex_mse"], (first, last)
  assert last["geo_mse"] < 0.5 * first["geo_mse"], (first, last)
