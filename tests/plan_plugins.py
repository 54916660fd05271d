"""The compile-only plugins for the plan tests, kept out of the test environment.

libtpu (TPU topologies) and jax-cuda12-plugin + jax-cuda12-pjrt (H100 hosts)
let XLA compile for chips this machine does not have. Installed in the test
environment itself, they would make every `import jax` there try to start
them and print TPU / CUDA initialisation errors. So they are installed once,
without dependencies, into `<repo>/.plan-plugins/<jaxlib version>/`
(gitignored), and only the tests marked `compile_only` see them: those run
in a child pytest with `PYTHONPATH=<that folder>` and `JAX_PLATFORMS=cpu`
(tests/conftest.py).

The versions are the ones that match the installed jax: libtpu as jax's own
`tpu` extra pins it, the CUDA plugin at the jaxlib version. A file lock keeps
pytest-xdist workers from installing twice; a finished folder is reused.

`python tests/plan_plugins.py` installs them and prints the folder, for
running the plan script by hand:

  PYTHONPATH=$(python tests/plan_plugins.py) \\
      python scripts/memory_plan.py --config=configs/tiny.py --topology=h100:8
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Set in the child pytest that runs a `compile_only` test.
CHILD_ENV = "SSIM_JAX_PLAN_PLUGINS"
_DONE = ".complete"  # written last: a folder without it is an interrupted install


def requirements() -> list[str]:
  """The pip requirements of the plugins that match the installed jax and jaxlib.

  Raises:
    RuntimeError: when jax's metadata pins no libtpu in its `tpu` extra.
  """
  jaxlib = importlib.metadata.version("jaxlib")
  libtpu = [f"{req.name}{req.specifier}"
            for req in map(Requirement, importlib.metadata.requires("jax") or ())
            if req.name == "libtpu" and req.marker is not None
            and req.marker.evaluate({"extra": "tpu"})]
  if not libtpu:
    raise RuntimeError("jax's metadata pins no libtpu in its 'tpu' extra: cannot choose the "
                       "libtpu that matches it (importlib.metadata.requires('jax'))")
  return [libtpu[0], f"jax-cuda12-plugin=={jaxlib}", f"jax-cuda12-pjrt=={jaxlib}"]


def install(root: str = ROOT) -> str:
  """Installs the plugins into `<root>/.plan-plugins/<jaxlib version>` once; returns that folder.

  pip (`sys.executable -m pip install --no-deps --target`) installs into a
  temporary folder beside it, renamed into place when complete, under a
  file lock, so concurrent callers (xdist workers) wait for one install.

  Raises:
    RuntimeError: with pip's output, when the install fails.
  """
  parent = os.path.join(root, ".plan-plugins")
  target = os.path.join(parent, importlib.metadata.version("jaxlib"))
  if os.path.exists(os.path.join(target, _DONE)):
    return target
  os.makedirs(parent, exist_ok=True)
  with open(os.path.join(parent, ".lock"), "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(os.path.join(target, _DONE)):  # another worker finished it
      return target
    tmp = tempfile.mkdtemp(dir=parent, prefix=".installing-")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-deps", "--target", tmp, *requirements()]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode:
      shutil.rmtree(tmp, ignore_errors=True)
      raise RuntimeError(f"installing the compile-only plugins failed ({' '.join(cmd)}):\n"
                         f"{result.stdout}\n{result.stderr}")
    with open(os.path.join(tmp, _DONE), "w", encoding="utf-8") as f:
      f.write(" ".join(requirements()) + "\n")
    shutil.rmtree(target, ignore_errors=True)  # an interrupted install's leftovers
    os.rename(tmp, target)
  return target


def child_env(plugins: str) -> dict[str, str]:
  """The environment of a process that compiles for topologies: the plugins on its
  path, JAX on the CPU (the compile-only clients need no local accelerator)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (plugins, ROOT, env.get("PYTHONPATH")) if p)
  env["JAX_PLATFORMS"] = "cpu"
  env[CHILD_ENV] = plugins
  # It compiles for chips this machine does not have: keep that out of the test cache.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


if __name__ == "__main__":
  print(install())
