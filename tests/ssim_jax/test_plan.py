"""The plan of one call (`ssim_jax/plan.py`): every check and decision made up front."""

import importlib

import jax
import jax.numpy as jnp
import pytest

from ssim_jax import plan as plan_lib
from ssim_jax import route

ms_lib = importlib.import_module("ssim_jax.ms_ssim")

OPTIONS = dict(data_range=1.0, window_size=None, sigma=1.5, k1=0.01, k2=0.03,
               padding="valid", mask=None, mask_mode="weighted", filter_method="auto",
               spatial_dims=2, spacing=None, channel_axis=-1, fn="ssim")


def _plan(shape, **kw):
  x = jnp.zeros(shape, jnp.bfloat16)
  return plan_lib.make_plan(x, x, **{**OPTIONS, **kw})


def test_window_constants_and_map_shape():
  p = _plan((2, 32, 40, 3), data_range=jnp.array([1.0, 255.0]))
  assert p.x.dtype == jnp.float32 and p.batched
  assert [k.shape[0] for k in p.kernel] == [11, 11] and p.map_shape == (2, 22, 30, 3)
  assert jnp.allclose(p.c1, jnp.array([1e-4, (0.01 * 255) ** 2]))
  assert jnp.allclose(p.c2, jnp.array([9e-4, (0.03 * 255) ** 2]))
  assert _plan((2, 32, 40, 3), padding="same").map_shape == (2, 32, 40, 3)
  # Small images shrink the window; MS-SSIM's plan keeps it.
  small = _plan((7, 9, 1))
  assert not small.batched and [k.shape[0] for k in small.kernel] == [7, 7]
  assert small.map_shape == (1, 1, 3, 1)
  kept = _plan((1, 9, 9, 1), shrink_window=False)
  assert [k.shape[0] for k in kept.kernel] == [11, 11] and kept.route == (0, 0)


def test_mask_mode_lowering_and_route():
  mask = jnp.ones((4, 256, 256, 1))
  auto = _plan((4, 256, 256, 3))
  assert auto.lowering == ("matmul" if jax.default_backend() == "cpu" else "conv")
  assert auto.route == route.choose_route((4, 256, 256, 3), kernel_size=(11, 11),
                                          padding="valid", filter_method="auto")
  if jax.default_backend() == "cpu":
    assert auto.route.fused
  named = _plan((4, 256, 256, 3), filter_method="conv")
  assert named.lowering == "conv" and named.route == (0, 0)
  fg = _plan((4, 256, 256, 3), mask=mask, mask_mode="foreground")
  assert fg.foreground and fg.route == (0, 0)  # no fused rule for foreground statistics
  weighted = _plan((4, 256, 256, 3), mask=mask)
  assert not weighted.foreground and weighted.route == auto.route
  assert not _plan((4, 64, 64, 3)).route.fused  # small maps keep autodiff


@pytest.mark.parametrize("bad,match", [
    (dict(padding="full"), "padding"), (dict(mask_mode="inside"), "mask_mode"),
    (dict(filter_method="fft"), "filter_method"), (dict(k1=0.0), "k1"),
    (dict(window_size=4), "window_size"), (dict(data_range=-1.0), "data_range"),
])
def test_every_check_is_in_the_plan(bad, match):
  with pytest.raises((ValueError, TypeError), match=match):
    _plan((2, 32, 32, 3), **bad)


def test_layout_is_decided_once_at_the_boundary():
  # channels-first in, channels-last plan; the caller's axis kept for ssim_map.
  x = jnp.zeros((2, 3, 32, 40), jnp.float32)
  p = plan_lib.make_plan(x, x, **{**OPTIONS, "channel_axis": 1})
  assert p.x.shape == (2, 32, 40, 3) and p.channel_axis == 1
  assert p.map_shape == (2, 22, 30, 3)
  # Probably channels-first, read as channels-last: refused by the plan.
  with pytest.raises(ValueError, match="channel_axis=1"):
    plan_lib.make_plan(x, x, **OPTIONS)
  # A traced static option: refused by the plan, naming static_argnames.
  with pytest.raises(TypeError, match="static_argnames"):
    jax.jit(lambda k: plan_lib.make_plan(
        x, x, **{**OPTIONS, "channel_axis": 1, "k1": k}))(0.01)


@pytest.mark.parametrize("shape", [(1, 517, 300, 1), (2, 200, 161, 3)])
def test_ms_ssim_routes_are_decided_for_the_shapes_pooling_makes(shape):
  p = _plan(shape, shrink_window=False)
  routes = ms_lib._level_routes(p, 5)
  a = jax.ShapeDtypeStruct(shape, jnp.float32)
  for level in range(5):
    want = route.choose_route(a.shape, kernel_size=(11, 11), padding="valid",
                              filter_method="auto")
    assert routes[level] == want, (level, a.shape)
    axes = ms_lib.pyramid_axes(a.shape[1:-1], (11, 11))
    a = jax.eval_shape(lambda v, axes=axes: ms_lib._pool(v, axes), a)
  if jax.default_backend() == "cpu":
    assert routes[0].fused and not routes[-1].fused
