"""Data: synthetic capture generator, TFDS builders (synthetic_capture, multiface), grain input
pipeline.

    python -m lipflow_jax.data.build --dataset=synthetic_capture --config=default --data_dir=DIR

    from lipflow_jax import data
    sources, meta = data.load_dataset(DIR, "synthetic_capture", "default")
    it = data.make_train_iterator(sources["train"], meta, batch_size=16, seed=0)
    batch = next(it)                         # keys and shapes: lipflow_jax.data.schema
    eval_set = data.load_frames(sources["test"], meta)

TFDS-dependent names (the builders, the pipeline) are imported on first use.
"""

import importlib

from lipflow_jax.data.schema import (
  HMC_VIEWS,
  DatasetMeta,
  MeshMeta,
  denormalize_tex,
  denormalize_verts,
  load_meta,
  normalize_example,
  normalize_tex,
  normalize_verts,
  save_meta,
)

_LAZY = {
  "SyntheticCapture": "lipflow_jax.data.builders",
  "Multiface": "lipflow_jax.data.builders",
  "FILE_FORMAT": "lipflow_jax.data.builders",
  "make_iterator": "lipflow_jax.data.input_pipeline",
  "make_train_iterator": "lipflow_jax.data.input_pipeline",
  "load_dataset": "lipflow_jax.data.input_pipeline",
  "load_frames": "lipflow_jax.data.input_pipeline",
  "select_records": "lipflow_jax.data.input_pipeline",
  "dataset_dir": "lipflow_jax.data.input_pipeline",
  "Capture": "lipflow_jax.data.capture",
  "CaptureConfig": "lipflow_jax.data.capture",
  "CONFIGS": "lipflow_jax.data.capture",
  "get_capture": "lipflow_jax.data.capture",
  "MultifaceOptions": "lipflow_jax.data.multiface",
  "MultifaceEntity": "lipflow_jax.data.multiface",
  "MultifaceFormatError": "lipflow_jax.data.multiface_format",
  "export_multiface": "lipflow_jax.data.multiface_export",
  "make_contact_sheet": "lipflow_jax.data.contact_sheet",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'lipflow_jax.data' has no attribute {name!r}")


__all__ = [
  "HMC_VIEWS",
  "DatasetMeta",
  "MeshMeta",
  "denormalize_tex",
  "denormalize_verts",
  "load_meta",
  "normalize_example",
  "normalize_tex",
  "normalize_verts",
  "save_meta",
] + sorted(_LAZY)
