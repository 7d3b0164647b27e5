"""grain input pipeline over the TFDS array_record data sources: build a dataset on first use, open
its splits, make grain iterators over this process's shard, peek one example batch for shapes,
gather evaluation sets.

Datasets (``prepare(name, ...)``): ``synthetic_capture`` (builder config 'tiny' | 'default') and
``multiface`` (``builder_kwargs``: ``entity_dir`` and any
``lipflow_jax.data.multiface.MultifaceOptions`` field).

    builder = prepare("synthetic_capture", "default", data_dir)      # or, for a built one:
    sources, meta = load_dataset(data_dir, "synthetic_capture", "default")
    it = make_iterator(sources["train"], meta, batch_size=16, seed=0, cameras=meta.train_cameras)
    batch = next(it)                     # dict of numpy arrays, see ``schema`` for keys and shapes
    state = it.get_state()               # a JSON-serialisable dict; save with the checkpoint
    it.set_state(state)                  # resumes with the same batches

Sharding is process-count invariant: every process walks the same global order of the records
(shuffled by ``seed``, reshuffled every epoch), cut into global batches of ``batch_size *
shard_count`` rows, and process ``p`` takes rows ``[p * batch_size, (p + 1) * batch_size)`` of each.
The step-k batches of the processes, concatenated in process order, are the step-k batch of a
one-process run with batch size ``batch_size * shard_count`` (same seed), and each process reads
(loads) only the records it yields. Selection of cameras / segments happens before this, from the
record index in ``DatasetMeta.splits`` (no record is read to filter).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from absl import logging
import grain.python as grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from lipflow_jax import distributed
from lipflow_jax.data import builders, multiface, schema


def dataset_dir(
  data_dir, name: str = "synthetic_capture", config: str = "default", version: Optional[str] = None
) -> str:
  """The versioned directory ``data_dir/name/config/version`` (latest version if not given)."""
  base = os.path.join(os.fspath(data_dir), name, config)
  if version is None:
    if not os.path.isdir(base):
      raise FileNotFoundError(
        f"dataset not built: {base} does not exist (run python -m lipflow_jax.data.build)"
      )
    versions = sorted(
      (v for v in os.listdir(base) if v[:1].isdigit() and "incomplete" not in v),
      key=lambda v: tuple(int(x) for x in v.split(".")),
    )
    if not versions:
      raise FileNotFoundError(f"dataset not built: no version directory in {base}")
    version = versions[-1]
  return os.path.join(base, version)


def load_dataset(
  data_dir, name: str = "synthetic_capture", config: str = "default"
) -> Tuple[Dict[str, object], schema.DatasetMeta]:
  """({split: TFDS ArrayRecordDataSource}, DatasetMeta) of a built dataset (no builder code
  needed)."""
  d = dataset_dir(data_dir, name, config)
  builder = tfds.builder_from_directory(d)
  return builder.as_data_source(), schema.load_meta(d)


class SubsetSource(grain.RandomAccessDataSource):
  """The records ``indices`` of a data source, in that order (a view; nothing is copied)."""

  def __init__(self, source, indices):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i):
    return self._source[int(self._indices[i])]

  def __repr__(self) -> str:
    return f"SubsetSource({self._source!r}, {len(self._indices)} records)"


def _split_name(source, split: Optional[str]) -> str:
  if split is not None:
    return split
  s = getattr(source, "split", None)
  if isinstance(s, str):
    return s.split("[")[0]
  raise ValueError("cannot tell the split of this source: pass split='train' or 'test'")


def select_records(
  meta: schema.DatasetMeta,
  split: str,
  cameras: Optional[Sequence[str]] = None,
  segments: Optional[Sequence[str]] = None,
  frames: Optional[Sequence[int]] = None,
) -> np.ndarray:
  """Record indices of ``split`` whose camera / segment / global frame index is in the given sets
  (None: all)."""
  if split not in meta.splits:
    raise KeyError(f"split {split!r} not in the dataset (has {sorted(meta.splits)})")
  cols = meta.splits[split]
  keep = np.ones(len(cols["frame_index"]), bool)
  if cameras is not None:
    keep &= np.isin(cols["camera_index"], meta.camera_indices(list(cameras)))
  if segments is not None:
    keep &= np.isin(cols["segment_index"], meta.segment_indices(list(segments)))
  if frames is not None:
    keep &= np.isin(cols["frame_index"], np.asarray(list(frames)))
  return np.nonzero(keep)[0]


class Normalize(grain.MapTransform):
  """Stored example -> batch form (``schema.normalize_example``); drops strings."""

  def __init__(self, meta: schema.DatasetMeta):
    self._meta = meta

  def map(self, element):
    return schema.normalize_example(element, self._meta)


def make_iterator(
  source,
  meta: schema.DatasetMeta,
  *,
  batch_size: int,
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: Optional[int] = None,
  shard_index: Optional[int] = None,
  shard_count: Optional[int] = None,
  drop_remainder: bool = True,
  worker_count: int = 0,
  split: Optional[str] = None,
  cameras: Optional[Sequence[str]] = None,
  segments: Optional[Sequence[str]] = None,
):
  """A grain iterator of normalised batches (dicts of numpy arrays with a leading axis
  ``batch_size``).

  Args:
    source: a TFDS data source (``load_dataset(...)[0]['train']``) or any random-access source of
      stored examples.
    meta: the dataset's ``DatasetMeta``.
    batch_size: per-process batch size B; the global batch is G = B * shard_count rows.
    seed: shuffling seed (32-bit, >= 0); the global order is a pure function of (seed, epoch), the
      same on every process and for every ``shard_count``.
    shuffle: shuffle the global order every epoch (a new permutation per epoch); False: record
      order.
    num_epochs: None = repeat forever.
    shard_index / shard_count: this process's shard (default ``jax.process_index()`` /
    ``jax.process_count()``). Each epoch's global order is cut into global batches of G rows; shard
    p yields rows [p*B, (p+1)*B) of each, so concatenating the shards' step-k batches in shard order
    gives the step-k batch of a one-shard iterator with ``batch_size=G``. Exactly once per epoch:
    every record of the epoch's order that falls in a kept global batch is yielded (and read) by
    exactly one shard, once; no record is yielded twice.
    drop_remainder: True: the last N mod G records of each epoch's order (N records, at most G - 1;
      different records every epoch when shuffling) are dropped, by every shard, so every step has a
      full global batch.
      False: the last, incomplete global batch (N mod G rows) is kept and split the same way, so
        every record is used each epoch; then shard p's last batch of the epoch holds its rows of it
        (fewer than B, or no batch at all when N mod G <= p*B), and shards may yield different
        numbers of batches.
    worker_count: grain worker processes (0: read with threads in this process).
    split: 'train' / 'test' (default: the source's own split); needed with ``cameras`` /
      ``segments``.
    cameras / segments: keep only these dome cameras / segments (names), e.g.
    ``meta.train_cameras``.
  Returns:
    A grain ``DatasetIterator``: ``next(it)``, ``it.get_state()`` (a JSON-serialisable dict),
    ``it.set_state(state)``.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if cameras is not None or segments is not None:
    source = SubsetSource(
      source, select_records(meta, _split_name(source, split), cameras, segments)
    )
  shard_index = jax.process_index() if shard_index is None else int(shard_index)
  shard_count = jax.process_count() if shard_count is None else int(shard_count)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  num_records, global_batch = len(source), batch_size * shard_count
  # Every transformation below maps index (epoch * len + i) of its output to the same epoch of its
  # parent, so the final repeat() walks epoch after epoch of the shuffle (reseeded per epoch) with
  # per-epoch batching.
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  if drop_remainder:
    ds = ds[: num_records - num_records % global_batch]  # the epoch's whole global batches
  # Batches of B within each epoch (only its last one can be short); every shard_count-th of them,
  # from shard_index on, are this shard's rows of the global batches: records are read only for
  # those.
  ds = ds.map(Normalize(meta)).batch(batch_size, drop_remainder=False)
  ds = ds[shard_index::shard_count]
  if len(ds) == 0 and num_epochs is None:
    raise ValueError(
      f"shard {shard_index} of {shard_count} gets no batch of {batch_size} out of "
      f"{num_records} records"
    )
  if num_epochs is None or num_epochs > 1:
    ds = ds.repeat(num_epochs)
  it_ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=8, prefetch_buffer_size=8)
  )  # batches read ahead
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)


