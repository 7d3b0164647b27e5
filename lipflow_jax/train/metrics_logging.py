"""Metrics out of a run, from process 0 only: TensorBoard (tensorboardX) scalars and images,
``metrics.jsonl`` (one JSON object per logged step: ``{"step": s, "<name>": value, ...}``; writes
of the same step are merged into its line, and a resumed run first drops the lines of the steps it
will replay) and the resolved config (``config.json``)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np
import tensorboardX

METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'


def _to_float(x) -> float:
  return float(np.asarray(x))


def _parse_lines(path: str) -> tuple[list[dict], int]:
  """Records of a ``metrics.jsonl`` and the number of unreadable lines (a line torn by a kill)."""
  records, bad = [], 0
  with open(path, encoding='utf-8') as f:
    for line in f:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        int(record['step'])
      except (ValueError, KeyError, TypeError):
        bad += 1
        continue
      records.append(record)
  return records, bad


def _merge_steps(records) -> list[dict]:
  """One record per step (later keys win), in order of first appearance."""
  by_step: dict[int, dict] = {}
  for r in records:
    by_step.setdefault(int(r['step']), {}).update(r)
  return list(by_step.values())


def trim_metrics(path: str, start_step: int):
  """Rewrites ``metrics.jsonl`` for a run resumed at ``start_step``: drops the lines of later steps
  (they will be logged again), torn lines and repeated steps. Atomic (write, then rename)."""
  if not os.path.exists(path):
    return
  records, bad = _parse_lines(path)
  kept = _merge_steps(r for r in records if int(r['step']) <= start_step)
  if bad == 0 and len(kept) == len(records):
    return
  logging.warning(
    '%s: resuming at step %d; dropped %d lines of later or repeated steps and %d unreadable lines.',
    path,
    start_step,
    len(records) - len(kept),
    bad,
  )
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r) + '\n' for r in kept)
  os.replace(tmp, path)


class MetricWriter:
  """Writes scalars and images of process 0; a no-op elsewhere (or when ``enabled=False``).

  ``start_step``: the step a resumed run starts from; ``metrics.jsonl`` lines of later steps are
  dropped first (``trim_metrics``), so that each step appears at most once.
  """

  def __init__(
    self,
    workdir: str,
    enabled: bool | None = None,
    tensorboard: bool = True,
    start_step: int | None = None,
  ):
    self.enabled = (jax.process_index() == 0) if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    self._last = None  # (step, record, file offset of its line): the line a same-step write merges
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._path = os.path.join(workdir, METRICS_FILE)
    if start_step is not None:
      trim_metrics(self._path, int(start_step))
    self._jsonl = open(self._path, 'a', encoding='utf-8')
    if tensorboard:
      self._tb = tensorboardX.SummaryWriter(logdir=os.path.join(workdir, 'tensorboard'))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    if not self.enabled:
      return
    values = {k: _to_float(v) for k, v in scalars.items()}
    record = {'step': int(step)}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
    self._jsonl.flush()
    if self._last is not None and self._last[0] == int(step):
      _, previous, offset = self._last
      record = {**previous, **record}
      os.truncate(self._path, offset)  # the file is opened for appending: writes go to the end
    else:
      offset = os.fstat(self._jsonl.fileno()).st_size
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    self._last = (int(step), record, offset)
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    """images: {name: [H, W, C] float in [0, 1]} (C in {1, 3})."""
    if not self.enabled or self._tb is None:
      return
    for k, img in images.items():
      img = np.clip(np.asarray(img, np.float32), 0.0, 1.0)
      if img.ndim == 2:
        img = img[..., None]
      self._tb.add_image(k, img, int(step), dataformats='HWC')

  def write_text(self, step: int, name: str, text: str):
    if self.enabled and self._tb is not None:
      self._tb.add_text(name, text, int(step))

  def flush(self):
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def dump_config(config, workdir: str):
  """Writes the resolved config as ``config.json`` (process 0)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  d = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  with open(os.path.join(workdir, CONFIG_FILE), 'w', encoding='utf-8') as f:
    json.dump(d, f, indent=2, sort_keys=True, default=str)


def read_metrics(workdir: str) -> list[dict]:
  """Reads ``metrics.jsonl`` back (tests, reports); a torn last line is ignored."""
  return _parse_lines(os.path.join(workdir, METRICS_FILE))[0]


def mean_metrics(history: list[Mapping[str, Any]]) -> dict:
  """Averages per-step host metrics over steps, ignoring non-finite values of skipped steps;
  ``skipped`` is summed (the number of skipped steps in the window)."""
  if not history:
    return {}
  out = {}
  for k in history[0]:
    vals = np.asarray([float(h[k]) for h in history], np.float64)
    if k == 'skipped':
      out[k] = float(vals.sum())
      continue
    fin = vals[np.isfinite(vals)]
    out[k] = float(fin.mean()) if fin.size else float('nan')
  return out
