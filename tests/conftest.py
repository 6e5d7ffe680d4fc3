"""Test setup: 8 virtual CPU devices for mesh code, set before JAX is imported."""

import os

# Appended, not set by default: an environment that already has XLA_FLAGS (GPU users often
# do) would otherwise give the tests one device and failing mesh tests.
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_COUNT_FLAG}=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile

import jax
import pytest

# Tests build many tiny models with identical shapes: a persistent compilation cache
# makes the second and later compilations of the same step nearly free.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "tmoe_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True, scope="session")
def temporary_files_under_pytest_basetemp(tmp_path_factory):
  """TFDS leaves an empty `mkdtemp` directory behind each time it looks for dataset info offline
  (`DatasetInfo.initialize_from_bucket`); this keeps them in pytest's base temp, which pytest
  prunes, instead of accumulating in /tmp."""
  previous = tempfile.tempdir
  tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
  yield
  tempfile.tempdir = previous
