"""The README's library example, as a doctest (run from the checkout and from the built wheel)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- library-example -->"


def library_example(readme: str | None = None) -> str:
  """The ```python block after the `<!-- library-example -->` marker of README.md, as text.

  Raises:
    ValueError: the marker or its code block is missing (the README was edited).
  """
  if readme is None:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
      readme = f.read()
  if MARKER not in readme:
    raise ValueError(f"README.md has no {MARKER!r} marker")
  after = readme.split(MARKER, 1)[1].lstrip()
  if not after.startswith("```python\n"):
    raise ValueError(f"README.md: no ```python block right after {MARKER!r}")
  body = after[len("```python\n"):]
  if "\n```" not in body:
    raise ValueError("README.md: the library example's code block is not closed")
  return body.split("\n```", 1)[0] + "\n"