def make_train_iterator(source, meta: schema.DatasetMeta, **kwargs):
  """``make_iterator`` over the training cameras only (the held-out ones stay unseen)."""
  kwargs.setdefault("split", "train")
  return make_iterator(source, meta, cameras=meta.train_cameras, **kwargs)


def load_frames(
  source,
  meta: schema.DatasetMeta,
  *,
  split: Optional[str] = None,
  cameras: Optional[Sequence[str]] = None,
  frames: Optional[Sequence[int]] = None,
  max_frames: Optional[int] = None,
  keys: Optional[Sequence[str]] = None,
) -> Dict[str, np.ndarray]:
  """An evaluation set: the examples of a split grouped by frame (all requested cameras of each
  frame).

  Args:
    source: data source of the split; meta: ``DatasetMeta``.
    split: default the source's split.
    cameras: dome cameras to include (default all, in ``meta.camera_names`` order); frames that lack
      one of them (skipped bad input) are dropped.
    frames: global frame indices to include (default all of the split); max_frames: keep the first
      N.
    keys: batch keys to return (default all numeric ones).
  Returns:
    dict of numpy arrays with a leading frame axis N: per-frame keys (``schema.FRAME_KEYS``, e.g.
    ``verts`` [N, V, 3] normalised, ``keypoints`` [N, P, 2], ``hmc`` [N, 3, h, w, 1]) and per-camera
    keys stacked on a camera axis (``schema.CAMERA_KEYS``, e.g. ``image`` [N, C, H, W, 3],
    ``camera_Rt`` [N, C, 3, 4]).
  """
  split = _split_name(source, split)
  cols = meta.splits[split]
  cam_idx = list(range(meta.num_cameras)) if cameras is None else meta.camera_indices(list(cameras))
  frame_ids = np.unique(cols["frame_index"]) if frames is None else np.asarray(list(frames))
  lookup = {
    (int(f), int(c)): r for r, (f, c) in enumerate(zip(cols["frame_index"], cols["camera_index"]))
  }
  complete = [f for f in frame_ids if all((int(f), c) in lookup for c in cam_idx)]
  if max_frames is not None:
    complete = complete[:max_frames]
  if not complete:
    raise ValueError(f"no frame of split {split!r} has all of the cameras {cameras or 'all'}")
  out: Dict[str, list] = {}
  for f in complete:
    per_cam = [schema.normalize_example(source[lookup[(int(f), c)]], meta) for c in cam_idx]
    for k, v in per_cam[0].items():
      if keys is not None and k not in keys:
        continue
      if k in schema.CAMERA_KEYS:
        out.setdefault(k, []).append(np.stack([e[k] for e in per_cam]))
      else:
        out.setdefault(k, []).append(v)
  return {k: np.stack(v) for k, v in out.items()}


