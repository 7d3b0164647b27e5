"""Test helpers: a tiny synthetic capture built once per test session (see ``tests/conftest.py``).

    def test_something(tiny_capture):
      batch = tiny_capture.batch(batch_size=4)            # normalised training batch (numpy)
      meta = tiny_capture.meta                  # DatasetMeta (faces, uvs, means, cameras, ...)
      it = tiny_capture.iterator("train", batch_size=8, seed=0)
      ev = tiny_capture.eval_set("test")        # held-out frames grouped by frame (all cameras)

The tiny config: V = 550 vertices (22 x 25 grid), T = 32 textures, 6 dome cameras (2 held out) at 32
x 32, frontal camera 32 x 32 (``image_frontal`` 16 x 16), HMC crops 32 x 32, 51 keypoints, 14
factors; 12 training frames (3 segments) and 4 test frames (1 segment): 72 train / 24 test records.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict

import numpy as np

from lipflow_jax.data import builders, input_pipeline, schema

TINY = "tiny"


@dataclasses.dataclass
class TinyCapture:
  """A built tiny ``synthetic_capture``.

  Attributes:
    data_dir: the TFDS data_dir root (``input_pipeline.load_dataset(data_dir, 'synthetic_capture',
      'tiny')``).
    dataset_dir: the versioned directory holding the array_record files and ``meta.json``.
    meta: ``schema.DatasetMeta``.
    sources: {'train': source, 'test': source} (TFDS array_record data sources of stored examples).
  """

  data_dir: str
  dataset_dir: str
  meta: schema.DatasetMeta
  sources: Dict[str, object]

  def iterator(self, split: str = "train", *, batch_size: int = 4, seed: int = 0, **kwargs):
    """``input_pipeline.make_iterator`` over a split (all cameras unless ``cameras=`` is given)."""
    kwargs.setdefault("shard_index", 0)
    kwargs.setdefault("shard_count", 1)
    return input_pipeline.make_iterator(
      self.sources[split], self.meta, batch_size=batch_size, seed=seed, split=split, **kwargs
    )

  def batch(
    self, batch_size: int = 4, split: str = "train", seed: int = 0
  ) -> Dict[str, np.ndarray]:
    """One normalised batch (training cameras only for 'train')."""
    cams = self.meta.train_cameras if split == "train" else None
    return next(self.iterator(split, batch_size=batch_size, seed=seed, cameras=cams))

  def eval_set(self, split: str = "test", **kwargs) -> Dict[str, np.ndarray]:
    """``input_pipeline.load_frames``: frames of a split with all dome cameras."""
    return input_pipeline.load_frames(self.sources[split], self.meta, split=split, **kwargs)


def build_tiny_capture(data_dir, config: str = TINY) -> TinyCapture:
  """Builds (or reuses) the synthetic capture ``config`` under ``data_dir`` and opens it."""
  builder = builders.SyntheticCapture(data_dir=os.fspath(data_dir), config=config)
  builder.download_and_prepare(file_format=builders.FILE_FORMAT)
  return TinyCapture(
    data_dir=os.fspath(data_dir),
    dataset_dir=os.fspath(builder.data_dir),
    meta=schema.load_meta(builder.data_dir),
    sources=builder.as_data_source(),
  )
