"""Every public function of `ssim_jax` and `ssim_jax.flow` has an example, and it runs.

The examples are the ones the API reference shows (docs/, built by tests/test_docs.py);
here they run as doctests, with the public names of both namespaces in scope.
"""

import doctest
import importlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssim_jax
from ssim_jax import flow

MODULES = ("ssim_jax.ssim", "ssim_jax.ms_ssim", "ssim_jax.psnr", "ssim_jax.flow.conventions",
           "ssim_jax.flow.packing", "ssim_jax.flow.decoded")
# Result types and constants: documented by their fields, no call to show.
NO_EXAMPLE = {"SSIMSums", "DecodedLosses", "DecodedMasses", "DEBUG_ENV", "PIXEL_LOSSES"}


def _globs():
  g = {"jax": jax, "jnp": jnp, "np": np, "ssim_jax": ssim_jax, "flow": flow}
  g.update({n: getattr(ssim_jax, n) for n in ssim_jax.__all__})
  g.update({n: getattr(flow, n) for n in flow.__all__})
  return g


def _examples(obj) -> int:
  return len(doctest.DocTestParser().get_examples(obj.__doc__ or ""))


@pytest.mark.parametrize("namespace", [ssim_jax, flow], ids=["ssim_jax", "ssim_jax.flow"])
def test_every_public_function_has_an_example(namespace):
  missing = [n for n in namespace.__all__
             if n not in NO_EXAMPLE and _examples(getattr(namespace, n)) == 0]
  assert not missing, f"public names without an Example: {missing}"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
  module = importlib.import_module(name)
  tests = doctest.DocTestFinder(exclude_empty=True).find(module, name, extraglobs=_globs())
  assert tests, name
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  out = io.StringIO()
  for test in tests:
    runner.run(test, out=out.write)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, out.getvalue()
