r"""Builds a dataset and (optionally) writes a contact sheet.

  python -m lipflow_jax.data.build --dataset=synthetic_capture --config=default --data_dir=DIR \
      --contact_sheet=DIR/contact_sheet.png
  python -m lipflow_jax.data.build --dataset=multiface --entity_dir=ENTITY --config=mine \
      --data_dir=DIR --texture_size=256 --image_size=256,167 [--skip_bad_frames]
  # The synthetic capture written in the Multiface layout:
  python -m lipflow_jax.data.build --export_multiface=OUT --config=tiny
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from absl import app, flags, logging
import tensorflow_datasets as tfds

from lipflow_jax import config_validation, geometry
from lipflow_jax.data import builders, capture, contact_sheet, multiface, multiface_export, schema
from lipflow_jax.data import multiface_format as fmt

_DATASET = flags.DEFINE_enum(
  "dataset", "synthetic_capture", ["synthetic_capture", "multiface"], "Builder."
)
_CONFIG = flags.DEFINE_string(
  "config", "default", "Builder config name (synthetic: tiny | default)."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_CONTACT_SHEET = flags.DEFINE_string("contact_sheet", None, "Write a contact sheet PNG here.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild even if the dataset exists.")
_ENTITY_DIR = flags.DEFINE_string("entity_dir", None, "Multiface: the entity directory.")
_TEXTURE_SIZE = flags.DEFINE_integer("texture_size", None, "Multiface: resize textures to T x T.")
_IMAGE_SIZE = flags.DEFINE_string("image_size", None, "Multiface: resize photos to H,W.")
_FRONTAL_CAMERA = flags.DEFINE_string("frontal_camera", None, "Multiface: keypoint camera name.")
_SKIP_BAD = flags.DEFINE_bool(
  "skip_bad_frames", False, "Multiface: skip and count bad per-frame files."
)
_EXPORT = flags.DEFINE_string(
  "export_multiface", None, "Write the synthetic capture as a Multiface entity here."
)


def dir_size(path) -> int:
  """Bytes under ``path``."""
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def _image_size():
  if not _IMAGE_SIZE.value:
    return None
  try:
    return tuple(int(s) for s in _IMAGE_SIZE.value.split(","))
  except ValueError:
    raise app.UsageError(f"--image_size must be H,W (integers), got {_IMAGE_SIZE.value!r}")


def main(argv):
  del argv
  t0 = time.time()
  config_validation.validate_dataset_options(
    dict(
      name=_DATASET.value,
      builder_config=_CONFIG.value,
      builder_kwargs=dict(texture_size=_TEXTURE_SIZE.value, image_size=_image_size()),
    ),
    labels=config_validation.DATA_BUILD_FLAGS,
  )
  try:
    _build(t0)
  except (fmt.MultifaceFormatError, geometry.KRTFormatError, geometry.OBJFormatError) as e:
    sys.stderr.write(f"FATAL bad input: {e}\n")  # names the file (and line)
    sys.exit(1)


def _build(t0):
  if _EXPORT.value:
    cap = capture.Capture(capture.CONFIGS[_CONFIG.value])
    result = multiface_export.export_multiface(cap, _EXPORT.value, progress=True)
    print(
      f"exported {multiface_export.describe_export(result)} to {_EXPORT.value} "
      f"in {time.time() - t0:.1f} s ({dir_size(_EXPORT.value) / 2**20:.1f} MiB)"
    )
    return
  if not _DATA_DIR.value:
    raise app.UsageError("--data_dir is required")
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if _OVERWRITE.value:
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
  if _DATASET.value == "synthetic_capture":
    builder = builders.SyntheticCapture(data_dir=_DATA_DIR.value, config=_CONFIG.value)
  else:
    opts = multiface.MultifaceOptions(
      texture_size=_TEXTURE_SIZE.value,
      image_size=_image_size(),
      frontal_camera=_FRONTAL_CAMERA.value,
      skip_bad_frames=_SKIP_BAD.value,
    )
    builder = builders.Multiface(
      data_dir=_DATA_DIR.value, entity_dir=_ENTITY_DIR.value, options=opts, config=_CONFIG.value
    )
  if _OVERWRITE.value and os.path.isdir(builder.data_dir):
    shutil.rmtree(builder.data_dir)
  builder.download_and_prepare(
    file_format=builders.FILE_FORMAT,
    download_config=tfds.download.DownloadConfig(download_mode=mode),
  )
  build_s = time.time() - t0
  meta = schema.load_meta(builder.data_dir)
  sources = builder.as_data_source()
  counts = {k: len(v) for k, v in sources.items()}
  size_mib = dir_size(builder.data_dir) / 2**20
  print(
    f"{builder.name}/{builder.builder_config.name}: {counts} examples, {size_mib:.1f} MiB "
    f"in {builder.data_dir}; built in {build_s:.1f} s; skipped {meta.skipped}"
  )
  if _CONTACT_SHEET.value:
    path = contact_sheet.make_contact_sheet(sources, meta, _CONTACT_SHEET.value)
    logging.info("contact sheet: %s", path)
    print(f"contact sheet: {path}")


def _main(argv):
  try:
    main(argv)
  except config_validation.ConfigError as e:
    sys.stderr.write(f"FATAL {e}\n")
    sys.exit(2)


if __name__ == "__main__":
  app.run(_main)
