"""Optional test dependencies: a skip on a developer's checkout, a failure in CI.

The `test` extra installs torch (CPU wheel), diffusers, transformers, peft and
the other libraries our results are compared with, so CI runs every test that
needs them. A checkout installed without the extra skips those tests; under CI
(`CI` set) a missing library is an import error, never a silent skip.
"""

import importlib
import os

import pytest


def require(module: str):
  """The imported `module`; skips the calling test module or test when it is missing,
  except under CI, where the ImportError stands."""
  if os.environ.get("CI"):
    return importlib.import_module(module)
  return pytest.importorskip(module)
