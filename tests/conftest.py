"""Test session setup.

Eight fake CPU devices are configured before JAX initialises, so that
`jax.shard_map` tests run in-process over a real 8-device mesh; tests that
need one device take `jax.devices()[:1]`.

Tests marked `compile_only` compile for TPU slices or H100 hosts through the
compile-only plugins, which the test environment does not have (they would
make its `import jax` print TPU / CUDA errors): such a test takes the
`plan_plugins` fixture (tests/plan_plugins.py installs them once) and runs,
as written, in a child pytest whose path has them.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache per test session, made by the controller
# before the xdist workers start (they, and the CLI runs the tests start,
# inherit it): many tests compile the same small train steps and samplers, and
# a hit loads the executable instead of compiling it again. It is the same
# executable (the key is the program, its options and the jax version), and
# the folder is removed when the session ends, so nothing outlives the run.
# Not in the child pytest of a compile_only test (plan_plugins.CHILD_ENV set),
# which compiles for chips this machine does not have, uncached.
_OWN_CACHE = ("PYTEST_XDIST_WORKER" not in os.environ
              and "JAX_COMPILATION_CACHE_DIR" not in os.environ
              and "SSIM_JAX_PLAN_PLUGINS" not in os.environ)
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ssim_jax_test_jit_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  # A size limit turns on the cache's file lock: a worker never reads an entry
  # that another process is still writing.
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 * 2**30))

import jax  # noqa: E402
import pytest  # noqa: E402

import plan_plugins as plan_plugins_lib  # noqa: E402  (tests/ is on the path)

jax.config.update("jax_num_cpu_devices", 8)

import hypothesis  # noqa: E402

# One deterministic profile: CI is reproducible and bounded in time.
hypothesis.settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=15,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow,
                           hypothesis.HealthCheck.data_too_large],
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def plan_plugins() -> str:
  """The folder of the compile-only plugins (installed once per jaxlib version)."""
  return plan_plugins_lib.install()


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "compile_only: compiles for TPU/GPU topologies; runs in a child pytest with "
      "the compile-only plugins on its path (takes the plan_plugins fixture)")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
  """Runs a `compile_only` test in a child pytest with the plugins, unless this is that child."""
  if pyfuncitem.get_closest_marker("compile_only") is None or os.environ.get(
      plan_plugins_lib.CHILD_ENV):
    return None
  if "plan_plugins" not in pyfuncitem.funcargs:
    pytest.fail(f"{pyfuncitem.nodeid} is marked compile_only: it must take the plan_plugins "
                "fixture (the folder its child pytest runs with)")
  cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", pyfuncitem.nodeid]
  result = subprocess.run(cmd, cwd=plan_plugins_lib.ROOT, capture_output=True, text=True,
                          env=plan_plugins_lib.child_env(pyfuncitem.funcargs["plan_plugins"]),
                          check=False)
  print(result.stdout[-6000:])
  if result.returncode or not re.search(r"^1 passed", result.stdout, re.M):  # a skip fails too
    pytest.fail(f"in the child pytest with the compile-only plugins ({' '.join(cmd)}), "
                f"exit {result.returncode}:\n{result.stdout[-8000:]}\n{result.stderr[-3000:]}",
                pytrace=False)
  return True
