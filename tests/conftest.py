"""Shared test set-up.

Eight host CPU devices are forced before JAX is imported, so that sharding tests can build meshes of 1, 2, 4
or 8 devices in one process; unsharded computations run on device 0 as usual.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
