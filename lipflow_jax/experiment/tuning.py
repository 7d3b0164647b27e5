"""The prior weight lambda_prior of every fitted method and input, chosen on the validation split
(never the test split), and the fitting options a method runs with."""

from __future__ import annotations

import os
from typing import Any, Dict

import jax.numpy as jnp
import numpy as np

from lipflow_jax import evaluate, fit
from lipflow_jax.data import input_pipeline
from lipflow_jax.experiment import workdir as workdir_lib
from lipflow_jax.experiment.workdir import fingerprint, log, plain

TUNING_FILE = "tuning.json"


# pylint: disable=redefined-builtin
def fit_options(config, method: str, input: str, lambdas=None) -> Dict[str, Any]:
  """``fit.fit_config`` overrides of a fitted method for an input: ``config.fit[input]``, the prior
  weight (``lambdas`` {method: {input: lambda_prior}} from ``tune_lambda_prior``, else
  ``config.fit.lambda_prior``) and, for LiP-Flow, the optimised space."""
  opts = dict(plain(config.fit[input]))
  opts["lambda_prior"] = float((lambdas or plain(config.fit.lambda_prior))[method][input])
  if method == "lipflow_fit":
    opts["space"] = config.fit.get("space", "z")
  return opts


def tune_lambda_prior(config, bundles, builder, meta, workdir: str, model_keys: Dict[str, str]):
  """lambda_prior of every fitted method and input, chosen on the validation split (never the test
  split).

  For each value of ``config.tune.lambda_grid[input]`` the method fits ``config.tune.max_frames``
  validation frames; the value with the lowest mean geometry error wins (ties: the first). Without a
  grid or a validation split the values of ``config.fit.lambda_prior`` are used as given. Cached in
  ``workdir/tuning.json``.

  Returns:
    (lambdas {method: {input: value}}, sweep rows [{method, input, lambda_prior, geometry_error,
    obs_loss}]).
  """
  lambdas = {m: dict(v) for m, v in plain(config.fit.lambda_prior).items()}
  tune = config.get("tune")
  split = tune.get("split") if tune else None
  if not tune or not tune.get("lambda_grid") or split not in meta.splits:
    log(f"lambda_prior not tuned (no {split!r} split or no grid): using config.fit.lambda_prior")
    return lambdas, []
  val = evaluate.load_eval_set(
    input_pipeline.open_split(builder, split),
    meta,
    split,
    max_frames=tune.max_frames,
    cameras=list(meta.camera_names)[:1],
  )
  jobs = [(m, i) for i in config.eval.inputs for m in config.eval.methods if fit.METHODS[m].fitted]
  key = fingerprint(
    plain(config.fit),
    plain(tune),
    val["frame_index"].tolist(),
    jobs,
    sorted((k, v) for k, v in model_keys.items()),
  )
  path = os.path.join(workdir, TUNING_FILE)
  if os.path.exists(path) and workdir_lib.read_json(path).get("key") == key:
    cached = workdir_lib.read_json(path)
    log(f"lambda_prior: reusing the validation sweep in {path}")
    return cached["lambdas"], cached["sweep"]
  obs = evaluate.observations(val)
  sweep = []
  for n, (method, inp) in enumerate(jobs):
    best = None
    for lam in tune.lambda_grid[inp]:
      options = dict(fit_options(config, method, inp), lambda_prior=float(lam))
      out = evaluate.run_method(method, inp, bundles, obs, options)
      geo = float(
        np.mean(evaluate.geometry_errors(out.bundle, jnp.asarray(out.z), jnp.asarray(val["verts"])))
      )
      obs_loss = float(np.mean(out.losses["obs"][:, -1]))
      sweep.append(
        {
          "method": method,
          "input": inp,
          "lambda_prior": float(lam),
          "geometry_error": geo,
          "obs_loss": obs_loss,
        }
      )
      if best is None or geo < best[1]:
        best = (float(lam), geo)
    lambdas[method][inp] = best[0]
    grid = ", ".join(
      f"{r['lambda_prior']:g}: {r['geometry_error']:.3f}"
      for r in sweep
      if r["method"] == method and r["input"] == inp
    )
    log(
      f"[tune {n + 1}/{len(jobs)}] {method} / {inp}: lambda_prior {best[0]:g} (validation geometry "
      f"{best[1]:.3f}; grid {grid})"
    )
  workdir_lib.write_json(
    path,
    {
      "key": key,
      "split": split,
      "frames": val["frame_index"].tolist(),
      "lambdas": lambdas,
      "sweep": sweep,
    },
  )
  return lambdas, sweep


def sweep_table(sweep, lambdas) -> str:
  """Markdown: validation geometry error of each fitted method and input per lambda_prior (chosen
  in bold)."""
  grid = sorted({r["lambda_prior"] for r in sweep})
  lines = [
    "lambda_prior, chosen on the validation split (mean geometry error of the fitted codes; the "
    "test "
    "split is not used):",
    "",
    "| input | method | " + " | ".join(f"{g:g}" for g in grid) + " |",
    "|---|---|" + "---:|" * len(grid),
  ]
  for method, inp in dict.fromkeys((r["method"], r["input"]) for r in sweep):
    cells = {
      r["lambda_prior"]: r["geometry_error"]
      for r in sweep
      if (r["method"], r["input"]) == (method, inp)
    }
    chosen = lambdas[method][inp]
    fmt = lambda g: (
      "n/a" if g not in cells else f"**{cells[g]:.4f}**" if g == chosen else f"{cells[g]:.4f}"
    )
    lines.append(f"| {inp} | {method} | " + " | ".join(fmt(g) for g in grid) + " |")
  return "\n".join(lines)
