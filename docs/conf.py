"""Sphinx configuration of the ssim_jax API reference (built in CI with -W: tests/test_docs.py)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # document the checkout's ssim_jax

import ssim_jax  # noqa: E402  pylint: disable=g-import-not-at-top

project = "ssim_jax"
author = "ssim_jax authors"
copyright = "ssim_jax authors"  # pylint: disable=redefined-builtin
release = version = ssim_jax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Single backticks in the docstrings are code, as in the README.
default_role = "code"
exclude_patterns = ["_build", "figures"]
html_theme = "alabaster"
