"""Metrics out of a run, from process 0 only: TensorBoard (tensorboardX) scalars and images,
``metrics.jsonl``
(one JSON object per write: ``{"step": s, "<name>": value, ...}``) and the resolved config
(``config.json``)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
import tensorboardX

METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'


def _to_float(x) -> float:
  return float(np.asarray(x))


class MetricWriter:
  """Writes scalars and images of process 0; a no-op elsewhere (or when ``enabled=False``)."""

  def __init__(self, workdir: str, enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = (jax.process_index() == 0) if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a', encoding='utf-8')
    if tensorboard:
      self._tb = tensorboardX.SummaryWriter(logdir=os.path.join(workdir, 'tensorboard'))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    if not self.enabled:
      return
    values = {k: _to_float(v) for k, v in scalars.items()}
    record = {'step': int(step)}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
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
  """Reads ``metrics.jsonl`` back (tests, reports)."""
  path = os.path.join(workdir, METRICS_FILE)
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def mean_metrics(history: list[Mapping[str, Any]]) -> dict:
  """Averages per-step host metrics over steps, ignoring non-finite values of skipped steps;
  ``skipped`` is
  summed (the number of skipped steps in the window)."""
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
