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

import pytest

#: PaddleClas's own PP-ShiTuV2 recipe, unchanged (its SOURCE.md says where it comes from); it sits
#: in ../shared/reference/paddleclas/ beside the repository, here and in CI.
REFERENCE_YAML = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "shared",
    "reference",
    "paddleclas",
    "GeneralRecognitionV2_PPLCNetV2_base.yaml",
)


@pytest.fixture
def reference_yaml() -> str:
    """Path of PaddleClas's recipe; a missing file fails the test (it never skips)."""
    if not os.path.isfile(REFERENCE_YAML):
        pytest.fail(f"{REFERENCE_YAML} is missing: it must sit beside the repository, as in CI")
    return REFERENCE_YAML
