"""Test setup: eight virtual CPU devices for the data-parallel tests (set before jax loads), and
a persistent XLA compilation cache shared by the test processes (xdist workers and the
train.py subprocesses compile many of the same programs)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxrec_test_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