DATASETS = ("synthetic_capture", "multiface")


def _builder(
  name: str,
  builder_config: Optional[str],
  data_dir: Optional[str],
  builder_kwargs: Mapping[str, Any],
):
  kwargs = dict(builder_kwargs or {})
  if data_dir is not None:
    kwargs["data_dir"] = os.path.expanduser(data_dir)
  if name == "synthetic_capture":
    return builders.SyntheticCapture(config=builder_config or "default", **kwargs)
  if name == "multiface":
    entity_dir = kwargs.pop("entity_dir", None)
    data_dir = kwargs.pop("data_dir", None)
    options = {
      k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items() if v is not None
    }
    return builders.Multiface(
      data_dir=data_dir,
      entity_dir=entity_dir,
      options=multiface.MultifaceOptions(**options),
      config=builder_config,
    )
  raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")


def _is_prepared(builder) -> bool:
  return os.path.exists(os.path.join(os.fspath(builder.data_dir), schema.META_JSON))


def prepare(
  name: str,
  builder_config: Optional[str] = None,
  data_dir: Optional[str] = None,
  builder_kwargs: Optional[Mapping[str, Any]] = None,
):
  """The dataset's TFDS builder, generating the dataset first if it is missing.

  In a multi-process job process 0 builds (on a file system all processes share) while the others
  wait.
  """
  builder = _builder(name, builder_config, data_dir, builder_kwargs or {})
  was_prepared = _is_prepared(builder)
  if jax.process_index() == 0 and not was_prepared:
    logging.info(
      "Building dataset %s/%s in %s (first use).",
      name,
      builder.builder_config.name,
      builder.data_dir,
    )
    print(
      f"Building dataset {name}/{builder.builder_config.name} in {builder.data_dir} (first use) "
      "...",
      flush=True,
    )
    builder.download_and_prepare(file_format=builders.FILE_FORMAT)
  distributed.sync(f"prepare:{name}")  # a no-op for one process
  # A builder made before the data existed (on every process) does not see the written files: make
  # it again.
  if not was_prepared:
    builder = _builder(name, builder_config, data_dir, builder_kwargs or {})
  return builder


def open_split(builder, split: str):
  """A random-access data source over ``split`` (KeyError if the dataset has no such split)."""
  sources = builder.as_data_source()
  if split not in sources:
    raise KeyError(f"split {split!r} not in the dataset (has {sorted(sources)})")
  return sources[split]


def example_batch(source, meta: schema.DatasetMeta, batch_size: int = 1) -> dict:
  """The first ``batch_size`` records as a batch (for shapes and initialisation); no iterator
  state changes."""
  it = make_iterator(
    source,
    meta,
    batch_size=batch_size,
    seed=0,
    shuffle=False,
    num_epochs=1,
    shard_index=0,
    shard_count=1,
    drop_remainder=False,
    worker_count=0,
  )
  return next(it)
