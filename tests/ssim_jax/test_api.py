"""API conventions, checked by reflection over ssim_jax.__all__."""

import functools
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
         "ms_ssim_loss": dict(levels=2, window_size=3),
         "ms_ssim_sums": dict(levels=2, window_size=3)}
# Options that are arrays, traceable under jit; every other option is static.
TRACEABLE = {"data_range", "mask"}
# A valid value of every static option that a jit can trace (a number or
# numbers; strings cannot be traced), for the 12x12x3 images below.
STATIC_SAMPLES = {"window_size": 3, "sigma": 1.0, "k1": 0.01, "k2": 0.03,
                  "spatial_dims": 2, "spacing": (1.0, 1.0),
                  "channel_axis": -1, "levels": 2, "weights": (0.5, 0.5),
                  "ssim_weight": 0.2}
STRING_OPTIONS = {"padding", "mask_mode", "filter_method"}
DEPRECATED = {"weight_map"}
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
               "ms_ssim_loss", "ms_ssim_sums", "l1_ssim_loss", "psnr",
               "SSIMSums"):
    assert name in ssim_jax.__all__
  assert isinstance(ssim_jax.__version__, str)
  assert len(FUNCTIONS) >= 10


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
  elif name in ("ssim_sums", "ms_ssim_sums"):
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


IMAGE_FUNCTIONS = [n for n in FUNCTIONS if n != "loss_from_sums"]


def _options(name):
  return list(inspect.signature(getattr(ssim_jax, name)).parameters)[2:]


@pytest.mark.parametrize("name", IMAGE_FUNCTIONS)
def test_every_image_function_takes_channel_axis_and_mask(name):
  options = _options(name)
  assert "channel_axis" in options and "mask" in options, name
  # Every option is classified: traceable, static (with a sample), a string.
  unknown = set(options) - TRACEABLE - set(STATIC_SAMPLES) - STRING_OPTIONS
  assert not unknown - DEPRECATED, (name, unknown)


@pytest.mark.parametrize("name", IMAGE_FUNCTIONS)
def test_channel_axis_reads_channels_first_like_channels_last(name):
  # [B, C, H, W] with channel_axis=1 (and the mask laid out like it) gives
  # the channels-last result; ssim_map comes back in the caller's layout.
  rng = np.random.default_rng(2)
  mask = jnp.asarray(rng.uniform(0, 1, (2, 12, 12, 1)), jnp.float32)
  y = jnp.clip(X + 0.1 * (Y - 0.5), 0.0, 1.0)
  fn = getattr(ssim_jax, name)
  last = fn(X, y, mask=mask, **EXTRA.get(name, {}))
  first = fn(jnp.moveaxis(X, -1, 1), jnp.moveaxis(y, -1, 1),
             mask=jnp.moveaxis(mask, -1, 1), channel_axis=1,
             **EXTRA.get(name, {}))
  if name == "ssim_map":
    first = jnp.moveaxis(first, 1, -1)
  chex.assert_trees_all_close(first, last, rtol=1e-6, atol=1e-6)
  # Unbatched [C, H, W] with channel_axis=0 (and its negative spelling).
  one = fn(jnp.moveaxis(X[0], -1, 0), jnp.moveaxis(y[0], -1, 0),
           mask=jnp.moveaxis(mask[0], -1, 0), channel_axis=-3,
           **EXTRA.get(name, {}))
  if name == "ssim_map":
    one = jnp.moveaxis(one, 0, -1)
  chex.assert_trees_all_close(
      one, fn(X[0], y[0], mask=mask[0], **EXTRA.get(name, {})), rtol=1e-6,
      atol=1e-6)


@pytest.mark.parametrize("name", IMAGE_FUNCTIONS)
def test_traced_static_options_name_static_argnames(name):
  fn = getattr(ssim_jax, name)
  for option in _options(name):
    if option not in STATIC_SAMPLES:
      continue
    value = STATIC_SAMPLES[option]
    kwargs = {k: v for k, v in EXTRA.get(name, {}).items() if k != option}
    traced = jax.jit(lambda a, b, v, option=option, kwargs=kwargs: fn(
        a, b, **{option: v}, **kwargs))
    with pytest.raises(TypeError, match=(
        rf"{option} is a static option.*static_argnames=\('{option}',\)")):
      traced(X, Y, value)
    # The fix the message shows works, and gives the eager result.
    fixed = jax.jit(functools.partial(fn, **kwargs),
                    static_argnames=(option,))
    chex.assert_trees_all_close(fixed(X, Y, **{option: value}),
                                fn(X, Y, **{option: value}, **kwargs),
                                rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", IMAGE_FUNCTIONS)
def test_data_range_and_mask_are_traceable(name):
  fn = functools.partial(getattr(ssim_jax, name), **EXTRA.get(name, {}))
  mask = jnp.ones((2, 12, 12, 1))
  dr = jnp.asarray([1.0, 2.0])
  out = jax.jit(lambda a, b, d, m: fn(a, b, data_range=d, mask=m))(X, Y, dr,
                                                                  mask)
  chex.assert_trees_all_close(out, fn(X, Y, data_range=dr, mask=mask),
                              rtol=1e-6)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_docstrings_say_which_options_are_static(name):
  doc = inspect.getdoc(getattr(ssim_jax, name))
  if name == "loss_from_sums":
    return  # no options but axis_name, which names a mapped axis
  assert "static" in doc and "static_argnames" in doc, name


@pytest.mark.parametrize("name", IMAGE_FUNCTIONS)
def test_no_device_to_host_copy_outside_jit(name):
  # Eager calls with device arrays (images, mask, per-image data_range)
  # never copy device data to the host.
  fn = functools.partial(getattr(ssim_jax, name), **EXTRA.get(name, {}))
  mask = jnp.ones((2, 12, 12, 1))
  dr = jnp.asarray([1.0, 2.0])
  with jax.transfer_guard_device_to_host("disallow"):
    out = fn(X, Y, data_range=dr, mask=mask)
    jax.block_until_ready(out)


def test_flow_submodule_importable():
  from ssim_jax import flow  # pylint: disable=g-import-not-at-top
  assert ssim_jax.flow is flow
