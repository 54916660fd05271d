"""The distribution: the wheel a user installs holds the SSIM library alone.

Builds the sdist and, from it, the wheel (`python -m build`) out of a copy of this checkout;
checks both with `twine check`; installs the wheel into a fresh virtualenv (no system
site-packages) with its core requirements held at their floors (so CI tests the floors the
metadata promises); then checks what got installed and runs the README's library example
(a doctest) with that interpreter, outside the checkout. Needs PyPI (or a pip cache) for
setuptools, jax, chex and numpy.
"""

import email.parser
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import readme_example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = {"jax", "chex", "numpy"}  # what `import ssim_jax` imports
TRAINER_ONLY = ("flax", "optax", "orbax-checkpoint", "grain", "tensorboardx", "scikit-image",
                "ml-collections", "torch")
NOT_IN_SITE_PACKAGES = ("train", "configs", "scripts", "tests", "benchmarks")

pytestmark = pytest.mark.slow


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _run(cmd, **kwargs):
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)
  assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
  """(wheel path, sdist path), built from a copy of the checkout."""
  tmp = tmp_path_factory.mktemp("dist")
  src = tmp / "src"
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
      ".git", ".ci-venv", ".venv", "runs", "__pycache__", "*.egg-info", "build", "dist",
      ".hypothesis", ".pytest_cache", "_build"))
  _run([sys.executable, "-m", "build", "--outdir", str(tmp / "out"), str(src)])
  wheels = sorted((tmp / "out").glob("*.whl"))
  sdists = sorted((tmp / "out").glob("*.tar.gz"))
  assert len(wheels) == 1 and len(sdists) == 1, os.listdir(tmp / "out")
  _run([sys.executable, "-m", "twine", "check", "--strict", str(wheels[0]), str(sdists[0])])
  return wheels[0], sdists[0]


def _metadata(wheel):
  with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    return email.parser.Parser().parsestr(z.read(name).decode())


def _core_requirements(meta) -> dict[str, str]:
  """{normalised name: version specifier} of the requirements without an extra marker."""
  out = {}
  for req in meta.get_all("Requires-Dist"):
    if "extra ==" in req:
      continue
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(\[[^\]]*\])?\s*\(?([^;)]*)\)?\s*(;.*)?", req)
    assert m, req
    out[_norm(m.group(1))] = m.group(3).replace(" ", "")
  return out


def test_wheel_holds_the_library_alone(dist):
  wheel, _ = dist
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
  tops = {n.split("/", 1)[0] for n in names}
  assert {t for t in tops if not t.endswith(".dist-info")} == {"ssim_jax"}, tops
  assert "ssim_jax/py.typed" in names
  assert "ssim_jax/__init__.py" in names


def test_core_requirements_are_the_library_imports_with_an_uncapped_jax(dist):
  meta = _metadata(dist[0])
  core = _core_requirements(meta)
  assert set(core) == CORE, core
  for name, spec in core.items():
    assert re.fullmatch(r">=[0-9][0-9.]*", spec), f"{name}: {spec!r} is not a plain floor"
  extras = set(meta.get_all("Provides-Extra"))
  assert {"train", "test", "bench", "docs", "tpu"} <= extras, extras
  # The version has one source: the package's __version__ (setuptools reads it statically).
  with open(os.path.join(ROOT, "ssim_jax", "__init__.py"), encoding="utf-8") as f:
    version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
  assert meta["Version"] == version


def test_wheel_installs_alone_at_the_floors_and_runs_the_readme_example(dist, tmp_path):
  wheel, _ = dist
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", str(venv)])  # no system site-packages
  py = str(venv / "bin" / "python")
  core = _core_requirements(_metadata(wheel))
  floors = tmp_path / "floors.txt"
  floors.write_text("".join(f"{name}=={spec[2:]}\n" for name, spec in core.items()))
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
  env["JAX_PLATFORMS"] = "cpu"
  _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(floors),
        str(wheel)], env=env, cwd=tmp_path)

  installed = {_norm(line.split("==")[0]): line.split("==")[1] for line in
               _run([py, "-m", "pip", "freeze", "--all"], env=env, cwd=tmp_path).split()
               if "==" in line}
  for name in TRAINER_ONLY:
    assert name not in installed, f"{name} came with the wheel: {sorted(installed)}"
  assert not [n for n in installed if n.startswith("orbax")]
  for name, spec in core.items():  # CI runs the library at its floors
    assert installed[name] == spec[2:] or installed[name] == spec[2:] + ".0", (name, installed[name])

  site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
              env=env, cwd=tmp_path).strip()
  entries = set(os.listdir(site))
  for name in NOT_IN_SITE_PACKAGES:
    assert name not in entries and f"{name}.py" not in entries, (name, sorted(entries))

  # The README's library example, as a doctest, with the installed package (cwd outside the
  # checkout, so the checkout's ssim_jax cannot shadow it).
  example = tmp_path / "readme_example.txt"
  example.write_text(readme_example.library_example())
  _run([py, "-m", "doctest", "-o", "NORMALIZE_WHITESPACE", str(example)], env=env, cwd=tmp_path)
  where = _run([py, "-c", "import ssim_jax; print(ssim_jax.__file__)"], env=env, cwd=tmp_path)
  assert where.strip().startswith(site), where
