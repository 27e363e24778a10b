"""Test setup: 8 fake CPU devices (set before JAX starts) with enough XLA:CPU threads for their
collectives (corpo_jax/host_threads.py), the repo root importable, markers, and one persistent
compilation cache for the whole session (pytest-xdist workers inherit the controller's
environment), removed at the end: never the user's ~/.cache/corpo_jax.
"""

import atexit
import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import corpo_jax  # noqa: E402,F401  (importing it sets PJRT_NPROC, inherited by subprocesses)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="corpo_jax_test_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)  # the process that made it


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests (CI runs them too)")


def pytest_collection_modifyitems(items):
  """The slow (end-to-end) tests first, in their collected order: they take 0.5-3 min each, and
  pytest-xdist's work stealing (pytest.ini) then balances the short tests behind them."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
