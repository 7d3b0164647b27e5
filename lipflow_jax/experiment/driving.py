"""Live driving of a finished main job: one held-out sequence replayed frame by frame as a stream
through ``fit.stream_step_fn``, beside the full per-frame fit of the same frames.

Writes ``<workdir>/drive/<method>_<input>_<segment>/``: ``frames.jsonl`` (per frame: latency, code,
geometry error, PSNR, skipped), ``summary.json``, ``latency.png`` (per-frame latency with the 72 and
90 Hz frame budgets) and ``drive.gif`` (input | ground truth | streamed | full per-frame fit).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lipflow_jax import config_validation, evaluate, fit
from lipflow_jax.data import input_pipeline, schema
from lipflow_jax.evaluate import figures as draw
from lipflow_jax.experiment import figures, tuning
from lipflow_jax.experiment import workdir as workdir_lib
from lipflow_jax.experiment.workdir import log

HEADSET_HZ = (72, 90)  # frame rates of VR headsets: budgets of 13.9 and 11.1 ms a frame


def _steps(n: int) -> str:
  """'1 step', '3 steps'."""
  return f"{n} step" + ("" if n == 1 else "s")


def load_run(workdir: str):
  """(config, builder, meta, tuned fit options) of a finished main-job workdir."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} not found: is {workdir} a workdir of python -m lipflow_jax.main?"
    )
  config = ml_collections.ConfigDict(workdir_lib.read_json(path))
  config_validation.validate_config(config)  # ConfigError naming each bad key
  ds = config.dataset
  builder = input_pipeline.prepare(ds.name, ds.get("builder_config"), ds.get("data_dir"))
  meta = schema.load_meta(builder)
  path = os.path.join(workdir, tuning.TUNING_FILE)
  tuned = workdir_lib.read_json(path)["tuned"] if os.path.exists(path) else None
  return config, builder, meta, tuned


def default_steps(config, input: str) -> int:  # noqa: A002
  """Adam steps per streamed frame: the main job's ``config.drive.steps[input]``, else 5 (a
  workdir made before the main job streamed)."""
  drive_config = config.get("drive")
  return int(drive_config.steps[input]) if drive_config else 5


def _percentiles(ms):
  ms = np.asarray(ms, np.float64)
  return {
    "p50": float(np.percentile(ms, 50)),
    "p95": float(np.percentile(ms, 95)),
    "max": float(np.max(ms)),
  }


