"""``load_fitter(workdir)``: a ``ModelBundle`` from a trained run's workdir."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

from lipflow_jax import models, train
from lipflow_jax.data import input_pipeline, schema
from lipflow_jax.fit import bundle as bundle_lib

# Rasterisation for fitting into the headset cameras: one home, shared with the paired headset
# training loss (``models.hmc_raster_settings``, where the choice of settings is explained).
hmc_fit_settings = models.hmc_raster_settings


def dataset_meta_from_config(config: Mapping[str, Any]):
  """The ``DatasetMeta`` of the dataset a run's ``config.json`` names (builds it if missing)."""
  ds = dict(config.get("dataset", {}))
  builder = input_pipeline.prepare(
    ds.get("name", "synthetic_capture"),
    ds.get("builder_config"),
    ds.get("data_dir"),
    ds.get("builder_kwargs") or None,
  )
  return schema.load_meta(builder)


def hmc_size_of(meta) -> Optional[Sequence[int]]:
  for name in ("hmc_size", "hmc_image_size"):
    size = getattr(meta, name, None)
    if size is not None:
      return tuple(int(s) for s in size)
  return None


def bundle_from_trained(
  trained, meta, hmc_settings=None, regressors=None
) -> bundle_lib.ModelBundle:
  """A bundle from ``lipflow_jax.train.Trained`` objects (a LipFlowModel run and optionally a
  regressor run)."""
  if trained.kind != "avatar":
    raise ValueError(f"load_fitter: expected a LipFlowModel run, got a {trained.kind!r} run")
  if hmc_settings is None and hmc_size_of(meta) is not None:
    hmc_settings = hmc_fit_settings(hmc_size_of(meta))
  reg_modules, reg_vars = (), None
  if regressors is not None:
    if regressors.kind != "regressor":
      raise ValueError(
        f"load_fitter: regressor_workdir holds a {regressors.kind!r} run, not a regressor run"
      )
    reg_modules = tuple(sorted(regressors.model.items()))
    reg_vars = {c: {"params": p} for c, p in regressors.params.items()}
  model = trained.model
  return bundle_lib.ModelBundle(
    model=model,
    variables={"params": trained.params},
    meta=schema.MeshMeta.from_dataset_meta(meta),
    hmc_settings=hmc_settings,
    regressors=reg_modules,
    regressor_variables=reg_vars,
    prior=model.prior,
    latent_dim=int(model.z_dim),
  )


def load_fitter(
  workdir: str,
  regressor_workdir: Optional[str] = None,
  meta=None,
  hmc_settings=None,
  step: Optional[int] = None,
) -> bundle_lib.ModelBundle:
  """Loads a trained model (and optionally its DAM-regressor) for fitting.

  Args:
    workdir: a ``lipflow_jax.train`` workdir of a LipFlowModel run (DAM, LiP-Flow, conditional
      Gaussian, ...).
    regressor_workdir: optional workdir of a regressor run (enables ``init='regressor'``).
    meta: the ``DatasetMeta`` (default: loaded from the dataset named in the run's config).
    hmc_settings: ``RasterSettings`` for HMC fitting (default: ``hmc_fit_settings`` at the HMC crop
      size).
    step: checkpoint step (default: the latest).
  Returns:
    ``ModelBundle``.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"load_fitter: no workdir {workdir}")
  trained = train.load_trained(workdir, step)
  if meta is None:
    meta = dataset_meta_from_config(trained.config)
  regressors = train.load_trained(regressor_workdir) if regressor_workdir else None
  return bundle_from_trained(trained, meta, hmc_settings, regressors)
