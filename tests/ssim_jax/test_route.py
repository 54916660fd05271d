"""The route choice (`ssim_jax/route.py`): fused analytic derivative or plain autodiff,
planes per chunk and depth slabs. Decisions only (no timing); the routes' values and
gradients are pinned in test_fused.py and test_ssim3d.py."""

import jax

from ssim_jax import route


def test_choose_chunk():
  big = (4, 256, 256, 3)
  per = route.choose_chunk(big, kernel_size=11, padding="valid",
                           backend="cpu")
  assert 1 <= per <= big[0] * big[3]
  assert per * 256 * 256 <= route._CHUNK_ELEMENTS
  # Planes larger than a chunk: one plane per chunk.
  assert route.choose_chunk((1, 1080, 1920, 3), kernel_size=11,
                            padding="same", backend="cpu") == 1
  # Small maps, and backends without a measurement: plain autodiff.
  assert route.choose_chunk((64, 64, 64, 3), kernel_size=11,
                            padding="valid", backend="cpu") == 0
  # The rule is on the map's sides (> 96 pixels), so on the padding too.
  assert route.choose_chunk((1, 106, 400, 1), kernel_size=11,
                            padding="valid", backend="cpu") == 0
  assert route.choose_chunk((1, 106, 400, 1), kernel_size=11,
                            padding="same", backend="cpu") > 0
  assert route.choose_chunk((32, 128, 128, 3), kernel_size=11,
                            padding="valid", backend="cpu") > 0
  assert route.choose_chunk(big, kernel_size=11, padding="valid",
                            backend="gpu") == 0


def test_choose_route():
  # Runs on the test machine's backend (CPU in CI), as the SSIM functions do.
  big = (4, 256, 256, 3)
  chunk, slab = route.choose_route(big, kernel_size=11, padding="valid",
                                   filter_method="auto")
  assert chunk == route.choose_chunk(big, kernel_size=11, padding="valid")
  assert slab == 0  # images are never cut into slabs
  # A named lowering asks for plain autodiff, whatever the size.
  for method in ("matmul", "conv", "slices"):
    assert route.choose_route(big, kernel_size=11, padding="valid",
                              filter_method=method) == (0, 0)
  assert route.choose_route((64, 64, 64, 3), kernel_size=11, padding="valid",
                            filter_method="auto") == (0, 0)
  # A CT-sized volume: the fused route, in depth slabs.
  ct = (1, 300, 512, 512, 1)
  chunk, slab = route.choose_route(ct, kernel_size=(5, 17, 17), padding="valid",
                                   filter_method="auto")
  if jax.default_backend() == "cpu":
    assert chunk >= 1
    assert slab == route.choose_slab(ct, kernel_size=(5, 17, 17)) > 0


def test_choose_slab_and_chunk_for_volumes():
  ct = (1, 300, 512, 512, 1)
  per = route.choose_slab(ct, kernel_size=(11, 11, 11))
  assert 20 <= per < 300
  assert (per + 10) * 512 * 512 <= 2 * route._SLAB_ELEMENTS
  # A CT volume takes the fused (slabbed) route whatever its H and W.
  assert route.choose_chunk(ct, kernel_size=11, padding="valid",
                            backend="cpu") == 1
  assert route.choose_slab((1, 64, 128, 128, 1), kernel_size=11) == 0
  assert route.choose_slab((4, 512, 512, 3), kernel_size=11) == 0
