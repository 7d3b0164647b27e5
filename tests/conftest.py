"""Shared test set-up.

Eight host CPU devices are forced before JAX is imported, so that sharding tests can build meshes of
1, 2, 4 or 8 devices in one process; unsharded computations run on device 0 as usual.
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test run, shared through the environment by the pytest-xdist
# workers and by every subprocess a test starts (multi-process training, the hard-killed trainer,
# the CLIs): identical programs compile once per run, not once per process. (Measured on
# tests/test_train.py, 2 cores: 176 CPU s without, 137 s with; the hard-kill child's run 57 s ->
# 15 s.) The process that starts the run (xdist's controller, or the only one) makes a fresh
# directory, which its workers inherit, and removes it at the end (``pytest_unconfigure``): the
# suite's time on a clean machine is what one run costs. Set JAX_COMPILATION_CACHE_DIR to choose a
# directory (kept), or to an empty string to compile everything in every process.
_OWN_JIT_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_JIT_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lipflow_jax_test_jit_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

from configs import dam_synthetic  # noqa: E402
from lipflow_jax.data import testing  # noqa: E402
from lipflow_jax.train import tasks  # noqa: E402


def pytest_unconfigure(config):
  if _OWN_JIT_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_capture(tmp_path_factory):
  """The tiny ``synthetic_capture`` dataset, built once per session (~10 s, mostly JIT compilation).

  Returns a ``lipflow_jax.data.testing.TinyCapture`` with ``.meta`` (``DatasetMeta``), ``.sources``
  ({'train', 'test'} TFDS data sources), ``.data_dir`` (TFDS root), ``.dataset_dir`` (versioned
  dir), and helpers ``.batch(batch_size=4)`` (one normalised training batch), ``.iterator(split,
  batch_size=.., seed=..)`` and ``.eval_set('test')`` (held-out frames x all dome cameras). Sizes: V
  = 550, T = 32, 6 dome cameras 32 x 32 (2 held out), P = 51 keypoints in a 32 x 32 frontal camera,
  HMC 3 x 32 x 32, 14 factors; 72 train / 24 test records. Set LIPFLOW_TEST_DATA_DIR to keep the
  built data between sessions.
  """
  root = os.environ.get("LIPFLOW_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tiny_capture"))
  return testing.build_tiny_capture(root)


@pytest.fixture(scope="session")
def tiny_dam_params(tiny_capture):
  """Initial parameters (numpy, ``PRNGKey(0)``) of the DAM of ``configs/dam_synthetic.py:tiny``
  built for the tiny capture (``tasks.build_model(config.model, data_sizes(batch, meta))``), made
  once per session: the model's init compiles for seconds, and the tests that need some parameters
  of this model (loss gradients, train steps) share them."""
  config = dam_synthetic.get_config("tiny")
  example = tiny_capture.batch(batch_size=1)
  model = tasks.build_model(config.model.to_dict(), tasks.data_sizes(example, tiny_capture.meta))
  task = tasks.avatar_task(model, loss_weights=config.loss.to_dict())
  return jax.device_get(jax.jit(task.init_params)(jax.random.PRNGKey(0), example))
