"""The main job, ``run(config, workdir)``: data -> train every model -> tune -> fit -> evaluate ->
report, as one linear sequence of labelled blocks.

Workdir layout:
  config.json                 the resolved config
  models/<name>/              one ``lipflow_jax.train`` workdir per model (DONE.json once finished)
  tuning.json                 fitting options (lambda_prior, Adam schedule) per fitted method and
                              input, chosen on the validation split
  fits/<method>_<input>.npz   codes, timings and per-frame metrics of each evaluated method (cache)
  report.json, report.md      the results table (see ``lipflow_jax.evaluate.report``)
  figures/*.png, figures/sequence.gif

Running it again on the same workdir reuses finished trainings, fits and metrics whose inputs are
unchanged (each cache entry records a fingerprint of the config parts and checkpoints it was made
from).
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Dict

import ml_collections
import numpy as np

from lipflow_jax import evaluate, fit, train
from lipflow_jax.data import input_pipeline, schema
from lipflow_jax.experiment import driving, figures, tuning
from lipflow_jax.experiment import workdir as workdir_lib
from lipflow_jax.experiment.workdir import fingerprint, log, timed

# The trained models whose decoders (and encoders) the methods read; 'dam' also carries the
# regressors.
BUNDLE_MODELS = ("dam", "lipflow", "conditional_gaussian", "flow", "direct_keypoints", "direct_hmc")


def model_config(config, name: str, workdirs: Dict[str, str]) -> ml_collections.ConfigDict:
  """The resolved training config of one model of the main job."""
  sub = copy.deepcopy(config.models[name])
  with sub.unlocked():
    sub.dataset.data_dir = config.dataset.get("data_dir")
    if name == "regressor":
      sub.teacher_workdir = workdirs["dam"]
  return sub


def train_models(config, workdir: str) -> Dict[str, str]:
  """Trains every model of ``config.train_order`` into ``workdir/models/<name>`` (skipping
  finished ones)."""
  workdirs: Dict[str, str] = {}
  order = list(config.train_order)
  for i, name in enumerate(order):
    sub_dir = os.path.join(workdir, "models", name)
    workdirs[name] = sub_dir
    sub = model_config(config, name, workdirs)
    # The regressor's teacher enters the key as the key of its training, not as its path: a moved
    # or copied workdir reuses its trainings.
    keyed = {k: v for k, v in sub.to_dict().items() if k != "teacher_workdir"}
    key = fingerprint(
      keyed, workdir_lib.fingerprint_of_done(workdirs["dam"]) if name == "regressor" else ""
    )
    done = os.path.join(sub_dir, workdir_lib.DONE_FILE)
    if os.path.exists(done) and workdir_lib.read_json(done).get("key") == key:
      log(f"[{i + 1}/{len(order)}] {name}: already trained ({sub.num_train_steps} steps), reusing")
      continue
    kind = (
      "regressor"
      if sub.task == "regressor"
      else f"prior {sub.model.prior}, encoder {sub.model.encoder_input}"
    )
    log(
      f"[{i + 1}/{len(order)}] training {name} ({kind}, {sub.num_train_steps} steps) in {sub_dir}"
    )
    t0 = time.time()
    result = train.train_and_evaluate(sub, sub_dir)
    if result.stopped == "preempted":
      raise SystemExit(f"training of {name} was interrupted; run the same command again to resume")
    workdir_lib.write_json(
      done,
      {
        "key": key,
        "steps": int(result.step),
        "seconds": time.time() - t0,
        "metrics": {k: float(v) for k, v in result.metrics.items()},
      },
    )
    log(
      f"[{i + 1}/{len(order)}] {name} done in {time.time() - t0:.1f} s; loss "
      f"{result.metrics.get('loss', 'n/a')}"
    )
  return workdirs


def load_bundles(workdirs: Dict[str, str], meta) -> Dict[str, fit.ModelBundle]:
  """``BUNDLE_MODELS`` -> ModelBundle, for the models that were trained, and 'mean' (the
  training-mean mesh and texture, ``fit.mean_bundle``)."""
  bundles = {"mean": fit.mean_bundle(schema.MeshMeta.from_dataset_meta(meta))}
  for name in BUNDLE_MODELS:
    if name not in workdirs:
      continue
    regressor = workdirs.get("regressor") if name == "dam" else None
    bundles[name] = fit.load_fitter(workdirs[name], regressor_workdir=regressor, meta=meta)
  return bundles


def run_methods(
  config, bundles, eval_set, workdir: str, settings, model_keys: Dict[str, str], tuned=None
):
  """Codes and per-frame metrics of every (method, input), cached in ``workdir/fits``."""
  obs = evaluate.observations(eval_set)
  frames_key = fingerprint(eval_set["frame_index"].tolist(), eval_set["camera_index"].tolist())
  keep = figures.figure_frames(config, eval_set)[:2]
  results = {}
  jobs = [(m, i) for i in config.eval.inputs for m in config.eval.methods]
  for n, (method, inp) in enumerate(jobs):
    spec = fit.METHODS[method]
    options = tuning.fit_options(config, method, inp, tuned) if spec.fitted else {}
    key = fingerprint(
      method,
      inp,
      options,
      frames_key,
      keep.tolist(),
      model_keys.get(spec.model_for(inp), ""),
      model_keys.get("regressor", "") if spec.codes == "regressor" else "",
    )
    path = os.path.join(workdir, "fits", f"{method}_{inp}.npz")
    if os.path.exists(path):
      with np.load(path, allow_pickle=False) as f:
        if str(f["key"]) == key:
          results[(method, inp)] = {k: f[k] for k in f.files}
          log(f"[{n + 1}/{len(jobs)}] {method} / {inp}: cached")
          continue
    t0 = time.time()
    out = evaluate.run_method(method, inp, bundles, obs, options or None)
    t1 = time.time()
    per_frame = evaluate.evaluate_codes(
      out.bundle, out.z, eval_set, settings, chunk=config.eval.chunk, keep_images=keep
    )
    res = dict(key=np.asarray(key), z=out.z, seconds=np.asarray(out.seconds), **per_frame)
    if out.losses is not None:
      res.update({f"loss_{k}": v for k, v in out.losses.items()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **res)
    results[(method, inp)] = res
    row = evaluate.summarize(method, inp, per_frame, out.seconds)
    log(
      f"[{n + 1}/{len(jobs)}] {method} / {inp}: geometry {row['geometry_error']:.3f}, image MSE "
      f"{row['image_mse']:.5f}, PSNR {row['psnr']:.2f}, SSIM {row['ssim']:.3f}; "
      f"{row['fit_ms_per_frame']:.1f} ms/frame (codes {t1 - t0:.1f} s incl. compile, metrics "
      f"{time.time() - t1:.1f} s)"
    )
  return results


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """The whole pipeline; returns the report dict."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  timings = {}
  with timed(timings, "total"):
    # ----------------------------------------------------------------------------------------------
    # data
    with timed(timings, "data"):
      ds = config.dataset
      builder = input_pipeline.prepare(ds.name, ds.get("builder_config"), ds.get("data_dir"))
      meta = schema.load_meta(builder)
    log(
      f"data {ds.name}/{ds.get('builder_config')} ready in {timings['data_s']:.1f} s "
      f"(V={meta.num_verts}, T={meta.texture_size}, {meta.num_cameras} cameras)"
    )

    # ----------------------------------------------------------------------------------------------
    # train
    with timed(timings, "train"):
      workdirs = train_models(config, workdir)
    model_keys = {name: workdir_lib.fingerprint_of_done(d) for name, d in workdirs.items()}

    # ----------------------------------------------------------------------------------------------
    # load
    with timed(timings, "load"):
      bundles = load_bundles(workdirs, meta)
      source = input_pipeline.open_split(builder, config.eval.split)
      eval_set = evaluate.load_eval_set(
        source,
        meta,
        config.eval.split,
        max_frames=config.eval.max_frames,
        view_stride=config.eval.view_stride,
      )
      settings = evaluate.eval_settings(meta.image_size)
    log(
      f"evaluation set: {eval_set['verts'].shape[0]} held-out frames x "
      f"{eval_set['camera_K'].shape[1]} dome views"
    )

    # ----------------------------------------------------------------------------------------------
    # tune
    with timed(timings, "tune"):
      tuned, sweep = tuning.tune_fit_options(config, bundles, builder, meta, workdir, model_keys)

    # ----------------------------------------------------------------------------------------------
    # fit + evaluate
    with timed(timings, "fit_eval"):
      results = run_methods(config, bundles, eval_set, workdir, settings, model_keys, tuned)
    rows = [
      evaluate.summarize(
        m,
        i,
        {k: results[(m, i)][k] for k in ("geometry_error", "image_mse", "psnr", "ssim")},
        float(results[(m, i)]["seconds"]),
      )
      for (m, i) in results
    ]
    # Paired comparisons over the same frames: lipflow_fit against every other method (and the
    # regressor against the mean mesh), per input and metric.
    comparisons = evaluate.compare(results, evaluate.comparison_pairs(tuple(config.eval.methods)))

    # ----------------------------------------------------------------------------------------------
    # figures
    figs = []
    with timed(timings, "figures"):
      if config.eval.get("figures", True):
        figs = figures.make_figures(config, bundles, eval_set, results, meta, settings, workdir)
        view_camera = int(eval_set["camera_index"][0, figures.frontal_view(eval_set)])
        figs.append(
          figures.make_sequence_gif(
            config, bundles, source, meta, settings, workdir, view_camera, tuned
          )
        )
    if figs:
      log(f"figures written to {workdir}/figures in {timings['figures_s']:.1f} s")

    # ----------------------------------------------------------------------------------------------
    # live driving: one held-out segment streamed frame by frame, per input
    drives = []
    with timed(timings, "drive"):
      drive_config = config.get("drive")
      for inp in drive_config.inputs if drive_config else ():
        drives.append(
          driving.drive(
            workdir,
            inp,
            drive_config.method,
            steps=drive_config.steps[inp],
            max_frames=drive_config.get("max_frames"),
            run=(config, builder, meta, tuned),
            bundles=bundles,
          )
        )
        log(driving.summary_line(drives[-1]))

  # ------------------------------------------------------------------------------------------------
  # report
  report_config = dict(config.to_dict())
  report_config["timings"] = timings
  report_config["eval_frames"] = eval_set["frame_index"].tolist()
  report_config["eval_cameras"] = eval_set["camera_index"][0].tolist()
  report_config["fit_options_tuned"] = tuned
  report_config["fit_options_sweep"] = sweep
  stages = [k[: -len("_s")] for k in timings if k.endswith("_s") and not k.endswith("_cpu_s")]
  notes = (
    "Timings, wall (CPU, all cores) in s: "
    + ", ".join(f"{k} {timings[k + '_s']:.1f} ({timings[k + '_cpu_s']:.1f})" for k in stages)
    + ". fit_ms_per_frame: wall time of producing the codes (jitted, compilation excluded) / "
    "frames."
  )
  if drives:
    report_config["live_driving"] = drives
    notes += "\n\n" + driving.markdown_section(drives)
  if sweep:
    notes += "\n\n" + tuning.sweep_table(sweep, tuned)
  report = evaluate.write_report(
    workdir, rows, report_config, figures=figs, notes=notes, comparisons=comparisons
  )
  log(f"report written to {workdir}/report.md in {timings['total_s']:.1f} s total")
  print(evaluate.markdown_table(rows), flush=True)
  print(evaluate.comparisons_table(comparisons), flush=True)
  print(evaluate.claim_summary(rows, comparisons), flush=True)
  return report
