r"""The whole pipeline: data -> train every model -> fit -> evaluate -> report.

  python -m lipflow_jax.main --config=configs/demo.py --workdir=DIR       # about 15 min on a 2-core CPU
  python -m lipflow_jax.main --config=configs/demo.py:tiny --workdir=DIR  # smoke run, about a minute

Workdir layout:
  config.json                 the resolved demo config
  models/<name>/              one ``lipflow_jax.train`` workdir per model (DONE.json once finished)
  tuning.json                 lambda_prior per fitted method and input, chosen on the validation split
  fits/<method>_<input>.npz   codes, timings and per-frame metrics of each evaluated method (cache)
  report.json, report.md      the results table (see ``lipflow_jax.evaluate.report``)
  figures/*.png, figures/sequence.gif

Running it again on the same workdir reuses finished trainings, fits and metrics whose inputs are unchanged
(each cache entry records a fingerprint of the config parts and checkpoints it was made from).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
from typing import Any, Dict, Optional

# `from configs import ...` in the config files: the repository root must be importable.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO_ROOT, "configs")) and _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np

from lipflow_jax import evaluate
from lipflow_jax import fit
from lipflow_jax import train
from lipflow_jax.evaluate import figures

DONE_FILE = "DONE.json"
FIT_METHODS = {"dam_fit": "dam", "lipflow_fit": "lipflow", "conditional_gaussian_fit": "conditional_gaussian"}


def log(msg: str):
  print(f"[lipflow main {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _plain(x):
  if isinstance(x, ml_collections.ConfigDict):
    return x.to_dict()
  return x


def fingerprint(*parts) -> str:
  """A short stable hash of JSON-able parts."""
  text = json.dumps([_plain(p) for p in parts], sort_keys=True, default=str)
  return hashlib.sha1(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ data
def prepare_data(config):
  """Builds the dataset on first use; returns (builder, meta)."""
  from lipflow_jax.train import input_pipeline  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  ds = config.dataset
  builder = input_pipeline.prepare(ds.name, ds.get("builder_config"), ds.get("data_dir"))
  meta = input_pipeline.load_meta(builder)
  log(f"data {ds.name}/{ds.get('builder_config')} ready in {time.time() - t0:.1f} s "
      f"(V={meta.num_verts}, T={meta.texture_size}, {meta.num_cameras} cameras)")
  return builder, meta


# ----------------------------------------------------------------------------------------------- training
def model_config(config, name: str, workdirs: Dict[str, str]) -> ml_collections.ConfigDict:
  """The resolved training config of one model of the demo."""
  sub = copy.deepcopy(config.models[name])
  with sub.unlocked():
    sub.dataset.data_dir = config.dataset.get("data_dir")
    if name == "regressor":
      sub.teacher_workdir = workdirs["dam"]
  return sub


def train_models(config, workdir: str) -> Dict[str, str]:
  """Trains every model of ``config.train_order`` into ``workdir/models/<name>`` (skipping finished ones)."""
  workdirs: Dict[str, str] = {}
  order = list(config.train_order)
  for i, name in enumerate(order):
    sub_dir = os.path.join(workdir, "models", name)
    workdirs[name] = sub_dir
    sub = model_config(config, name, workdirs)
    key = fingerprint(sub, fingerprint_of_done(workdirs["dam"]) if name == "regressor" else "")
    done = os.path.join(sub_dir, DONE_FILE)
    if os.path.exists(done) and _read_json(done).get("key") == key:
      log(f"[{i + 1}/{len(order)}] {name}: already trained ({sub.num_train_steps} steps), reusing")
      continue
    kind = "regressor" if sub.task == "regressor" else f"prior {sub.model.prior}, encoder {sub.model.encoder_input}"
    log(f"[{i + 1}/{len(order)}] training {name} ({kind}, {sub.num_train_steps} steps) in {sub_dir}")
    t0 = time.time()
    result = train.train_and_evaluate(sub, sub_dir)
    if result.stopped == "preempted":
      raise SystemExit(f"training of {name} was interrupted; run the same command again to resume")
    _write_json(done, {"key": key, "steps": int(result.step), "seconds": time.time() - t0,
                       "metrics": {k: float(v) for k, v in result.metrics.items()}})
    log(f"[{i + 1}/{len(order)}] {name} done in {time.time() - t0:.1f} s; loss {result.metrics.get('loss', 'n/a')}")
  return workdirs


def fingerprint_of_done(sub_dir: str) -> str:
  path = os.path.join(sub_dir, DONE_FILE)
  return _read_json(path).get("key", "") if os.path.exists(path) else ""


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ bundles
def load_bundles(workdirs: Dict[str, str], meta) -> Dict[str, fit.ModelBundle]:
  """{'dam' (with the regressors), 'lipflow', 'conditional_gaussian', 'flow', 'direct_keypoints',
  'direct_hmc'} -> ModelBundle, for the models that were trained."""
  bundles = {}
  for name in ("dam", "lipflow", "conditional_gaussian", "flow", "direct_keypoints", "direct_hmc"):
    if name not in workdirs:
      continue
    regressor = workdirs.get("regressor") if name == "dam" else None
    bundles[name] = fit.load_fitter(workdirs[name], regressor_workdir=regressor, meta=meta)
  return bundles


# ------------------------------------------------------------------------------------------------ fitting
def fit_options(config, method: str, input: str, lambdas=None) -> Dict[str, Any]:  # pylint: disable=redefined-builtin
  """``fit.fit_config`` overrides of a fitted report method for an input; ``lambdas`` {fit method: {input:
  lambda_prior}} (from ``tune_lambda_prior``) override ``config.fit.lambda_prior``."""
  fit_method = FIT_METHODS[method]
  opts = dict(_plain(config.fit[input]))
  opts["lambda_prior"] = float((lambdas or _plain(config.fit.lambda_prior))[fit_method][input])
  if fit_method == "lipflow":
    opts["space"] = config.fit.get("space", "z")
  return opts


# ------------------------------------------------------------------------------------------------ tuning
def tune_lambda_prior(config, bundles, builder, meta, workdir: str, model_keys: Dict[str, str]):
  """lambda_prior of every fitted method and input, chosen on the validation split (never the test split).

  For each value of ``config.tune.lambda_grid[input]`` the method fits ``config.tune.max_frames`` validation
  frames; the value with the lowest mean geometry error wins (ties: the first). Without a grid or a validation
  split the values of ``config.fit.lambda_prior`` are used as given. Cached in ``workdir/tuning.json``.

  Returns:
    (lambdas {fit method: {input: value}}, sweep rows [{method, input, lambda_prior, geometry_error, obs_loss}]).
  """
  lambdas = {m: dict(v) for m, v in _plain(config.fit.lambda_prior).items()}
  tune = config.get("tune")
  split = tune.get("split") if tune else None
  if not tune or not tune.get("lambda_grid") or split not in meta.splits:
    log(f"lambda_prior not tuned (no {split!r} split or no grid): using config.fit.lambda_prior")
    return lambdas, []
  from lipflow_jax.train import input_pipeline  # pylint: disable=g-import-not-at-top
  val = evaluate.load_eval_set(input_pipeline.open_split(builder, split), meta, split, max_frames=tune.max_frames,
                               cameras=list(meta.camera_names)[:1])
  jobs = [(m, i) for i in config.eval.inputs for m in config.eval.methods if m in FIT_METHODS]
  key = fingerprint(_plain(config.fit), _plain(tune), val["frame_index"].tolist(), jobs,
                    sorted((k, v) for k, v in model_keys.items()))
  path = os.path.join(workdir, "tuning.json")
  if os.path.exists(path) and _read_json(path).get("key") == key:
    cached = _read_json(path)
    log(f"lambda_prior: reusing the validation sweep in {path}")
    return cached["lambdas"], cached["sweep"]
  obs = evaluate.observations(val)
  sweep = []
  for n, (method, inp) in enumerate(jobs):
    fit_method = FIT_METHODS[method]
    best = None
    for lam in tune.lambda_grid[inp]:
      options = dict(fit_options(config, method, inp), lambda_prior=float(lam))
      out = evaluate.run_method(method, inp, bundles, obs, {fit_method: options})
      geo = float(np.mean(evaluate.geometry_errors(out.bundle, jnp.asarray(out.z), jnp.asarray(val["verts"]))))
      obs_loss = float(np.mean(out.losses["obs"][:, -1]))
      sweep.append({"method": method, "input": inp, "lambda_prior": float(lam), "geometry_error": geo,
                    "obs_loss": obs_loss})
      if best is None or geo < best[1]:
        best = (float(lam), geo)
    lambdas[fit_method][inp] = best[0]
    log(f"[tune {n + 1}/{len(jobs)}] {method} / {inp}: lambda_prior {best[0]:g} (validation geometry "
        f"{best[1]:.3f}; grid " + ", ".join(f"{r['lambda_prior']:g}: {r['geometry_error']:.3f}" for r in sweep
                                           if r["method"] == method and r["input"] == inp) + ")")
  _write_json(path, {"key": key, "split": split, "frames": val["frame_index"].tolist(), "lambdas": lambdas,
                     "sweep": sweep})
  return lambdas, sweep


def sweep_table(sweep, lambdas) -> str:
  """Markdown: validation geometry error of each fitted method and input per lambda_prior (chosen in bold)."""
  grid = sorted({r["lambda_prior"] for r in sweep})
  lines = ["lambda_prior, chosen on the validation split (mean geometry error of the fitted codes; the test "
           "split is not used):", "",
           "| input | method | " + " | ".join(f"{g:g}" for g in grid) + " |",
           "|---|---|" + "---:|" * len(grid)]
  for method, inp in dict.fromkeys((r["method"], r["input"]) for r in sweep):
    cells = {r["lambda_prior"]: r["geometry_error"] for r in sweep if (r["method"], r["input"]) == (method, inp)}
    chosen = lambdas[FIT_METHODS[method]][inp]
    fmt = lambda g: ("n/a" if g not in cells else f"**{cells[g]:.4f}**" if g == chosen else f"{cells[g]:.4f}")
    lines.append(f"| {inp} | {method} | " + " | ".join(fmt(g) for g in grid) + " |")
  return "\n".join(lines)


def run_methods(config, bundles, eval_set, workdir: str, settings, model_keys: Dict[str, str], lambdas=None):
  """Codes and per-frame metrics of every (method, input), cached in ``workdir/fits``."""
  obs = evaluate.observations(eval_set)
  frames_key = fingerprint(eval_set["frame_index"].tolist(), eval_set["camera_index"].tolist())
  results = {}
  jobs = [(m, i) for i in config.eval.inputs for m in config.eval.methods]
  for n, (method, inp) in enumerate(jobs):
    bundle_key = evaluate.METHOD_SPECS[method][0].format(input=inp)
    options = fit_options(config, method, inp, lambdas) if method in FIT_METHODS else {}
    key = fingerprint(method, inp, options, frames_key, figure_frames(config, eval_set)[:2].tolist(), model_keys.get(bundle_key, ""),
                      model_keys.get("regressor", "") if method == "dam_regressor" else "")
    path = os.path.join(workdir, "fits", f"{method}_{inp}.npz")
    if os.path.exists(path):
      with np.load(path, allow_pickle=False) as f:
        if str(f["key"]) == key:
          results[(method, inp)] = {k: f[k] for k in f.files}
          log(f"[{n + 1}/{len(jobs)}] {method} / {inp}: cached")
          continue
    t0 = time.time()
    out = evaluate.run_method(method, inp, bundles, obs, {FIT_METHODS[method]: options} if options else None)
    t1 = time.time()
    per_frame = evaluate.evaluate_codes(out.bundle, out.z, eval_set, settings, chunk=config.eval.chunk,
                                        keep_images=figure_frames(config, eval_set)[:2])
    res = dict(key=np.asarray(key), z=out.z, seconds=np.asarray(out.seconds), **per_frame)
    if out.losses is not None:
      res.update({f"loss_{k}": v for k, v in out.losses.items()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **res)
    results[(method, inp)] = res
    row = evaluate.summarize(method, inp, per_frame, out.seconds)
    log(f"[{n + 1}/{len(jobs)}] {method} / {inp}: geometry {row['geometry_error']:.3f}, image MSE "
        f"{row['image_mse']:.5f}, PSNR {row['psnr']:.2f}, SSIM {row['ssim']:.3f}; {row['fit_ms_per_frame']:.1f} ms/frame "
        f"(codes {t1 - t0:.1f} s incl. compile, metrics {time.time() - t1:.1f} s)")
  return results


# ------------------------------------------------------------------------------------------------ figures
def frontal_view(eval_set) -> int:
  """Index (within the eval set's views) of the camera looking most directly at the face."""
  return int(np.argmax(np.mean(eval_set["view"][..., 2], axis=0)))


def keypoint_target_image(frame: Dict[str, np.ndarray], meta) -> np.ndarray:
  """uint8 frontal image (low resolution, upscaled) with the visible keypoints drawn."""
  img = figures.to_uint8(frame["image_frontal"])
  scale = 4
  img = np.kron(img, np.ones((scale, scale, 1), np.uint8))
  s = scale * frame["image_frontal"].shape[1] / meta.frontal_size[1]
  return figures.draw_keypoints(img, frame["keypoints"], frame["keypoints_visible"], scale=s, radius=2)


def hmc_target_image(frame: Dict[str, np.ndarray]) -> np.ndarray:
  return np.concatenate([figures.to_uint8(frame["hmc"][i]) for i in range(frame["hmc"].shape[0])], axis=1)


def figure_frames(config, eval_set) -> np.ndarray:
  """Indices (into the eval set) of the frames shown in the figures."""
  n = eval_set["verts"].shape[0]
  return np.unique(np.round(np.linspace(0, n - 1, min(config.eval.figure_frames, n))).astype(int))


def make_figures(config, bundles, eval_set, results, meta, settings, workdir: str):
  """PNG figures: fitting targets, fitted renders beside ground truth (kept from the evaluation), samples."""
  fig_dir = os.path.join(workdir, "figures")
  paths = []
  frames = figure_frames(config, eval_set)
  # Fitting targets.
  rows = [[keypoint_target_image(evaluate.take(eval_set, f), meta), hmc_target_image(evaluate.take(eval_set, f))]
          for f in frames]
  paths.append(figures.save_png(figures.grid(rows, [f"frame {int(eval_set['frame_index'][f])}" for f in frames],
                                             ["keypoints (frontal camera)", "HMC crops (left eye, right eye, mouth)"],
                                             cell_height=128, title="Fitting targets"),
                                os.path.join(fig_dir, "targets.png")))
  # Fitted renders beside ground truth, per input.
  num_views = eval_set["camera_K"].shape[1]
  views = np.unique(np.round(np.linspace(0, num_views - 1, min(config.eval.figure_views, num_views))).astype(int))
  for inp in config.eval.inputs:
    rows, labels = [], []
    for j, f in enumerate(frames[:2]):
      rows.append([eval_set["image"][f, v] for v in views])
      labels.append(f"ground truth (frame {int(eval_set['frame_index'][f])})")
      for method in config.eval.methods:
        if (method, inp) not in results:
          continue
        rows.append([results[(method, inp)]["images"][j, v] for v in views])
        labels.append(method)
    cols = [f"camera {int(eval_set['camera_index'][0, v])}" for v in views]
    paths.append(figures.save_png(figures.grid(rows, labels, cols, label_width=170,
                                               title=f"Fitted from {inp}: renders in held-out dome views"),
                                  os.path.join(fig_dir, f"fits_{inp}.png")))
  # Samples.
  v = frontal_view(eval_set)
  K, Rt = eval_set["camera_K"][0, v], eval_set["camera_Rt"][0, v]
  rng = jax.random.PRNGKey(config.seed)
  sample_bundles = {"DAM: z ~ N(0, I)": bundles["dam"]}
  if "flow" in bundles:
    sample_bundles["flow prior: z = f(y), y ~ N(0, I)"] = bundles["flow"]
  paths.append(evaluate.random_samples_figure(sample_bundles, rng, config.eval.num_samples, K, Rt, settings,
                                              os.path.join(fig_dir, "samples_random.png")))
  f = frames[0]
  frame = {k: eval_set[k][f:f + 1] for k in evaluate.observations(eval_set)}
  targets = {"keypoints": keypoint_target_image(evaluate.take(eval_set, f), meta),
             "hmc": hmc_target_image(evaluate.take(eval_set, f))}
  for inp in config.eval.inputs:
    paths.append(evaluate.conditional_samples_figure(
        bundles["lipflow"], rng, frame, inp, config.eval.num_samples, K, Rt, settings,
        os.path.join(fig_dir, f"samples_conditional_{inp}.png"), ground_truth=eval_set["image"][f, v],
        target=targets[inp]))
  return [os.path.relpath(p, workdir) for p in paths]


def make_sequence_gif(config, bundles, source, meta, settings, workdir: str, view_camera: int,
                      lambdas=None) -> Optional[str]:
  """Fits one held-out sequence frame by frame (warm start) from keypoints with dam_fit and lipflow_fit and
  writes target | ground truth | dam_fit | lipflow_fit as an animated GIF."""
  cols = meta.splits[config.eval.split]
  seg = int(np.min(cols["segment_index"]))
  frames = np.unique(cols["frame_index"][cols["segment_index"] == seg])[:config.eval.gif_frames]
  seq = evaluate.load_eval_set(source, meta, config.eval.split, frames=frames,
                               cameras=[meta.camera_names[view_camera]])
  obs = {k: jnp.asarray(v) for k, v in evaluate.observations(seq).items()}
  renders = {}
  for method in ("dam_fit", "lipflow_fit"):
    bundle = bundles[FIT_METHODS[method]]
    opts = fit_options(config, method, "keypoints", lambdas)
    opts["warm_steps"] = min(int(config.fit.sequence_warm_steps), int(opts["num_steps"]))
    res = fit.fit_latents(bundle, obs, method=FIT_METHODS[method], input="keypoints", sequence=True, **opts)
    rgb, _ = evaluate.render_batch(fit.decoder_only(bundle), res.z, jnp.asarray(seq["camera_K"]), jnp.asarray(seq["camera_Rt"]),
                                   settings, jnp.asarray(seq["camera_index"]))
    renders[method] = np.asarray(rgb[:, 0])
  height = 128
  gif_frames = []
  for t in range(len(frames)):
    row = [keypoint_target_image(evaluate.take(seq, t), meta), seq["image"][t, 0], renders["dam_fit"][t],
           renders["lipflow_fit"][t]]
    gif_frames.append(figures.grid([row], col_labels=["target", "ground truth", "dam_fit", "lipflow_fit"],
                                   cell_height=height, title=f"held-out sequence, frame {int(frames[t])}"))
  path = figures.save_gif(gif_frames, os.path.join(workdir, "figures", "sequence.gif"))
  return os.path.relpath(path, workdir)


# ------------------------------------------------------------------------------------------------ pipeline
def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """The whole pipeline; returns the report dict."""
  t_start = time.time()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, "config.json"), config.to_dict())
  timings = {}

  t0 = time.time()
  builder, meta = prepare_data(config)
  timings["data_s"] = time.time() - t0

  t0 = time.time()
  workdirs = train_models(config, workdir)
  timings["train_s"] = time.time() - t0
  model_keys = {name: fingerprint_of_done(d) for name, d in workdirs.items()}

  t0 = time.time()
  bundles = load_bundles(workdirs, meta)
  from lipflow_jax.train import input_pipeline  # pylint: disable=g-import-not-at-top
  source = input_pipeline.open_split(builder, config.eval.split)
  eval_set = evaluate.load_eval_set(source, meta, config.eval.split, max_frames=config.eval.max_frames,
                                    view_stride=config.eval.view_stride)
  settings = eval_settings(meta.image_size)
  log(f"evaluation set: {eval_set['verts'].shape[0]} held-out frames x {eval_set['camera_K'].shape[1]} dome views")
  timings["load_s"] = time.time() - t0

  t0 = time.time()
  lambdas, sweep = tune_lambda_prior(config, bundles, builder, meta, workdir, model_keys)
  timings["tune_s"] = time.time() - t0

  t0 = time.time()
  results = run_methods(config, bundles, eval_set, workdir, settings, model_keys, lambdas)
  timings["fit_eval_s"] = time.time() - t0
  rows = [evaluate.summarize(m, i, {k: results[(m, i)][k] for k in ("geometry_error", "image_mse", "psnr", "ssim")},
                             float(results[(m, i)]["seconds"])) for (m, i) in results]

  t0 = time.time()
  figs = []
  if config.eval.get("figures", True):
    figs = make_figures(config, bundles, eval_set, results, meta, settings, workdir)
    view_camera = int(eval_set["camera_index"][0, frontal_view(eval_set)])
    figs.append(make_sequence_gif(config, bundles, source, meta, settings, workdir, view_camera, lambdas))
    log(f"figures written to {workdir}/figures in {time.time() - t0:.1f} s")
  timings["figures_s"] = time.time() - t0
  timings["total_s"] = time.time() - t_start

  report_config = dict(config.to_dict())
  report_config["timings"] = timings
  report_config["eval_frames"] = eval_set["frame_index"].tolist()
  report_config["eval_cameras"] = eval_set["camera_index"][0].tolist()
  report_config["lambda_prior_used"] = lambdas
  report_config["lambda_prior_sweep"] = sweep
  notes = ("Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) +
           f". fit_ms_per_frame: wall time of producing the codes (jitted, compilation excluded) / frames.")
  if sweep:
    notes += "\n\n" + sweep_table(sweep, lambdas)
  report = evaluate.write_report(workdir, rows, report_config, figures=figs, notes=notes)
  log(f"report written to {workdir}/report.md in {timings['total_s']:.1f} s total")
  print(evaluate.markdown_table(report["rows"]), flush=True)
  print(evaluate.claim_summary(report["rows"]), flush=True)
  return report


def eval_settings(image_size):
  """Hard rasterisation of the dome views, as the synthetic capture renders its ground truth."""
  from lipflow_jax import render  # pylint: disable=g-import-not-at-top
  return render.RasterSettings.hard(tuple(image_size), tile_size=4, max_faces_per_tile=128, cull_backfaces=True)


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  run(_FLAGS.config, _FLAGS.workdir)
  return 0


_FLAGS = None

if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "Output directory (models, fits, report, figures).")
  config_flags.DEFINE_config_file("config", None, "Pipeline config (configs/demo.py[:tiny]).", lock_config=False)
  flags.mark_flags_as_required(["config", "workdir"])
  _FLAGS = flags.FLAGS
  app.run(main)
