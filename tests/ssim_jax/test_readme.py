"""The README's library example runs, and prints what the README says it prints."""

import doctest
import io

import numpy as np
import pytest
import readme_example


def test_library_example_is_a_passing_doctest():
  text = readme_example.library_example()
  test = doctest.DocTestParser().get_doctest(text, {}, "README.md library example", "README.md", 0)
  assert len(test.examples) >= 8, "the README's example lost its doctest prompts"
  out = io.StringIO()
  with np.printoptions():  # the example sets the print precision; keep it out of other tests
    result = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE).run(test, out=out.write)
  assert result.failed == 0, out.getvalue()


def test_library_example_extraction_fails_clearly_without_its_marker():
  with pytest.raises(ValueError, match="library-example"):
    readme_example.library_example("# a README without the example\n")
