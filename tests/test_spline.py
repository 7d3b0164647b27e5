"""Tests of lipflow_jax.models.spline against distrax's rational-quadratic spline."""

from absl.testing import parameterized
import distrax
import jax
import jax.numpy as jnp
import numpy as np

from lipflow_jax.models import spline

RANGE = 3.0


def _params(seed, shape, num_bins, scale=1.0):
  """Random spline parameters [*shape, 3 * num_bins + 1] in float32."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(scale * rng.normal(size=shape + (3 * num_bins + 1,)), jnp.float32)


def _inputs(seed, params, inverse, knots=True):
  """[N, D] inputs for [D, 3K + 1] params: random ones inside and outside [-RANGE, RANGE], the
  ends, just inside the ends, and (``knots``) every knot of each dimension's spline (x knots for the
  forward map, y knots for the inverse)."""
  d = params.shape[0]
  ref = distrax.RationalQuadraticSpline(params, -RANGE, RANGE, boundary_slopes="identity")
  knot_x = np.asarray(ref.y_pos if inverse else ref.x_pos).T  # [K + 1, D]
  ends = np.array([-RANGE, RANGE, -RANGE + 1e-3, RANGE - 1e-3, -10.0, 10.0])[:, None]
  rand = 2.0 * RANGE * np.random.default_rng(seed).normal(size=(40, d))
  parts = [rand, np.broadcast_to(ends, (len(ends), d))] + ([knot_x] if knots else [])
  x = np.concatenate(parts, axis=0)
  return jnp.asarray(x, jnp.float32)


def _maps(inverse):
  """(distrax map, new map): (params, x) -> (out, log-det)."""

  def make(build):
    def f(params, x):
      b = build(params)
      return b.inverse_and_log_det(x) if inverse else b.forward_and_log_det(x)

    return f

  ref = make(
    lambda p: distrax.RationalQuadraticSpline(p, -RANGE, RANGE, boundary_slopes="identity")
  )
  return ref, make(lambda p: spline.RationalQuadraticSpline(p, -RANGE, RANGE))


def _loss(f):
  """A scalar of both outputs that weights every element differently."""

  def loss(params, x):
    out, ld = f(params, x)
    return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(1.3 * ld))

  return loss


def _assert_close_scaled(a, b, rtol):
  """|a - b| <= rtol * max|b| + rtol * |b| elementwise (gradients span decades)."""
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.max(np.abs(b)))


CASES = [
  dict(testcase_name="fwd_8bins", inverse=False, num_bins=8),
  dict(testcase_name="inv_8bins", inverse=True, num_bins=8),
  dict(testcase_name="fwd_3bins", inverse=False, num_bins=3),
  dict(testcase_name="inv_3bins", inverse=True, num_bins=3),
]


class SplineTest(parameterized.TestCase):
  @parameterized.named_parameters(*CASES)
  def test_matches_distrax(self, inverse, num_bins):
    params = _params(0, (7,), num_bins)
    x = _inputs(1, params, inverse)
    ref, new = _maps(inverse)
    out, ld = jax.jit(new)(params, x)
    ref_out, ref_ld = jax.jit(ref)(params, x)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(ld, ref_ld, rtol=1e-5, atol=2e-6)
    # Gradients with respect to the parameters (batched as in a coupling layer) and the inputs.
    grads = jax.jit(jax.grad(_loss(new), (0, 1)))(params, x)
    ref_grads = jax.jit(jax.grad(_loss(ref), (0, 1)))(params, x)
    for g, r in zip(grads, ref_grads):
      _assert_close_scaled(g, r, 1e-5)

  @parameterized.named_parameters(*CASES)
  def test_matches_distrax_per_element_params(self, inverse, num_bins):
    """Params [N, D, 3K + 1] (a spline per element) and wider parameters, under vmap."""
    params = _params(2, (4, 6), num_bins, scale=2.0)
    x = jnp.asarray(4.0 * np.random.default_rng(3).normal(size=(4, 6)), jnp.float32)
    ref, new = _maps(inverse)
    batched = lambda f: jax.jit(jax.vmap(jax.value_and_grad(_loss(f), (0, 1))))
    (val, grads), (ref_val, ref_grads) = batched(new)(params, x), batched(ref)(params, x)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
      _assert_close_scaled(g, r, 1e-5)

  @parameterized.parameters(8, 3)
  def test_inverse_undoes_forward(self, num_bins):
    params = _params(4, (7,), num_bins)
    x = _inputs(5, params, inverse=False)
    b = spline.RationalQuadraticSpline(params, -RANGE, RANGE)
    y, ld = b.forward_and_log_det(x)
    x2, ld2 = b.inverse_and_log_det(y)
    self.assertGreater(float(jnp.max(jnp.abs(y - x))), 0.1)
    # In a flat bin (slope ~1e-3) the float32 inverse loses digits: check the error in y units too.
    np.testing.assert_allclose(x2, x, atol=1e-4)
    np.testing.assert_allclose((x2 - x) * jnp.exp(ld), 0.0, atol=1e-6)
    np.testing.assert_allclose(ld + ld2, 0.0, atol=1e-4)
    outside = np.abs(np.asarray(x)) >= RANGE
    np.testing.assert_array_equal(np.asarray(y)[outside], np.asarray(x)[outside])

  @parameterized.parameters(False, True)
  def test_logdet_is_log_derivative(self, inverse):
    params = _params(6, (7,), 8)
    # Not at the knots: there jax differentiates the clip of the bin coordinate as half its slope
    # (distrax's spline too; test_matches_distrax covers the knots).
    x = _inputs(7, params, inverse, knots=False)
    b = spline.RationalQuadraticSpline(params, -RANGE, RANGE)
    apply = b.inverse_and_log_det if inverse else b.forward_and_log_det
    # Elementwise map: the Jacobian is diagonal; jacfwd of each column's map over its scalars.
    scalar = lambda xi, pi: (
      spline.RationalQuadraticSpline(pi, -RANGE, RANGE).inverse(xi)
      if inverse
      else spline.RationalQuadraticSpline(pi, -RANGE, RANGE).forward(xi)
    )
    deriv = jax.vmap(jax.vmap(jax.jacfwd(scalar), in_axes=(0, 0)), in_axes=(0, None))(x, params)
    np.testing.assert_allclose(apply(x)[1], jnp.log(deriv), atol=2e-5)

  def test_zero_params_are_identity(self):
    b = spline.RationalQuadraticSpline(jnp.zeros((5, 25)), -RANGE, RANGE)
    x = jnp.linspace(-5.0, 5.0, 5 * 11).reshape(11, 5)
    y, ld = b.forward_and_log_det(x)
    np.testing.assert_allclose(y, x, atol=1e-5)
    np.testing.assert_allclose(ld, 0.0, atol=1e-5)

  def test_knots_match_distrax(self):
    params = _params(8, (3, 5), 8, scale=3.0)
    ref = distrax.RationalQuadraticSpline(params, -RANGE, RANGE, boundary_slopes="identity")
    b = spline.RationalQuadraticSpline(params, -RANGE, RANGE)
    self.assertEqual(b.num_bins, 8)
    for a, r in ((b.x_pos, ref.x_pos), (b.y_pos, ref.y_pos), (b.knot_slopes, ref.knot_slopes)):
      np.testing.assert_allclose(a, r, rtol=1e-6, atol=1e-6)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "3 \\* num_bins"):
      spline.RationalQuadraticSpline(jnp.zeros((3, 24)), -1.0, 1.0)
    with self.assertRaisesRegex(ValueError, "range_min"):
      spline.RationalQuadraticSpline(jnp.zeros((3, 25)), 1.0, -1.0)
    with self.assertRaisesRegex(ValueError, "exceed"):
      spline.RationalQuadraticSpline(jnp.zeros((3, 25)), 0.0, 1e-4)