def drive(
  workdir: str,
  input: str,  # noqa: A002
  method: str = "lipflow_fit",
  segment: Optional[str] = None,
  steps: int = 5,
  max_frames: Optional[int] = None,
  split: Optional[str] = None,
  *,
  run,
  bundles,
) -> Dict[str, Any]:
  """Streams one held-out segment of a finished main job; returns (and writes) the summary.

  Args:
    workdir: the main job's workdir.
    input: 'keypoints' or 'hmc'.
    method: a fitted method of ``fit.METHODS``.
    segment: a segment of ``split`` (default: its first one).
    steps: Adam steps per frame.
    max_frames: at most this many frames of the segment (default: all).
    split: the held-out split ('test' or 'validation'; default: the evaluation's split). Choose the
      number of steps on the validation split, not on the frames the report is made of.
    run: ``load_run(workdir)``.
    bundles: name -> ``fit.ModelBundle`` of the trained models (at least the method's model).
  """
  spec = fit.METHODS.get(method)
  if spec is None or not spec.fitted:
    raise ValueError(f"drive: method must be one of {fit.FITTED}, got {method!r}")
  if input not in fit.INPUTS:
    raise ValueError(f"drive: input must be one of {fit.INPUTS}, got {input!r}")
  config, builder, meta, tuned = run
  split = split or config.eval.split
  cols = meta.splits.get(split)
  if cols is None or split == "train":
    held_out = [s for s in meta.splits if s != "train"]
    raise ValueError(f"drive: split must be a held-out split, one of {held_out}; got {split!r}")
  names = [meta.segments[i] for i in np.unique(cols["segment_index"])]
  segment = segment or names[0]
  if segment not in names:
    raise ValueError(f"drive: {segment!r} is not a segment of the {split} split; one of {names}")
  bundle = bundles[spec.model]

  # ---------------------------------------------------------------------------------- the sequence
  seg = meta.segments.index(segment)
  frames = np.unique(cols["frame_index"][cols["segment_index"] == seg])[:max_frames]
  source = input_pipeline.open_split(builder, split)
  first = evaluate.load_eval_set(source, meta, split, frames=frames[:1])
  camera = meta.camera_names[int(first["camera_index"][0, figures.frontal_view(first)])]
  seq = evaluate.load_eval_set(source, meta, split, frames=frames, cameras=[camera])
  obs = {k: jnp.asarray(v) for k, v in evaluate.observations(seq).items()}
  n = len(frames)
  log(f"drive: {method} from {input}, segment {segment}: {n} frames, {_steps(steps)} a frame")

  # ---------------------------------------------------------------------------------- stream
  options = tuning.fit_options(config, method, input, tuned)
  lam = options.pop("lambda_prior")
  for k in ("num_steps", "schedule", "warm_steps"):
    options.pop(k, None)
  cfg = fit.fit_config(method, input, lambda_prior=lam, **options)
  step = fit.stream_step_fn(cfg, steps)
  state = fit.stream_init(bundle, cfg)
  frame = lambda i: jax.tree_util.tree_map(lambda x: x[i], obs)
  t0 = time.perf_counter()
  jax.block_until_ready(step(bundle, state, frame(0)))  # compiles
  compile_s = time.perf_counter() - t0
  codes, latency, skipped = [], [], []
  for i in range(n):
    f = frame(i)
    t0 = time.perf_counter()
    state = jax.block_until_ready(step(bundle, state, f))
    latency.append(1e3 * (time.perf_counter() - t0))
    codes.append(np.asarray(state.z))
    skipped.append(int(state.skipped))
  codes = np.stack(codes)

  # ---------------------------------------------------------------------------------- full fit
  full_options = tuning.fit_options(config, method, input, tuned)
  full = evaluate.run_method(method, input, bundles, obs, full_options)
  settings = evaluate.eval_settings(meta.image_size)
  streamed = evaluate.evaluate_codes(bundle, codes, seq, settings, keep_images=range(n))
  batch = evaluate.evaluate_codes(bundle, full.z, seq, settings, keep_images=range(n))

  # ---------------------------------------------------------------------------------- write
  out_dir = os.path.join(workdir, "drive", f"{method}_{input}_{segment}")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "frames.jsonl"), "w") as fh:
    for i in range(n):
      row = {
        "frame": int(frames[i]),
        "latency_ms": latency[i],
        "geometry_error": float(streamed["geometry_error"][i]),
        "psnr": float(streamed["psnr"][i, 0]),
        "full_fit_geometry_error": float(batch["geometry_error"][i]),
        "skipped_so_far": skipped[i],
        "z": codes[i].tolist(),
      }
      fh.write(json.dumps(row) + "\n")
  summary = {
    "method": method,
    "input": input,
    "segment": segment,
    "frames": n,
    "steps_per_frame": steps,
    "compile_s": compile_s,
    "latency_ms": _percentiles(latency),
    "skipped": skipped[-1],
    "stream": {
      "geometry_error": float(np.mean(streamed["geometry_error"])),
      "psnr": float(np.mean(streamed["psnr"])),
    },
    "full_fit": {
      "geometry_error": float(np.mean(batch["geometry_error"])),
      "psnr": float(np.mean(batch["psnr"])),
      "ms_per_frame": 1e3 * full.seconds / n,
      "steps": int(fit.fit_config(method, input, **full_options).num_steps),
    },
  }
  summary["geometry_error_vs_full_fit"] = (
    summary["stream"]["geometry_error"] / summary["full_fit"]["geometry_error"] - 1.0
  )
  workdir_lib.write_json(os.path.join(out_dir, "summary.json"), summary)
  budgets = {f"{hz} Hz ({1e3 / hz:.1f} ms)": 1e3 / hz for hz in HEADSET_HZ}
  plot = draw.line_plot(
    {f"stream, {_steps(steps)}": latency},
    hlines=budgets,
    title=f"{method} from {input}: latency per frame ({segment}; compilation excluded)",
    x_label="frame",
    y_label="ms",
  )
  draw.save_png(plot, os.path.join(out_dir, "latency.png"))
  target = (
    figures.keypoint_target_image
    if input == "keypoints"
    else lambda fr, _: figures.hmc_target_image(fr)
  )
  gif = [
    draw.grid(
      [
        [
          target(evaluate.take(seq, i), meta),
          seq["image"][i, 0],
          streamed["images"][i, 0],
          batch["images"][i, 0],
        ]
      ],
      col_labels=["input", "ground truth", f"streamed ({_steps(steps)})", "full per-frame fit"],
      cell_height=128,
      title=f"frame {int(frames[i])}: {latency[i]:.1f} ms",
    )
    for i in range(n)
  ]
  draw.save_gif(gif, os.path.join(out_dir, "drive.gif"))
  summary["dir"] = out_dir
  return summary


def summary_line(s: Dict[str, Any]) -> str:
  """One printed line of a drive summary."""
  lat = s["latency_ms"]
  return (
    f"{s['method']} from {s['input']} ({s['segment']}, {s['frames']} frames, "
    f"{_steps(s['steps_per_frame'])} a frame): latency p50 {lat['p50']:.1f} ms, "
    f"p95 {lat['p95']:.1f} ms, max {lat['max']:.1f} ms; "
    f"geometry {s['stream']['geometry_error']:.4f} vs full fit "
    f"{s['full_fit']['geometry_error']:.4f} ({100 * s['geometry_error_vs_full_fit']:+.1f} %), "
    f"PSNR {s['stream']['psnr']:.2f} vs {s['full_fit']['psnr']:.2f} dB; full fit "
    f"{s['full_fit']['ms_per_frame']:.1f} ms/frame; skipped {s['skipped']}"
  )


def markdown_section(summaries) -> str:
  """The report's "Live driving" section: one row per streamed input."""
  lines = [
    "## Live driving",
    "",
    "One held-out segment streamed frame by frame (`python -m lipflow_jax.drive`): a few Adam",
    "steps a frame warm-started from the previous frame, against the full per-frame fit of the",
    "same frames. Latency after compilation, batch 1; budgets 13.9 ms (72 Hz), 11.1 ms (90 Hz).",
    "",
    "| input | method | segment | frames | steps/frame | p50 ms | p95 ms | max ms | geometry "
    "(stream / full fit) | PSNR dB (stream / full fit) | full fit ms/frame | skipped |",
    "|---|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|",
  ]
  for s in summaries:
    lat, st, ff = s["latency_ms"], s["stream"], s["full_fit"]
    lines.append(
      f"| {s['input']} | {s['method']} | {s['segment']} | {s['frames']} | {s['steps_per_frame']} | "
      f"{lat['p50']:.1f} | {lat['p95']:.1f} | {lat['max']:.1f} | {st['geometry_error']:.4f} / "
      f"{ff['geometry_error']:.4f} ({100 * s['geometry_error_vs_full_fit']:+.1f} %) | "
      f"{st['psnr']:.2f} / {ff['psnr']:.2f} | {ff['ms_per_frame']:.1f} | {s['skipped']} |"
    )
  return "\n".join(lines) + "\n"
