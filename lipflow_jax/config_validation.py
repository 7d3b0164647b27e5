"""One validation of a resolved config, used by every entry point (train, main, data build).

``validate_config(config)`` walks a training config (``configs/<name>.py``) or the main job's
config (``configs/demo.py``, whose ``models.<name>`` are training configs) and raises one
``ConfigError`` listing every value out of its allowed range, by key path, and every unknown key of
a training config, with the nearest known key. The allowed ranges are data: ``TRAIN_RANGES`` and
``PIPELINE_RANGES`` (key paths; ``*`` stands for one key).

``parse_flags`` is ``app.run``'s flags parser for entry points with a ``--config`` file flag: a
mistyped ``--config.<key>=`` override gives one line with ml_collections' suggestion instead of a
traceback. ``validate_or_exit`` turns a ``ConfigError`` into one line and exit status 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import re
import sys
from typing import Any, Mapping, Optional

from absl import app, flags

from lipflow_jax import config_base, models
from lipflow_jax.data import capture
from lipflow_jax.fit import methods as fit_methods
from lipflow_jax.models import decoder, encoders, flow


class ConfigError(ValueError):
  """A config value out of range or an unknown key; the message names every key path."""


@dataclasses.dataclass(frozen=True)
class Range:
  """Allowed values of one config key.

  lo / hi: bounds (inclusive unless ``lo_open`` / ``hi_open``); integer: whole numbers only;
  choices: allowed values (strings); optional: None is allowed; each: the value is a tuple whose
  every element must be allowed; length: the tuple's length (with ``each``).
  """

  lo: Optional[float] = None
  hi: Optional[float] = None
  lo_open: bool = False
  hi_open: bool = False
  integer: bool = False
  choices: tuple = ()
  optional: bool = False
  each: bool = False
  length: Optional[int] = None

  def describe(self) -> str:
    if self.choices:
      text = f'one of {list(self.choices)}'
    else:
      kind = 'an integer' if self.integer else 'a finite number'
      bounds = []
      if self.lo is not None:
        bounds.append(f'{">" if self.lo_open else ">="} {self.lo:g}')
      if self.hi is not None:
        bounds.append(f'{"<" if self.hi_open else "<="} {self.hi:g}')
      text = kind + (' ' + ' and '.join(bounds) if bounds else '')
    if self.each:
      text = (f'{self.length} ' if self.length else '') + f'values, each {text}'
    return text + (', or None' if self.optional else '')

  def _ok(self, x) -> bool:
    if self.choices:
      return x in self.choices
    if isinstance(x, bool) or not isinstance(x, (int, float)):
      return False
    if not math.isfinite(x) or (self.integer and x != int(x)):
      return False
    if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
      return False
    if self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi):
      return False
    return True

  def allows(self, value) -> bool:
    if value is None:
      return self.optional
    if self.each:
      if not isinstance(value, (tuple, list)):
        return False
      return (self.length is None or len(value) == self.length) and all(map(self._ok, value))
    return self._ok(value)


def _int(lo=None, hi=None, **kw):
  return Range(lo, hi, integer=True, **kw)


def _positive(**kw):
  return Range(0, lo_open=True, **kw)


def _fraction(**kw):
  return Range(0, 1, **kw)


POSITIVE_INTS = _int(1, each=True)

# A training config (``python -m lipflow_jax.train``): key path -> allowed values.
TRAIN_RANGES: Mapping[str, Range] = {
  'seed': _int(0),
  'task': Range(choices=('avatar', 'regressor')),
  'dataset.name': Range(choices=('synthetic_capture', 'multiface')),
  'dataset.worker_count': _int(0),
  'dataset.builder_kwargs.texture_size': _int(1, optional=True),
  'dataset.builder_kwargs.image_size': _int(1, optional=True, each=True, length=2),
  'model.prior': Range(choices=models.PRIORS),
  'model.encoder_input': Range(choices=('x',) + encoders.CONDITIONS),
  'model.conditions': Range(choices=encoders.CONDITIONS, each=True),
  'model.z_dim': _int(1),
  'model.num_vertices': _int(1, optional=True),
  'model.tex_size': _int(1, optional=True),
  'model.num_cameras': _int(1, optional=True),
  'model.keypoint_image_size': _int(1, optional=True, each=True, length=2),
  'model.enc_channels': POSITIVE_INTS,
  'model.enc_tex_features': _int(1),
  'model.enc_vert_features': _int(1),
  'model.dec_z_features': _int(1),
  'model.dec_start_size': _int(1),
  'model.dec_start_channels': _int(1),
  'model.dec_channels': POSITIVE_INTS,
  'model.dec_upsample': Range(choices=decoder.UPSAMPLE_MODES),
  'model.context_dim': _int(1),
  'model.keypoint_hidden': POSITIVE_INTS,
  'model.hmc_channels': POSITIVE_INTS,
  'model.hmc_features': _int(1),
  'model.flow_layers': _int(1),
  'model.flow_hidden': POSITIVE_INTS,
  'model.flow_bijector': Range(choices=flow.BIJECTORS),
  'regressor.conditions': Range(choices=encoders.CONDITIONS, each=True),
  'regressor.features': _int(1),
  'regressor.keypoint_hidden': POSITIVE_INTS,
  'regressor.hmc_channels': POSITIVE_INTS,
  'regressor.hmc_features': _int(1),
  'loss.*': Range(0),
  'augment.keypoint_noise_px': Range(0),
  'augment.keypoint_dropout': _fraction(),
  'batch_size': _int(1),
  'num_train_steps': _int(1),
  'optimizer.learning_rate': _positive(),
  'optimizer.warmup_steps': _int(0),
  'optimizer.decay': Range(choices=('cosine', 'linear', 'constant')),
  'optimizer.end_factor': _fraction(),
  'optimizer.clip_norm': _positive(optional=True),
  'optimizer.b1': Range(0, 1, hi_open=True),
  'optimizer.b2': Range(0, 1, hi_open=True),
  'optimizer.eps': _positive(),
  'optimizer.weight_decay': Range(0),
  'max_consecutive_nonfinite': _int(0),
  'log_every': _int(1),
  'image_every': _int(0),
  'eval_every': _int(0),
  'eval_batches': _int(1),
  'checkpoint_every': _int(1),
  'keep_checkpoints': _int(1, optional=True),
  'num_devices': _int(1, optional=True),
}

# Keys of a training config that take any value besides those of ``TRAIN_RANGES`` and the base
# config's (``config_base``): builder options and the regressor's architecture.
TRAIN_OPEN_KEYS = ('dataset.builder_kwargs.*', 'regressor.*')

# The main job's config (``python -m lipflow_jax.main``); each ``models.<name>`` is checked
# against ``TRAIN_RANGES`` too.
PIPELINE_RANGES: Mapping[str, Range] = {
  'seed': _int(0),
  'dataset.name': Range(choices=('synthetic_capture', 'multiface')),
  'fit.*.num_steps': _int(1),
  'fit.*.lr': _positive(),
  'fit.*.schedule': Range(choices=('constant', 'cosine')),
  'fit.lambda_prior.*.*': Range(0),
  'fit.space': Range(choices=('y', 'z')),
  'fit.sequence_warm_steps': _int(0),
  'tune.max_frames': _int(1),
  'tune.lambda_grid.*': Range(0, each=True),
  'tune.schedule_grid.*.num_steps': _int(1, each=True),
  'tune.schedule_grid.*.lr': _positive(each=True),
  'eval.max_frames': _int(1),
  'eval.view_stride': _int(1),
  'eval.chunk': _int(1),
  'eval.figure_frames': _int(0),
  'eval.figure_views': _int(0),
  'eval.num_samples': _int(0),
  'eval.gif_frames': _int(0),
  'eval.methods': Range(choices=tuple(fit_methods.METHODS), each=True),
  'eval.inputs': Range(choices=fit_methods.INPUTS, each=True),
  'drive.method': Range(choices=fit_methods.FITTED),
  'drive.inputs': Range(choices=fit_methods.INPUTS, each=True),
  'drive.steps.*': _int(1),
  'drive.max_frames': _int(1, optional=True),
}


# Dataset keys -> the flags of ``python -m lipflow_jax.data.build`` that set them (for its errors).
DATA_BUILD_FLAGS: Mapping[str, str] = {
  'dataset.name': '--dataset',
  'dataset.builder_config': '--config',
  'dataset.builder_kwargs.texture_size': '--texture_size',
  'dataset.builder_kwargs.image_size': '--image_size',
}

# Builder configs by dataset (``dataset.builder_config``); a dataset not listed takes any name.
BUILDER_CONFIGS: Mapping[str, tuple] = {'synthetic_capture': tuple(capture.CONFIGS)}


# ------------------------------------------------------------------------------------ the walk
def _leaves(config, prefix=()) -> dict:
  """{key path tuple: value} of the non-dict values of a (nested) ConfigDict or dict."""
  out = {}
  items = config.items() if hasattr(config, 'items') else ()
  for key, value in items:
    path = prefix + (str(key),)
    if hasattr(value, 'items'):
      sub = _leaves(value, path)
      out.update(sub if sub else {path: value})
    else:
      out[path] = value
  return out


def _matches(path: tuple, pattern: str) -> bool:
  parts = pattern.split('.')
  return len(parts) == len(path) and all(fnmatch.fnmatchcase(k, p) for k, p in zip(path, parts))


def _known_train_keys() -> set:
  base = config_base.get_base_config()
  keys = set(_leaves(base)) | set(_leaves(config_base.multiface(config_base.get_base_config())))
  return {'.'.join(k) for k in keys} | set(TRAIN_RANGES)


def _check(leaves: dict, ranges: Mapping[str, Range], prefix: str, labels=None) -> list[str]:
  """Problems of ``leaves`` against ``ranges``; a key is shown as ``labels[key]`` if given."""
  problems = []
  for path, value in leaves.items():
    for pattern, allowed in ranges.items():
      if _matches(path, pattern) and not allowed.allows(value):
        key = '.'.join(path)
        key = (labels or {}).get(key, prefix + key)
        problems.append(f'{key} = {value!r}: must be {allowed.describe()}')
  return problems


def _check_builder_config(dataset, prefix: str, labels=None) -> list[str]:
  names = BUILDER_CONFIGS.get(dataset.get('name'))
  value = dataset.get('builder_config')
  if names and value not in names:
    key = (labels or {}).get('dataset.builder_config', prefix + 'builder_config')
    return [f'{key} = {value!r}: must be one of {list(names)}']
  return []


def _check_train(config, prefix: str) -> list[str]:
  leaves = _leaves(config)
  problems = _check(leaves, TRAIN_RANGES, prefix)
  if 'dataset' in config:
    problems += _check_builder_config(config['dataset'], prefix + 'dataset.')
  known = _known_train_keys()
  for path in leaves:
    key = '.'.join(path)
    if key in known or any(_matches(path, p) for p in TRAIN_OPEN_KEYS):
      continue
    if any(k.startswith(key + '.') for k in known):  # an emptied group, e.g. ``loss = {}``
      continue
    near = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f' (did you mean {prefix}{near[0]}?)' if near else ''
    problems.append(f'{prefix}{key}: unknown config key{hint}')
  return problems


def validate_config(config) -> Any:
  """Raises ``ConfigError`` listing every problem of a resolved config; returns it unchanged.

  A config with ``models`` is the main job's: its own keys are checked against
  ``PIPELINE_RANGES`` and each ``models.<name>`` as a training config.
  """
  if 'models' in config:
    problems = _check(
      {k: v for k, v in _leaves(config).items() if k[0] != 'models'}, PIPELINE_RANGES, 'config.'
    )
    for name, sub in config['models'].items():
      problems += _check_train(sub, f'config.models.{name}.')
  else:
    problems = _check_train(config, 'config.')
  if problems:
    raise ConfigError('invalid config: ' + '; '.join(problems))
  return config


def validate_dataset_options(dataset: Mapping[str, Any], labels=None) -> None:
  """The ``dataset.*`` checks of ``TRAIN_RANGES`` for a dataset given by flags (data build):
  ``{'name', 'builder_config', 'builder_kwargs': {...}}``; ``labels`` maps key paths
  (``dataset.builder_config``) to the names shown (``--config``)."""
  leaves = {('dataset',) + k: v for k, v in _leaves(dict(dataset)).items()}
  ranges = {k: v for k, v in TRAIN_RANGES.items() if k.startswith('dataset.')}
  problems = _check(leaves, ranges, 'config.', labels)
  problems += _check_builder_config(dataset, 'config.dataset.', labels)
  if problems:
    raise ConfigError('invalid dataset options: ' + '; '.join(problems))


def validate_or_exit(config) -> Any:
  """``validate_config`` for an entry point: a problem ends the program with one line, status 2."""
  try:
    return validate_config(config)
  except ConfigError as e:
    sys.stderr.write(f'FATAL {e}\n')
    sys.exit(2)


# ------------------------------------------------------------------------------------ flags
_SUGGESTION = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')


def _override_error(argv, error: Exception) -> str:
  """One line for an error raised by a ``--config.<key>=value`` override."""
  text = str(error).replace('\\n', '\n').replace("\\'", "'")
  found = _SUGGESTION.search(text)
  overrides = [a.split('=', 1)[0] for a in argv if a.startswith('--config.')]
  if found:
    want, got = found.groups()
    for flag in overrides:
      parts = flag.split('.')
      if got in parts[1:]:
        i = parts.index(got, 1)
        fixed = '.'.join(parts[:i] + [want] + parts[i + 1 :])
        return f'{flag}: unknown config key {got!r} (did you mean {fixed}?)'
    return f'unknown config key {got!r} (did you mean {want!r}?)'
  line = next((s.strip(" '\"") for s in text.splitlines() if s.strip(" '\"")), repr(error))
  return f'bad --config override ({" ".join(overrides) or "--config"}): {line}'


def parse_flags(argv):
  """``app.run(main, flags_parser=parse_flags)``: absl's parser, with one line instead of a
  traceback for a ``--config.<key>=value`` override that names no key or has a bad value."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    if isinstance(e, flags.Error):
      raise
    sys.stderr.write(f'FATAL Flags parsing error: {_override_error(argv, e)}\n')
    sys.exit(1)
