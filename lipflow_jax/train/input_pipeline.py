"""The train loop's view of the data package: build a dataset on first use, open its splits and metadata, make
grain iterators over this process's shard, and peek one example batch for shapes.

Datasets (``config.dataset.name``): ``synthetic_capture`` (builder config 'tiny' | 'default') and ``multiface``
(``builder_kwargs``: ``entity_dir`` and any ``lipflow_jax.data.multiface.MultifaceOptions`` field).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
from absl import logging

from lipflow_jax import distributed
from lipflow_jax.data import builders
from lipflow_jax.data import input_pipeline as data_pipeline
from lipflow_jax.data import schema

DATASETS = ('synthetic_capture', 'multiface')


def _builder(name: str, builder_config: Optional[str], data_dir: Optional[str], builder_kwargs: Mapping[str, Any]):
  kwargs = dict(builder_kwargs or {})
  if data_dir is not None:
    kwargs['data_dir'] = os.path.expanduser(data_dir)
  if name == 'synthetic_capture':
    return builders.SyntheticCapture(config=builder_config or 'default', **kwargs)
  if name == 'multiface':
    from lipflow_jax.data import multiface  # pylint: disable=g-import-not-at-top
    entity_dir = kwargs.pop('entity_dir', None)
    data_dir = kwargs.pop('data_dir', None)
    options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items() if v is not None}
    return builders.Multiface(data_dir=data_dir, entity_dir=entity_dir,
                              options=multiface.MultifaceOptions(**options), config=builder_config)
  raise ValueError(f'unknown dataset {name!r}; expected one of {DATASETS}')


def _is_prepared(builder) -> bool:
  return os.path.exists(os.path.join(os.fspath(builder.data_dir), schema.META_JSON))


def prepare(name: str, builder_config: Optional[str] = None, data_dir: Optional[str] = None,
            builder_kwargs: Optional[Mapping[str, Any]] = None):
  """The dataset's TFDS builder, generating the dataset first if it is missing.

  In a multi-process job process 0 builds (on a file system all processes share) while the others wait.
  """
  builder = _builder(name, builder_config, data_dir, builder_kwargs or {})
  was_prepared = _is_prepared(builder)
  if jax.process_index() == 0 and not was_prepared:
    logging.info('Building dataset %s/%s in %s (first use).', name, builder.builder_config.name,
                 builder.data_dir)
    print(f'Building dataset {name}/{builder.builder_config.name} in {builder.data_dir} (first use) ...',
          flush=True)
    builder.download_and_prepare(file_format=builders.FILE_FORMAT)
  distributed.sync(f'prepare:{name}')  # a no-op for one process
  # A builder made before the data existed (on every process) does not see the written files: make it again.
  if not was_prepared:
    builder = _builder(name, builder_config, data_dir, builder_kwargs or {})
  return builder


def open_split(builder, split: str):
  """A random-access data source over ``split`` (KeyError if the dataset has no such split)."""
  sources = builder.as_data_source()
  if split not in sources:
    raise KeyError(f'split {split!r} not in the dataset (has {sorted(sources)})')
  return sources[split]


def load_meta(builder) -> schema.DatasetMeta:
  return schema.load_meta(builder.data_dir)


def make_iterator(source, meta, *, batch_size: int, seed: int, shuffle: bool, num_epochs: Optional[int],
                  split: str, train_cameras_only: bool, worker_count: int = 0, drop_remainder: bool = True):
  """Iterator over this process's shard of ``source`` yielding dicts of numpy [batch_size, ...] (per process);
  ``get_state``/``set_state`` for checkpoints. ``train_cameras_only``: leave the held-out cameras out."""
  return data_pipeline.make_iterator(
      source, meta, batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
      shard_index=jax.process_index(), shard_count=jax.process_count(), drop_remainder=drop_remainder,
      worker_count=worker_count, split=split, cameras=meta.train_cameras if train_cameras_only else None)


def example_batch(source, meta, batch_size: int = 1) -> dict:
  """The first ``batch_size`` records as a batch (for shapes and initialisation); no iterator state changes."""
  it = data_pipeline.make_iterator(source, meta, batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
                                   shard_index=0, shard_count=1, drop_remainder=False, worker_count=0)
  return next(it)
