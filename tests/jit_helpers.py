"""Jitted call helpers shared by the ssim_jax tests.

Eager op-by-op dispatch compiles every primitive separately and is many times
slower on CPU than one jitted call, so tests call the library through these.
"""

import functools

import jax
import numpy as np


def _split(kwargs):
  """Options become static (hashable) arguments, arrays stay traced."""
  arrays = {k: v for k, v in kwargs.items()
            if isinstance(v, (jax.Array, np.ndarray))}
  static = tuple(sorted(
      (k, tuple(v) if isinstance(v, list) else v)
      for k, v in kwargs.items() if k not in arrays))
  return arrays, static


@functools.lru_cache(maxsize=None)
def _jitted(fn, static):
  return jax.jit(lambda *args, **arrays: fn(*args, **arrays, **dict(static)))


def call(fn, *args, **kwargs):
  """fn(*args, **kwargs) under a cached jit: options static, arrays traced."""
  arrays, static = _split(kwargs)
  return _jitted(fn, static)(*args, **arrays)


@functools.lru_cache(maxsize=None)
def _jitted_grad(fn, static, argnums):
  return jax.jit(jax.value_and_grad(
      lambda *args, **arrays: fn(*args, **arrays, **dict(static)),
      argnums=argnums))


def value_and_grad(fn, *args, argnums=0, **kwargs):
  """jit(value_and_grad(fn)) with the same static/traced split as `call`."""
  arrays, static = _split(kwargs)
  return _jitted_grad(fn, static, argnums)(*args, **arrays)
