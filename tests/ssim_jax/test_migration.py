"""docs/migration.rst: each library's example runs against that library and agrees with it.

The `test` extra installs dm-pix, pytorch-msssim, torchmetrics and torch, so CI runs every
example; a checkout installed without the extra skips the examples whose library is missing,
except under CI (`CI` set), where a missing library is a failure, not a skip.
"""

import doctest
import io
import os
import re

import numpy as np
import pytest

import optional  # tests/ is on the path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGE = os.path.join(ROOT, "docs", "migration.rst")
# Each example's library, and what it imports.
LIBRARIES = {"dm_pix": ("dm_pix",), "pytorch_msssim": ("torch", "pytorch_msssim"),
             "skimage": ("skimage",), "torchmetrics": ("torch", "torchmetrics")}


def _examples() -> dict[str, str]:
  with open(PAGE, encoding="utf-8") as f:
    text = f.read()
  found = re.findall(r"\.\. migration-example: (\w+)\n(.*?)\.\. end-migration-example", text,
                     flags=re.S)
  return dict(found)


def test_every_library_has_one_example():
  assert sorted(_examples()) == sorted(LIBRARIES)
  for name, text in _examples().items():
    assert text.count(">>>") >= 5, name


@pytest.mark.parametrize("library", sorted(LIBRARIES))
def test_example_agrees_with_the_library(library):
  for module in LIBRARIES[library]:
    optional.require(module)
  text = _examples()[library]
  test = doctest.DocTestParser().get_doctest(text, {}, f"migration.rst[{library}]", PAGE, 0)
  out = io.StringIO()
  with np.printoptions():
    result = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE).run(
        test, out=out.write)
  assert result.attempted >= 5 and result.failed == 0, out.getvalue()
