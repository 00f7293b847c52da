"""Test setup: 8 fake CPU devices, configured before JAX is imported anywhere."""

import atexit
import gc
import os
import shutil
import socket
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' programs are small and compiled once or twice each, so compiling them dominates:
# XLA's HLO passes still run (the same fusions, FLOP counts and numerics up to rounding), only
# LLVM's expensive code-generation passes are skipped. Every process the tests start inherits it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # The tests compile the same small programs many times (each train() call, each training
  # subprocess): one persistent compilation cache for the run, its xdist workers and every
  # process they start. A hit loads the very executable a compilation would give.
  _cache = tempfile.mkdtemp(prefix="sgjax-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

assert jax.device_count() == 8, "tests expect 8 fake CPU devices; set XLA_FLAGS before jax"


# The files that take longest run first, so that parallel runs (launch/test.sh: -n 2
# --dist loadfile) do not end with one worker alone on one of them.
LONGEST_FIRST = ("test_train.py", "test_distributed.py")


def pytest_collection_modifyitems(items):
  rank = lambda item: (LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
                       else len(LONGEST_FIRST))
  items.sort(key=rank)  # stable: the order within each file stays


def _send_generation(objects) -> None:
  """Makes the emulator's media downloads carry the object's generation, as Cloud Storage's
  do (the `x-goog-generation` header); TensorStore reads it to version OCDBT manifests."""
  download = objects.download
  if getattr(download, "sends_generation", False):
    return

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
    except Exception:  # pylint: disable=broad-except  (a missing object: download says 404)
      pass
    return download(request, response, storage, *args, **kwargs)

  download_with_generation.sends_generation = True
  objects.download = download_with_generation  # objects.get calls it for ?alt=media


@pytest.fixture(scope="session")
def gcs_bucket():
  """A gs:// bucket served by a local Cloud Storage emulator (gcp-storage-emulator, in
  memory): epath/gcsfs, orbax's TensorStore and TensorBoard's writer all speak the real JSON
  API to it, from this process and any subprocess it starts. Yields "gs://<bucket>"."""
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  _send_generation(objects)
  with socket.socket() as s:  # a free port
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  bucket = "sgjax-test"
  emulator = server.create_server("localhost", port, in_memory=True, default_bucket=bucket)
  emulator.start()
  url = f"http://localhost:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "sgjax-test"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield f"gs://{bucket}"
  finally:
    gc.collect()  # writers that upload once more when collected do it while the server runs
    emulator.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
