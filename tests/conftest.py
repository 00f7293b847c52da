"""Test setup: 8 fake CPU devices, configured before JAX is imported anywhere."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # The tests compile the same small programs many times (each train() call, each training
  # subprocess): one persistent compilation cache for the run, its xdist workers and every
  # process they start. A hit loads the very executable a compilation would give.
  _cache = tempfile.mkdtemp(prefix="sgjax-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

assert jax.device_count() == 8, "tests expect 8 fake CPU devices; set XLA_FLAGS before jax"


# The files that take longest run first, so that parallel runs (launch/test.sh: -n 2
# --dist loadfile) do not end with one worker alone on one of them.
LONGEST_FIRST = ("test_train.py", "test_distributed.py")


def pytest_collection_modifyitems(items):
  rank = lambda item: (LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
                       else len(LONGEST_FIRST))
  items.sort(key=rank)  # stable: the order within each file stays
