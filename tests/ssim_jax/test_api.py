"""API conventions, checked by reflection over ssim_jax.__all__."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssim_jax

FUNCTIONS = [name for name in ssim_jax.__all__
             if inspect.isfunction(getattr(ssim_jax, name))]
# Small pyramids so the 12x12 test images fit.
EXTRA = {"ms_ssim": dict(levels=2, window_size=3),
         "ms_ssim_loss": dict(levels=2, window_size=3)}
X = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 12, 12, 3)),
                jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (2, 12, 12, 3)),
                jnp.float32)


def _call(name, x, y):
  fn = getattr(ssim_jax, name)
  if name == "loss_from_sums":
    return fn(ssim_jax.ssim_sums(x, y))
  return fn(x, y, **EXTRA.get(name, {}))


def test_all_is_complete_and_sorted():
  assert list(ssim_jax.__all__) == sorted(ssim_jax.__all__)
  for name in ("ssim", "ssim_map", "ssim_sums", "ssim_loss", "ms_ssim",
               "ms_ssim_loss", "l1_ssim_loss", "SSIMSums"):
    assert name in ssim_jax.__all__
  assert isinstance(ssim_jax.__version__, str)
  assert len(FUNCTIONS) >= 8


@pytest.mark.parametrize("name", FUNCTIONS)
def test_options_are_keyword_only(name):
  params = list(inspect.signature(getattr(ssim_jax, name)).parameters.values())
  positional = [p for p in params
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  n_inputs = 1 if name == "loss_from_sums" else 2
  assert [p.name for p in positional] == (
      ["sums"] if n_inputs == 1 else ["x", "y"])
  for p in params[n_inputs:]:
    assert p.kind == p.KEYWORD_ONLY, (name, p.name)
    assert p.default is not inspect.Parameter.empty, (name, p.name)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_docstrings_document_args_and_returns(name):
  fn = getattr(ssim_jax, name)
  doc = inspect.getdoc(fn)
  assert doc and "Args:" in doc and "Returns:" in doc, name
  for p in inspect.signature(fn).parameters:
    assert f"{p}:" in doc, (name, p)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_results_are_float32_arrays_under_jit(name):
  out = jax.jit(lambda a, b: _call(name, a, b))(X, Y)
  for leaf in jax.tree_util.tree_leaves(out):
    assert isinstance(leaf, jax.Array), name
    assert leaf.dtype == jnp.float32, name
    chex.assert_tree_all_finite(leaf)
  if name.endswith("loss") or name == "loss_from_sums":
    chex.assert_shape(out, ())
  elif name == "ssim_map":
    chex.assert_shape(out, (2, 2, 2, 3))
  elif name == "ssim_sums":
    chex.assert_shape([out.weighted_sum, out.mass], (2,))
  else:
    chex.assert_shape(out, (2,))


@pytest.mark.parametrize("name", [n for n in FUNCTIONS
                                  if n.endswith("loss")])
def test_losses_are_differentiable_scalars(name):
  # Correlated pair: for independent noise MS-SSIM's relu(cs) is 0 (flat).
  y = jnp.clip(X + 0.1 * (Y - 0.5), 0.0, 1.0)
  g = jax.jit(jax.grad(lambda a: _call(name, a, y)))(X)
  chex.assert_shape(g, X.shape)
  chex.assert_tree_all_finite(g)
  assert float(jnp.abs(g).sum()) > 0


def test_flow_submodule_importable():
  from ssim_jax import flow  # pylint: disable=g-import-not-at-top
  assert ssim_jax.flow is flow
