"""Tests of lipflow_jax.evaluate: metrics against slow references and analytic cases, and the
report."""

import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import demo
from lipflow_jax import data, evaluate, experiment, fit
from lipflow_jax.data import input_pipeline
from lipflow_jax.evaluate import metrics
from lipflow_jax.evaluate import report as report_lib
from lipflow_jax.experiment import pipeline, tuning
from lipflow_jax.experiment import workdir as workdir_lib


def _ssim_reference(a, b, mask=None, size=11, sigma=1.5, max_value=1.0):
  """Slow numpy SSIM (Wang et al. 2004): explicit loop over windows, 2D Gaussian weights, per
  channel."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if mask is not None:
    m = np.asarray(mask, np.float64)
    a, b = a * m, b * m
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
  g /= g.sum()
  c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
  h, w, ch = a.shape
  out = np.zeros((h - size + 1, w - size + 1, ch))
  for i in range(h - size + 1):
    for j in range(w - size + 1):
      for c in range(ch):
        pa, pb = a[i : i + size, j : j + size, c], b[i : i + size, j : j + size, c]
        ma, mb = np.sum(g * pa), np.sum(g * pb)
        va = np.sum(g * (pa - ma) ** 2)
        vb = np.sum(g * (pb - mb) ** 2)
        cov = np.sum(g * (pa - ma) * (pb - mb))
        out[i, j, c] = ((2 * ma * mb + c1) * (2 * cov + c2)) / (
          (ma**2 + mb**2 + c1) * (va + vb + c2)
        )
  if mask is None:
    return out.mean()
  r = size // 2
  mc = np.broadcast_to(m[r : h - r, r : w - r], out.shape)
  return (out * mc).sum() / mc.sum()


@pytest.fixture(scope="module")
def images():
  rng = np.random.RandomState(0)
  a = rng.uniform(0, 1, (24, 20, 3)).astype(np.float32)
  # A smooth image plus noise: a realistic, partially correlated pair.
  yy, xx = np.mgrid[0:24, 0:20]
  smooth = (
    0.5 + 0.4 * np.sin(xx / 3.0)[..., None] * np.cos(yy[..., None] / 4.0 + np.arange(3))
  ).astype(np.float32)
  b = np.clip(smooth + rng.normal(0, 0.1, smooth.shape), 0, 1).astype(np.float32)
  c = np.clip(smooth + rng.normal(0, 0.05, smooth.shape), 0, 1).astype(np.float32)
  mask = np.zeros((24, 20, 1), np.float32)
  mask[4:20, 3:17] = 1
  return a, smooth, b, c, mask


def test_ssim_matches_slow_reference(images):
  a, smooth, b, c, mask = images
  for x, y in [(a, b), (smooth, b), (b, c), (smooth, smooth)]:
    np.testing.assert_allclose(
      metrics.ssim(jnp.asarray(x), jnp.asarray(y)), _ssim_reference(x, y), rtol=1e-4, atol=1e-5
    )
  np.testing.assert_allclose(
    metrics.ssim(jnp.asarray(b), jnp.asarray(c), jnp.asarray(mask)),
    _ssim_reference(b, c, mask),
    rtol=1e-4,
    atol=1e-5,
  )


def test_ssim_analytic_cases(images):
  a, _, b, _, _ = images
  np.testing.assert_allclose(metrics.ssim(jnp.asarray(a), jnp.asarray(a)), 1.0, atol=1e-6)
  # Constant images: sigma = 0, so SSIM is the luminance term (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
  c1 = 0.01**2
  for m1, m2 in [(0.2, 0.7), (0.5, 0.5), (0.0, 1.0)]:
    x = jnp.full((16, 16, 1), m1)
    y = jnp.full((16, 16, 1), m2)
    np.testing.assert_allclose(
      metrics.ssim(x, y), (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1), rtol=1e-5
    )
  # Symmetric, bounded by 1, and a contrast inversion gives a negative value.
  s_ab = metrics.ssim(jnp.asarray(a), jnp.asarray(b))
  np.testing.assert_allclose(s_ab, metrics.ssim(jnp.asarray(b), jnp.asarray(a)), rtol=1e-6)
  assert float(s_ab) < 1.0
  assert float(metrics.ssim(jnp.asarray(a), 1.0 - jnp.asarray(a))) < 0.0
  # Batched over leading axes.
  batch = metrics.ssim(jnp.stack([a, a]), jnp.stack([a, b]))
  np.testing.assert_allclose(batch, [1.0, float(s_ab)], rtol=1e-5)
  with pytest.raises(ValueError):
    metrics.ssim(jnp.zeros((8, 8, 1)), jnp.zeros((8, 8, 1)))


def test_gaussian_window():
  w = metrics.gaussian_window(11, 1.5)
  assert w.shape == (11,) and abs(w.sum() - 1) < 1e-6 and np.argmax(w) == 5
  np.testing.assert_allclose(w[5 + 1] / w[5], np.exp(-1 / (2 * 1.5**2)), rtol=1e-6)


def test_mse_psnr_geometry(images):
  _, smooth, b, _, mask = images
  d = b - smooth
  np.testing.assert_allclose(
    metrics.masked_mse(jnp.asarray(b), jnp.asarray(smooth)), np.mean(d**2), rtol=1e-5
  )
  ref = np.sum(d**2 * mask) / (3 * mask.sum())
  np.testing.assert_allclose(
    metrics.masked_mse(jnp.asarray(b), jnp.asarray(smooth), jnp.asarray(mask)), ref, rtol=1e-5
  )
  # [H, W] mask works the same; pixels outside the mask do not count.
  b2 = b.copy()
  b2[0, 0] = 1e3
  np.testing.assert_allclose(
    metrics.masked_mse(jnp.asarray(b2), jnp.asarray(smooth), jnp.asarray(mask[..., 0])),
    ref,
    rtol=1e-5,
  )
  # PSNR: MSE 0.01 -> 20 dB; identical images hit the clamp (100 dB), never inf.
  np.testing.assert_allclose(metrics.mse_to_psnr(jnp.float32(0.01)), 20.0, rtol=1e-6)
  x = jnp.full((4, 4, 3), 0.5)
  np.testing.assert_allclose(metrics.psnr(x + 0.1, x), 20.0, rtol=1e-4)
  assert np.isfinite(metrics.psnr(x, x))
  v = jnp.asarray(np.random.RandomState(1).normal(size=(2, 7, 3)).astype(np.float32))
  off = jnp.array([3.0, 4.0, 0.0])
  np.testing.assert_allclose(metrics.geometry_error(v + off, v), [5.0, 5.0], rtol=1e-5)


def test_report_schema_and_markdown(tmp_path):
  rows = [
    report_lib.make_row(m, i, 0.1, 0.01, 20.0, 0.9, 1.5, 4)
    for m in report_lib.METHODS
    for i in report_lib.INPUTS
  ]
  rep = report_lib.write_report(str(tmp_path), rows, {"a": np.float32(1.0), "b": (1, 2)})
  with open(os.path.join(tmp_path, "report.json")) as f:
    loaded = json.load(f)
  assert loaded == rep and set(loaded) == {"rows", "comparisons", "verdicts", "config"}
  assert all(list(r) == list(report_lib.ROW_KEYS) for r in loaded["rows"])
  assert loaded["rows"][0]["geometry_error_ci"] == [None, None]  # no interval given: null
  md = open(os.path.join(tmp_path, "report.md")).read()
  assert "| keypoints | lipflow_fit |" in md and "| hmc | dam_fit |" in md
  with pytest.raises(ValueError):
    report_lib.write_report(str(tmp_path), [dict(rows[0], extra=1)], {})


# ---------------------------------------------------------------------------------------------- end
# to end
UNTUNED = 123.0  # the configured prior weight: in no grid, so a fit that used it shows
UNTUNED_STEPS = 7  # the configured keypoint steps: in no schedule grid either


@pytest.fixture(scope="module")
def tiny_demo_and_spies(tiny_capture, tmp_path_factory):
  """The whole pipeline (configs/demo.py:tiny) on the session's tiny capture, watched by spies on
  what the tuning reads (splits, frames, observations) and on the options of every fit. Returns
  (workdir, config, report, spied). Set LIPFLOW_TEST_DEMO_DIR to keep the workdir between sessions
  (a re-run reuses its trainings, not its tuning and fits)."""
  config = demo.get_config("tiny")
  config.dataset.data_dir = tiny_capture.data_dir
  for method in config.fit.lambda_prior:
    for inp in config.fit.lambda_prior[method]:
      config.fit.lambda_prior[method][inp] = UNTUNED
  config.fit.keypoints.num_steps = UNTUNED_STEPS
  # An override that only saves compilations: every model trains on one device, as the demo does
  # on a CPU host (the suite forces 8 host devices, and an 8-way sharded step compiles ~20% longer;
  # sharded training is tested in test_train.py and test_distributed.py). (The tiny demo's tuning
  # fits as many validation frames as the evaluation fits test frames, so that the two share one
  # executable per (method, input): the prior weight is a traced argument.)
  assert config.tune.max_frames == config.eval.max_frames
  for name in config.models:
    config.models[name].num_devices = 1
  workdir = os.environ.get("LIPFLOW_TEST_DEMO_DIR") or str(tmp_path_factory.mktemp("demo_tiny"))
  # A kept workdir reuses its trainings; the tuning and the fits are redone for the spies to see.
  shutil.rmtree(os.path.join(workdir, "fits"), ignore_errors=True)
  if os.path.exists(os.path.join(workdir, tuning.TUNING_FILE)):
    os.remove(os.path.join(workdir, tuning.TUNING_FILE))
  spied = dict(tuning_splits=[], tuning_sets=[], tuning_fits=[], fits=[])
  in_tuning = []
  tune, open_split = tuning.tune_fit_options, input_pipeline.open_split
  load_eval_set, run_method = evaluate.load_eval_set, evaluate.run_method

  def tune_spy(*args, **kwargs):
    in_tuning.append(True)
    try:
      return tune(*args, **kwargs)
    finally:
      in_tuning.pop()

  def open_split_spy(builder, split, *args, **kwargs):
    if in_tuning:
      spied["tuning_splits"].append(split)
    return open_split(builder, split, *args, **kwargs)

  def load_eval_set_spy(*args, **kwargs):
    out = load_eval_set(*args, **kwargs)
    if in_tuning:
      spied["tuning_sets"].append(out)
    return out

  def run_method_spy(method, inp, bundles, obs, options=None):
    if in_tuning:
      spied["tuning_fits"].append((method, inp, obs))
    else:
      spied["fits"].append((method, inp, dict(options or {})))
    return run_method(method, inp, bundles, obs, options)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(tuning, "tune_fit_options", tune_spy)
    mp.setattr(input_pipeline, "open_split", open_split_spy)
    mp.setattr(evaluate, "load_eval_set", load_eval_set_spy)
    mp.setattr(evaluate, "run_method", run_method_spy)
    report = experiment.run(config, workdir)
  return workdir, config, report, spied


@pytest.fixture(scope="module")
def tiny_demo(tiny_demo_and_spies):
  workdir, config, report, _ = tiny_demo_and_spies
  return workdir, config, report


@pytest.mark.slow
def test_tiny_end_to_end_report(tiny_demo):
  workdir, config, rep = tiny_demo
  with open(os.path.join(workdir, "report.json")) as f:
    loaded = json.load(f)
  assert set(loaded) == {"rows", "comparisons", "verdicts", "config"}
  assert isinstance(loaded["config"], dict)
  rows = loaded["rows"]
  assert {(r["method"], r["input"]) for r in rows} == {
    (m, i) for m in report_lib.METHODS for i in report_lib.INPUTS
  }
  for r in rows:
    assert list(r) == list(report_lib.ROW_KEYS)
    assert (
      isinstance(r["method"], str) and isinstance(r["input"], str) and isinstance(r["frames"], int)
    )
    for k in report_lib.ROW_KEYS[2:7]:
      assert isinstance(r[k], float) and np.isfinite(r[k]), (r, k)
    assert r["frames"] == config.eval.max_frames
    # The row holds the means of its per-frame, per-view metrics (fits cache), and PSNR is the
    # mean of the views' 10 log10(1 / MSE).
    with np.load(os.path.join(workdir, "fits", f"{r['method']}_{r['input']}.npz")) as f:
      for k in ("geometry_error", "image_mse", "psnr", "ssim"):
        np.testing.assert_allclose(r[k], np.nanmean(f[k]), rtol=1e-5, err_msg=k)
      np.testing.assert_allclose(f["psnr"], -10 * np.log10(f["image_mse"]), rtol=1e-4)
    for k in ("geometry_error", "image_mse"):
      lo, hi = r[f"{k}_ci"]
      assert lo <= r[k] <= hi, (r, k)
  # The mean mesh reads no input: the same row for both inputs, the training-mean mesh's error.
  mean = {r["input"]: r for r in rows if r["method"] == "mean_mesh"}
  assert mean["keypoints"]["geometry_error"] == mean["hmc"]["geometry_error"]
  meta = data.load_dataset(config.dataset.data_dir, "synthetic_capture", "tiny")[1]
  source = data.load_dataset(config.dataset.data_dir, "synthetic_capture", "tiny")[0]["test"]
  ev = evaluate.load_eval_set(source, meta, "test", frames=loaded["config"]["eval_frames"])
  truth = data.denormalize_verts(ev["verts"], meta)
  expected = np.mean(np.linalg.norm(truth - meta.vert_mean[None], axis=-1))
  np.testing.assert_allclose(mean["hmc"]["geometry_error"], expected, rtol=1e-4)
  # lipflow_fit against every other method (and the regressor against the mean mesh), per input
  # and metric, over the same frames; one verdict per input.
  comps = loaded["comparisons"]
  others = [m for m in config.eval.methods if m != "lipflow_fit"]
  assert {(c["input"], c["method"], c["baseline"], c["metric"]) for c in comps} == {
    (i, "lipflow_fit", m, k)
    for i in config.eval.inputs
    for m in others
    for k in ("geometry_error", "image_mse")
  } | {
    (i, "dam_regressor", "mean_mesh", k)
    for i in config.eval.inputs
    for k in ("geometry_error", "image_mse")
  }
  by_row = {(r["method"], r["input"]): r for r in rows}
  for c in comps:
    a, b = by_row[(c["method"], c["input"])], by_row[(c["baseline"], c["input"])]
    np.testing.assert_allclose(
      c["mean_diff"], a[c["metric"]] - b[c["metric"]], rtol=1e-4, atol=1e-9
    )
    assert c["ci"][0] <= c["mean_diff"] <= c["ci"][1] and 0 <= c["win_rate"] <= 1
  assert [v["input"] for v in loaded["verdicts"]] == list(report_lib.INPUTS)
  assert all(v["verdict"] in ("holds", "does not hold", "undecided") for v in loaded["verdicts"])
  md = open(os.path.join(workdir, "report.md")).read()
  results = md.split("95% CI: percentile bootstrap")[0]  # the results table
  n = len(config.eval.methods)
  assert results.count("\n| keypoints |") == n and results.count("\n| hmc |") == n
  assert "## Paired comparisons" in md and "verdict" in md
  for name in (
    "targets.png",
    "fits_keypoints.png",
    "fits_hmc.png",
    "samples_random.png",
    "samples_conditional_keypoints.png",
    "sequence.gif",
  ):
    assert os.path.getsize(os.path.join(workdir, "figures", name)) > 0, name
  gif = Image.open(os.path.join(workdir, "figures", "sequence.gif"))
  assert gif.n_frames == config.eval.gif_frames


@pytest.mark.slow
def test_tiny_end_to_end_live_driving(tiny_demo):
  """The main job streams the first test segment for each of ``config.drive.inputs``: a summary in
  report.json and a section in report.md, and per frame a JSONL row whose code decodes (an
  independent decode of the trained model) to the geometry error it states against the capture's
  ground truth; the GIF has a frame per streamed frame, the latency plot is a PNG."""
  workdir, config, _ = tiny_demo
  with open(os.path.join(workdir, "report.json")) as f:
    loaded = json.load(f)
  drives = loaded["config"]["live_driving"]
  assert [d["input"] for d in drives] == list(config.drive.inputs)
  meta = data.load_dataset(config.dataset.data_dir, "synthetic_capture", "tiny")[1]
  source = data.load_dataset(config.dataset.data_dir, "synthetic_capture", "tiny")[0]["test"]
  bundle = fit.load_fitter(os.path.join(workdir, "models", "lipflow"), meta=meta)
  md = open(os.path.join(workdir, "report.md")).read()
  assert "## Live driving" in md
  for d in drives:
    assert (d["method"], d["segment"]) == (config.drive.method, meta.test_segments[0])
    assert d["steps_per_frame"] == config.drive.steps[d["input"]] and d["skipped"] == 0
    # The main job's fit of that input, with its tuned options.
    tuned = loaded["config"]["fit_options_tuned"][d["method"]][d["input"]]
    assert d["full_fit"]["steps"] == tuned.get("num_steps", config.fit[d["input"]].num_steps)
    with open(os.path.join(d["dir"], "frames.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    seg = meta.segments.index(d["segment"])
    cols = meta.splits["test"]
    assert [r["frame"] for r in rows] == sorted(
      set(cols["frame_index"][cols["segment_index"] == seg].tolist())
    )
    assert d["frames"] == len(rows)
    z = jnp.asarray([r["z"] for r in rows])
    verts = np.stack([np.asarray(fit.decode_verts(bundle, c)) for c in z])  # dataset units
    truth = evaluate.load_eval_set(source, meta, "test", frames=[r["frame"] for r in rows])["verts"]
    errors = np.linalg.norm(verts - data.denormalize_verts(truth, meta), axis=-1).mean(-1)
    np.testing.assert_allclose([r["geometry_error"] for r in rows], errors, rtol=1e-3)
    np.testing.assert_allclose(d["stream"]["geometry_error"], errors.mean(), rtol=1e-3)
    lat = d["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["max"]
    assert f"| {d['input']} | {d['method']} | {d['segment']} | {len(rows)} |" in md
    assert Image.open(os.path.join(d["dir"], "drive.gif")).n_frames == len(rows)
    assert Image.open(os.path.join(d["dir"], "latency.png")).format == "PNG"


def _one_se_choice(rows):
  """The one-standard-error rule written out: the lowest mean error m and its standard error s;
  of the rows with error <= m + s, those with the fewest steps; of those, the lowest error."""
  errors = [r["geometry_error"] for r in rows]
  i = errors.index(min(errors))
  bound = errors[i] + rows[i]["geometry_error_se"]
  fewest = min(r["num_steps"] for r in rows if r["geometry_error"] <= bound)
  cands = [r for r in rows if r["num_steps"] == fewest and r["geometry_error"] <= bound]
  return min(cands, key=lambda r: r["geometry_error"])


def test_choose_takes_the_fewest_steps_within_one_standard_error():
  row = lambda steps, lam, err, se: dict(
    num_steps=steps, lr=0.1, lambda_prior=lam, geometry_error=err, geometry_error_se=se
  )
  # The best (200 steps, 0.40 +- 0.03): 100 steps at 0.42 is within one standard error, 50 steps
  # at 0.44 is not; of the 100-step rows the lower error wins.
  rows = [row(200, 1e-2, 0.40, 0.03), row(100, 1e-3, 0.43, 0.01), row(100, 1e-2, 0.42, 0.01)]
  rows.append(row(50, 1e-3, 0.44, 0.001))
  assert tuning.choose(rows) == rows[2] == _one_se_choice(rows)
  # A tighter best: only itself is within one standard error.
  rows[0] = row(200, 1e-2, 0.40, 0.005)
  assert tuning.choose(rows) == rows[0] == _one_se_choice(rows)
  # The bound is the best's own standard error, not the candidate's.
  rows[0] = row(200, 1e-2, 0.40, 0.0)
  rows[2] = row(100, 1e-2, 0.401, 1.0)
  assert tuning.choose(rows) == rows[0]


@pytest.mark.slow
def test_tiny_end_to_end_fit_options_tuned_on_validation(
  tiny_demo, tiny_demo_and_spies, tiny_capture
):
  workdir, config, rep = tiny_demo
  with open(os.path.join(workdir, "tuning.json")) as f:
    tuning = json.load(f)
  assert tuning["split"] == "validation"
  val_frames = set(np.asarray(tiny_capture.meta.splits["validation"]["frame_index"]).tolist())
  test_frames = set(np.asarray(tiny_capture.meta.splits["test"]["frame_index"]).tolist())
  assert set(tuning["frames"]) <= val_frames and not set(tuning["frames"]) & test_frames
  fitted = ("dam_fit", "lipflow_fit", "conditional_gaussian_fit")
  grid = config.tune.schedule_grid
  for method in fitted:
    for inp in config.eval.inputs:
      rows = [r for r in tuning["sweep"] if (r["method"], r["input"]) == (method, inp)]
      schedules = (
        list(zip(grid[inp].num_steps, grid[inp].lr))
        if inp in grid
        else [(config.fit[inp].num_steps, config.fit[inp].lr)]
      )
      assert [(r["num_steps"], r["lr"], r["lambda_prior"]) for r in rows] == [
        (n, lr, lam) for n, lr in schedules for lam in config.tune.lambda_grid[inp]
      ]
      best = _one_se_choice(rows)
      want = {"lambda_prior": best["lambda_prior"]}
      if inp in grid:
        want.update(num_steps=best["num_steps"], lr=best["lr"])
      assert tuning["tuned"][method][inp] == want
      assert rep["config"]["fit_options_tuned"][method][inp] == want
  # The fits of the test split used the tuned options (the configured prior weights and keypoint
  # schedule are in no grid): one per fitted method and input, and the live-driving block's full
  # per-frame fit of its segment.
  _, _, _, spied = tiny_demo_and_spies
  fitted_runs = [(m, i, opts) for m, i, opts in spied["fits"] if m in fitted]
  assert sorted((m, i) for m, i, _ in fitted_runs) == sorted(
    [(m, i) for m in fitted for i in config.eval.inputs]
    + [(config.drive.method, i) for i in config.drive.inputs]
  )
  for method, inp, opts in fitted_runs:
    assert opts["lambda_prior"] != UNTUNED and opts["num_steps"] != UNTUNED_STEPS, (method, inp)
    want = dict(tuning["tuned"][method][inp])
    assert {k: opts[k] for k in want} == want, (method, inp, opts)
  # The tuning read the validation split and nothing else: every split it opened, every frame it
  # loaded, and the observations of every fit it ran.
  assert spied["tuning_splits"] and set(spied["tuning_splits"]) == {"validation"}
  (val_set,) = spied["tuning_sets"]
  assert set(val_set["frame_index"].tolist()) <= val_frames
  assert len(spied["tuning_fits"]) == len(tuning["sweep"])
  for method, inp, obs in spied["tuning_fits"]:
    for k, v in obs.items():
      np.testing.assert_array_equal(v, val_set[k], err_msg=f"{method} {inp} {k}")
  md = open(os.path.join(workdir, "report.md")).read()
  assert "chosen on the validation split" in md and md.count("**") == 2 * len(fitted) * len(
    config.eval.inputs
  )
  # Different weights give different fits (the sweep is not a no-op).
  assert len({r["geometry_error"] for r in tuning["sweep"]}) > len(fitted)


@pytest.mark.slow
def test_tiny_end_to_end_rerun_reuses_work(tiny_demo):
  workdir, config, rep = tiny_demo
  stamps = {
    p: os.path.getmtime(os.path.join(workdir, "fits", p))
    for p in os.listdir(os.path.join(workdir, "fits"))
  }
  # Trainings and fits are reused; only the report is rewritten (figures off to keep it short).
  config = config.copy_and_resolve_references()
  config.eval.figures = False
  rep2 = experiment.run(config, workdir)
  assert [r["geometry_error"] for r in rep2["rows"]] == [r["geometry_error"] for r in rep["rows"]]
  assert stamps == {p: os.path.getmtime(os.path.join(workdir, "fits", p)) for p in stamps}


@pytest.mark.slow
def test_padded_last_chunk_and_empty_mask_view(tiny_demo, tiny_capture):
  """``evaluate_codes`` renders frames in chunks and pads the last one: the padding must not leak
  into the results (compared with all frames in one chunk, nothing padded). A view with an empty
  mask has nothing to compare: its image metrics are NaN (not a perfect score) and the row's means
  skip it."""
  workdir, _, _ = tiny_demo
  bundle = fit.load_fitter(os.path.join(workdir, "models", "dam"), meta=tiny_capture.meta)
  eval_set = tiny_capture.eval_set("test")
  n, c = eval_set["camera_index"].shape
  assert n == 4 and c >= 3
  z = np.random.RandomState(0).normal(0, 0.5, (n, bundle.latent_dim)).astype(np.float32)
  settings = evaluate.eval_settings(tiny_capture.meta.image_size)
  empty = dict(eval_set, image_mask=eval_set["image_mask"].copy())
  empty["image_mask"][3, 1] = 0  # frame 3 (the one padded chunk's only frame), view 1
  # chunk=3: frames 0-2, then frame 3 padded to 3 frames. The reference renders the 4 frames in one
  # chunk of 4 (nothing padded; the pipeline's chunk size, whose executable the run compiled).
  assert tiny_demo[1].eval.chunk == n
  chunked = evaluate.evaluate_codes(bundle, z, empty, settings, chunk=3)
  unpadded = evaluate.evaluate_codes(bundle, z, empty, settings, chunk=n)
  for k in ("geometry_error", "image_mse", "psnr", "ssim"):
    np.testing.assert_allclose(chunked[k], unpadded[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for k in ("image_mse", "psnr", "ssim"):
    assert np.isnan(chunked[k][3, 1]), k
    assert np.all(np.isfinite(np.delete(chunked[k].ravel(), 3 * c + 1))), k
  # The row's means are over the other views.
  row = evaluate.summarize("dam_fit", "keypoints", chunked, 1.0)
  for k in ("image_mse", "psnr", "ssim"):
    others = np.delete(chunked[k].ravel(), 3 * c + 1)
    np.testing.assert_allclose(row[k], np.mean(others), rtol=1e-6, err_msg=k)
  # The other views' metrics are those of the unchanged evaluation set.
  full = evaluate.evaluate_codes(bundle, z, eval_set, settings, chunk=n)
  keep = np.ones((n, c), bool)
  keep[3, 1] = False
  for k in ("image_mse", "psnr", "ssim"):
    np.testing.assert_allclose(chunked[k][keep], full[k][keep], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_figure_renders_compile_once_per_shape(tiny_demo, tiny_capture):
  """The figures render codes with ``evaluate.render_codes`` (``render_frames``): a second call of
  the same shapes compiles nothing and renders the same image, also when its codes are committed to
  a device (a jitted function's output, as the conditional samples are) and the first call's were
  not (eager samples). (Called outside jit, the renderer compiles each of its switches again on
  every call, ~3 s apiece.)"""
  workdir, _, _ = tiny_demo
  bundle = fit.load_fitter(os.path.join(workdir, "models", "dam"), meta=tiny_capture.meta)
  eval_set = tiny_capture.eval_set("test")
  settings = evaluate.eval_settings(tiny_capture.meta.image_size)
  K, Rt = eval_set["camera_K"][0, 0], eval_set["camera_Rt"][0, 0]
  z = np.random.RandomState(1).normal(0, 0.5, (3, bundle.latent_dim)).astype(np.float32)
  compiled = []

  def listener(event, seconds, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(seconds)

  first = evaluate.render_codes(bundle, jnp.asarray(z), K, Rt, settings)
  committed = jax.device_put(z, jax.devices()[0])
  assert committed.committed and not jnp.asarray(z).committed
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    second = evaluate.render_codes(bundle, committed, K, Rt, settings)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiled, f"{len(compiled)} compilations ({sum(compiled):.1f} s) on the second call"
  assert first.shape == (3, *tiny_capture.meta.image_size, 3)
  np.testing.assert_array_equal(first, second)


@pytest.mark.slow
def test_caches_follow_the_training_config_and_the_fit_options(tiny_demo, tmp_path, monkeypatch):
  """A re-run retrains exactly the models whose training config changed (and the regressor when its
  DAM teacher changed), and refits exactly the (method, input) whose fit options, prior weight or
  model changed. Trainings and fits are replaced by recorders on a copy of the finished workdir's
  cache files."""
  workdir, config, _ = tiny_demo
  copy = str(tmp_path / "workdir")
  for name in config.train_order:
    done = os.path.join("models", name, "DONE.json")
    os.makedirs(os.path.join(copy, "models", name))
    shutil.copy(os.path.join(workdir, done), os.path.join(copy, done))
  shutil.copytree(os.path.join(workdir, "fits"), os.path.join(copy, "fits"))

  trained = []

  def fake_train(sub, sub_dir, **kwargs):
    del kwargs
    trained.append(os.path.basename(sub_dir))
    return types.SimpleNamespace(stopped="finished", step=sub.num_train_steps, metrics={})

  monkeypatch.setattr(pipeline.train, "train_and_evaluate", fake_train)

  def retrained(cfg):
    trained.clear()
    pipeline.train_models(cfg, copy)
    return list(trained)

  assert retrained(config) == []
  changed = config.copy_and_resolve_references()
  changed.models.lipflow.optimizer.learning_rate *= 2
  assert retrained(changed) == ["lipflow"]
  assert retrained(changed) == []  # the new training is recorded as done
  changed.models.dam.num_train_steps += 1
  assert retrained(changed) == ["dam", "regressor"]

  # Fits: the evaluation set and keys of the finished run; codes and metrics come from its cache.
  ds = config.dataset
  builder = input_pipeline.prepare(ds.name, ds.get("builder_config"), ds.get("data_dir"))
  meta = pipeline.schema.load_meta(builder)
  eval_set = evaluate.load_eval_set(
    input_pipeline.open_split(builder, config.eval.split),
    meta,
    config.eval.split,
    max_frames=config.eval.max_frames,
    view_stride=config.eval.view_stride,
  )
  models = os.path.join(workdir, "models")
  keys = {n: workdir_lib.fingerprint_of_done(os.path.join(models, n)) for n in os.listdir(models)}
  with open(os.path.join(workdir, "tuning.json")) as f:
    tuned = json.load(f)["tuned"]
  refit = []

  def fake_run_method(method, inp, bundles, obs, options=None):
    del bundles, options
    refit.append((method, inp))
    n = len(obs["keypoints"])
    return evaluate.MethodOutput(z=np.zeros((n, 2), np.float32), bundle=None, seconds=1.0)

  def fake_evaluate_codes(bundle, z, eval_set, settings, chunk=8, keep_images=()):
    del bundle, settings, chunk
    n, c = eval_set["camera_index"].shape
    out = {"geometry_error": np.ones(n)} | {
      k: np.ones((n, c)) for k in ("image_mse", "psnr", "ssim")
    }
    return out | ({"images": np.zeros((len(keep_images), c, 1, 1, 3))} if len(keep_images) else {})

  monkeypatch.setattr(evaluate, "run_method", fake_run_method)
  monkeypatch.setattr(evaluate, "evaluate_codes", fake_evaluate_codes)

  def refitted(cfg, model_keys=keys, lams=tuned):
    refit.clear()
    pipeline.run_methods(cfg, {}, eval_set, copy, None, model_keys, lams)
    return sorted(refit)

  jobs = [(m, i) for i in config.eval.inputs for m in config.eval.methods]
  fitted = [(m, i) for m, i in jobs if fit.METHODS[m].fitted]
  assert refitted(config) == []
  changed = config.copy_and_resolve_references()
  changed.fit.hmc.num_steps += 1
  assert refitted(changed) == sorted((m, i) for m, i in fitted if i == "hmc")
  assert refitted(changed) == []
  lams = json.loads(json.dumps(tuned))
  lams["dam_fit"]["keypoints"]["lambda_prior"] *= 10
  assert refitted(changed, lams=lams) == [("dam_fit", "keypoints")]
  lams["lipflow_fit"]["keypoints"]["num_steps"] = 3  # a tuned schedule
  assert refitted(changed, lams=lams) == [("lipflow_fit", "keypoints")]
  new_keys = dict(keys, lipflow="retrained")
  assert refitted(changed, model_keys=new_keys, lams=lams) == sorted(
    (m, i) for m, i in jobs if fit.METHODS[m].model_for(i) == "lipflow"
  )
