"""The fitting options every fitted method runs with for each input: the prior weight lambda_prior
and, where a grid is given, the Adam schedule (steps, learning rate), chosen on the validation
split (never the test split)."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Sequence

import jax.numpy as jnp
import numpy as np

from lipflow_jax import evaluate, fit
from lipflow_jax.data import input_pipeline
from lipflow_jax.experiment import workdir as workdir_lib
from lipflow_jax.experiment.workdir import fingerprint, log, plain

TUNING_FILE = "tuning.json"


# pylint: disable=redefined-builtin
def fit_options(config, method: str, input: str, tuned=None) -> Dict[str, Any]:
  """``fit.fit_config`` overrides of a fitted method for an input: ``config.fit[input]``, then the
  tuned options (``tuned`` {method: {input: {lambda_prior[, num_steps, lr]}}} from
  ``tune_fit_options``; without it the prior weight of ``config.fit.lambda_prior``) and, for
  LiP-Flow, the optimised space."""
  opts = dict(plain(config.fit[input]))
  if tuned is None:
    opts["lambda_prior"] = float(plain(config.fit.lambda_prior)[method][input])
  else:
    opts.update(tuned[method][input])
  if method == "lipflow_fit":
    opts["space"] = config.fit.get("space", "z")
  return opts


def choose(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
  """The one-standard-error rule (Hastie et al., The Elements of Statistical Learning, 7.10): among
  the sweep rows of one method and input ({num_steps, geometry_error, geometry_error_se, ...}),
  the fewest Adam steps whose mean validation error is within one standard error of the lowest
  mean (the lowest row's own standard error); among those, the lowest error (ties: the first
  row)."""
  best = min(rows, key=lambda r: r["geometry_error"])
  bound = best["geometry_error"] + best["geometry_error_se"]
  close = [r for r in rows if r["geometry_error"] <= bound]
  return min(close, key=lambda r: (r["num_steps"], r["geometry_error"]))


def _schedules(tune, input: str) -> List[Dict[str, Any]]:
  """The Adam schedules ({num_steps, lr}) tried for an input: the pairs of
  ``tune.schedule_grid[input]`` (num_steps, lr: tuples of one length), else [{}] (the configured
  schedule alone)."""
  grid = (tune.get("schedule_grid") or {}).get(input)
  if not grid:
    return [{}]
  steps, lrs = tuple(grid["num_steps"]), tuple(grid["lr"])
  if len(steps) != len(lrs):
    raise ValueError(
      f"config.tune.schedule_grid.{input}: num_steps {steps} and lr {lrs} differ in length"
    )
  return [{"num_steps": int(n), "lr": float(lr)} for n, lr in zip(steps, lrs)]


def tune_fit_options(config, bundles, builder, meta, workdir: str, model_keys: Dict[str, str]):
  """The prior weight (and, with ``config.tune.schedule_grid``, the Adam schedule) of every fitted
  method and input, chosen on the validation split (never the test split).

  Each (schedule, lambda_prior) of ``config.tune.schedule_grid[input]`` x
  ``config.tune.lambda_grid[input]`` fits ``config.tune.max_frames`` validation frames; ``choose``
  picks by the mean geometry error: the fewest steps within one standard error of the best, so a
  cheaper schedule wins only where validation cannot tell it apart from the best. Without a grid
  or a validation split the values of ``config.fit`` are used as given. Cached in
  ``workdir/tuning.json``.

  Returns:
    (tuned {method: {input: {lambda_prior[, num_steps, lr]}}}, sweep rows [{method, input,
    lambda_prior, num_steps, lr, geometry_error, geometry_error_se, obs_loss}]).
  """
  tuned = {
    m: {i: {"lambda_prior": float(lam)} for i, lam in v.items()}
    for m, v in plain(config.fit.lambda_prior).items()
  }
  tune = config.get("tune")
  split = tune.get("split") if tune else None
  if not tune or not tune.get("lambda_grid") or split not in meta.splits:
    log(f"fit options not tuned (no {split!r} split or no grid): using config.fit")
    return tuned, []
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
    log(f"fit options: reusing the validation sweep in {path}")
    return cached["tuned"], cached["sweep"]
  obs = evaluate.observations(val)
  sweep = []
  for n, (method, inp) in enumerate(jobs):
    rows = []
    for schedule in _schedules(tune, inp):
      for lam in tune.lambda_grid[inp]:
        options = dict(fit_options(config, method, inp), **schedule, lambda_prior=float(lam))
        out = evaluate.run_method(method, inp, bundles, obs, options)
        errors = np.asarray(
          evaluate.geometry_errors(out.bundle, jnp.asarray(out.z), jnp.asarray(val["verts"]))
        )
        rows.append(
          {
            "method": method,
            "input": inp,
            "lambda_prior": float(lam),
            "num_steps": int(options["num_steps"]),
            "lr": float(options["lr"]),
            "geometry_error": float(np.mean(errors)),
            "geometry_error_se": float(np.std(errors, ddof=1) / math.sqrt(len(errors)))
            if len(errors) > 1
            else 0.0,
            "obs_loss": float(np.mean(out.losses["obs"][:, -1])),
          }
        )
    best = choose(rows)
    tuned[method][inp] = {"lambda_prior": best["lambda_prior"]}
    if _schedules(tune, inp) != [{}]:
      tuned[method][inp].update(num_steps=best["num_steps"], lr=best["lr"])
    sweep += rows
    grid = ", ".join(
      f"{r['num_steps']}/{r['lr']:g}/{r['lambda_prior']:g}: {r['geometry_error']:.3f}" for r in rows
    )
    log(
      f"[tune {n + 1}/{len(jobs)}] {method} / {inp}: {tuned[method][inp]} (validation geometry "
      f"{best['geometry_error']:.3f} +- {best['geometry_error_se']:.3f}; steps/lr/lambda: {grid})"
    )
  workdir_lib.write_json(
    path,
    {
      "key": key,
      "split": split,
      "frames": val["frame_index"].tolist(),
      "tuned": tuned,
      "sweep": sweep,
    },
  )
  return tuned, sweep


def sweep_table(sweep, tuned) -> str:
  """Markdown: validation geometry error of each fitted method, input and Adam schedule per
  lambda_prior (chosen in bold)."""
  grid = sorted({r["lambda_prior"] for r in sweep})
  lines = [
    "Fitting options chosen on the validation split (mean geometry error of the fitted codes; the "
    "test split is not used): the fewest Adam steps within one standard error of the lowest error, "
    "then the lowest error.",
    "",
    "| input | method | steps | lr | " + " | ".join(f"{g:g}" for g in grid) + " |",
    "|---|---|---:|---:|" + "---:|" * len(grid),
  ]
  for method, inp, steps, lr in dict.fromkeys(
    (r["method"], r["input"], r["num_steps"], r["lr"]) for r in sweep
  ):
    cells = {
      r["lambda_prior"]: r["geometry_error"]
      for r in sweep
      if (r["method"], r["input"], r["num_steps"], r["lr"]) == (method, inp, steps, lr)
    }
    chosen = tuned[method][inp]
    picked = chosen.get("num_steps", steps) == steps and chosen.get("lr", lr) == lr
    fmt = lambda g: (
      "n/a"
      if g not in cells
      else f"**{cells[g]:.4f}**"
      if picked and g == chosen["lambda_prior"]
      else f"{cells[g]:.4f}"
    )
    lines.append(
      f"| {inp} | {method} | {steps} | {lr:g} | " + " | ".join(fmt(g) for g in grid) + " |"
    )
  # Where schedules competed, the rule's numbers: the lowest error, its standard error, the choice.
  name = lambda r: f"{r['num_steps']} steps, lr {r['lr']:g}, lambda {r['lambda_prior']:g}"
  notes = []
  for method, inp in dict.fromkeys((r["method"], r["input"]) for r in sweep):
    rows = [r for r in sweep if (r["method"], r["input"]) == (method, inp)]
    if len({(r["num_steps"], r["lr"]) for r in rows}) > 1:
      best, pick = min(rows, key=lambda r: r["geometry_error"]), choose(rows)
      notes.append(
        f"- {inp} / {method}: lowest {best['geometry_error']:.4f} +- "
        f"{best['geometry_error_se']:.4f} ({name(best)}); chosen {pick['geometry_error']:.4f} "
        f"({name(pick)})"
      )
  return "\n".join(lines + ([""] + notes if notes else []))
