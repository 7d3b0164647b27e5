"""The main job's figures: fitting targets, fitted renders beside ground truth, prior samples (PNG),
and one held-out sequence fitted frame by frame (GIF). Drawing primitives live in
``lipflow_jax.evaluate.figures``."""

from __future__ import annotations

import os
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lipflow_jax import evaluate, fit
from lipflow_jax.evaluate import figures
from lipflow_jax.experiment import tuning


def frontal_view(eval_set) -> int:
  """Index (within the eval set's views) of the camera looking most directly at the face."""
  return int(np.argmax(np.mean(eval_set["view"][..., 2], axis=0)))


def keypoint_target_image(frame: Dict[str, np.ndarray], meta) -> np.ndarray:
  """uint8 frontal image (low resolution, upscaled) with the visible keypoints drawn."""
  img = figures.to_uint8(frame["image_frontal"])
  scale = 4
  img = np.kron(img, np.ones((scale, scale, 1), np.uint8))
  s = scale * frame["image_frontal"].shape[1] / meta.frontal_size[1]
  return figures.draw_keypoints(
    img, frame["keypoints"], frame["keypoints_visible"], scale=s, radius=2
  )


def hmc_target_image(frame: Dict[str, np.ndarray]) -> np.ndarray:
  """uint8 HMC crops of one frame side by side."""
  return np.concatenate(
    [figures.to_uint8(frame["hmc"][i]) for i in range(frame["hmc"].shape[0])], axis=1
  )


def figure_frames(config, eval_set) -> np.ndarray:
  """Indices (into the eval set) of the frames shown in the figures."""
  n = eval_set["verts"].shape[0]
  return np.unique(np.round(np.linspace(0, n - 1, min(config.eval.figure_frames, n))).astype(int))


def make_figures(config, bundles, eval_set, results, meta, settings, workdir: str):
  """PNG figures: fitting targets, fitted renders beside ground truth (kept from the evaluation),
  samples."""
  fig_dir = os.path.join(workdir, "figures")
  paths = []
  frames = figure_frames(config, eval_set)
  # Fitting targets.
  rows = [
    [
      keypoint_target_image(evaluate.take(eval_set, f), meta),
      hmc_target_image(evaluate.take(eval_set, f)),
    ]
    for f in frames
  ]
  paths.append(
    figures.save_png(
      figures.grid(
        rows,
        [f"frame {int(eval_set['frame_index'][f])}" for f in frames],
        ["keypoints (frontal camera)", "HMC crops (left eye, right eye, mouth)"],
        cell_height=128,
        title="Fitting targets",
      ),
      os.path.join(fig_dir, "targets.png"),
    )
  )
  # Fitted renders beside ground truth, per input.
  num_views = eval_set["camera_K"].shape[1]
  views = np.unique(
    np.round(np.linspace(0, num_views - 1, min(config.eval.figure_views, num_views))).astype(int)
  )
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
    paths.append(
      figures.save_png(
        figures.grid(
          rows,
          labels,
          cols,
          label_width=170,
          title=f"Fitted from {inp}: renders in held-out dome views",
        ),
        os.path.join(fig_dir, f"fits_{inp}.png"),
      )
    )
  # Samples.
  v = frontal_view(eval_set)
  K, Rt = eval_set["camera_K"][0, v], eval_set["camera_Rt"][0, v]
  rng = jax.random.PRNGKey(config.seed)
  sample_bundles = {"DAM: z ~ N(0, I)": bundles["dam"]}
  if "flow" in bundles:
    sample_bundles["flow prior: z = f(y), y ~ N(0, I)"] = bundles["flow"]
  paths.append(
    evaluate.random_samples_figure(
      sample_bundles,
      rng,
      config.eval.num_samples,
      K,
      Rt,
      settings,
      os.path.join(fig_dir, "samples_random.png"),
    )
  )
  f = frames[0]
  frame = {k: eval_set[k][f : f + 1] for k in evaluate.observations(eval_set)}
  targets = {
    "keypoints": keypoint_target_image(evaluate.take(eval_set, f), meta),
    "hmc": hmc_target_image(evaluate.take(eval_set, f)),
  }
  for inp in config.eval.inputs:
    paths.append(
      evaluate.conditional_samples_figure(
        bundles["lipflow"],
        rng,
        frame,
        inp,
        config.eval.num_samples,
        K,
        Rt,
        settings,
        os.path.join(fig_dir, f"samples_conditional_{inp}.png"),
        ground_truth=eval_set["image"][f, v],
        target=targets[inp],
      )
    )
  return [os.path.relpath(p, workdir) for p in paths]


def make_sequence_gif(
  config, bundles, source, meta, settings, workdir: str, view_camera: int, tuned=None
) -> Optional[str]:
  """Fits one held-out sequence frame by frame (warm start) from keypoints with dam_fit and
  lipflow_fit and writes target | ground truth | dam_fit | lipflow_fit as an animated GIF."""
  cols = meta.splits[config.eval.split]
  seg = int(np.min(cols["segment_index"]))
  frames = np.unique(cols["frame_index"][cols["segment_index"] == seg])[: config.eval.gif_frames]
  seq = evaluate.load_eval_set(
    source, meta, config.eval.split, frames=frames, cameras=[meta.camera_names[view_camera]]
  )
  obs = {k: jnp.asarray(v) for k, v in evaluate.observations(seq).items()}
  renders = {}
  for method in ("dam_fit", "lipflow_fit"):
    bundle = bundles[fit.METHODS[method].model]
    opts = tuning.fit_options(config, method, "keypoints", tuned)
    opts["warm_steps"] = min(int(config.fit.sequence_warm_steps), int(opts["num_steps"]))
    res = fit.fit_latents(bundle, obs, method=method, input="keypoints", sequence=True, **opts)
    rgb, _ = evaluate.render_frames(
      fit.decoder_only(bundle),
      res.z,
      jnp.asarray(seq["camera_K"]),
      jnp.asarray(seq["camera_Rt"]),
      settings,
      jnp.asarray(seq["camera_index"]),
    )
    renders[method] = np.asarray(rgb[:, 0])
  height = 128
  gif_frames = []
  for t in range(len(frames)):
    row = [
      keypoint_target_image(evaluate.take(seq, t), meta),
      seq["image"][t, 0],
      renders["dam_fit"][t],
      renders["lipflow_fit"][t],
    ]
    gif_frames.append(
      figures.grid(
        [row],
        col_labels=["target", "ground truth", "dam_fit", "lipflow_fit"],
        cell_height=height,
        title=f"held-out sequence, frame {int(frames[t])}",
      )
    )
  path = figures.save_gif(gif_frames, os.path.join(workdir, "figures", "sequence.gif"))
  return os.path.relpath(path, workdir)
