"""The mesh and the fsdp layout: the rule, its errors, and per-device bytes shrinking by N."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from train import sharding
from train import step as step_lib
from train.models import dit as dit_lib


def test_mesh_shape_from_fsdp():
  for fsdp in (1, 2, 4, 8):
    mesh = sharding.make_mesh(fsdp=fsdp)
    assert dict(mesh.shape) == {"data": 8 // fsdp, "fsdp": fsdp}
  assert dict(sharding.make_mesh(fsdp=1, devices=jax.devices()[:1]).shape) == {
      "data": 1, "fsdp": 1}
  for bad in (0, 3, 16, 2.0, True):
    with pytest.raises(ValueError, match="mesh.fsdp"):
      sharding.make_mesh(fsdp=bad)


def test_state_spec_rule():
  spec = lambda shape, n=4, m=0: sharding.state_spec(shape, n, min_shard_size=m)
  assert spec((16, 64)) == P(None, "fsdp")  # the largest divisible axis
  assert spec((64, 16)) == P("fsdp")
  assert spec((6, 12)) == P(None, "fsdp")  # 12 is divisible, 6 is not
  assert spec((64, 64)) == P("fsdp")  # equal sizes: the first
  assert spec((6, 10)) == P()  # nothing divisible: replicated
  assert spec(()) == P()  # scalars (step counters, Adam's count)
  assert spec((16, 64), m=16 * 64 + 1) == P()  # below the size threshold
  assert spec((16, 64), n=1) == P()  # no fsdp axis to split over


def test_stacked_layers_are_split_within_a_layer_not_over_depth():
  spec = lambda tree, n=4: sharding.state_specs(tree, sharding.make_mesh(fsdp=n),
                                                min_shard_size=0)
  x = jax.ShapeDtypeStruct((8, 4, 6), jnp.float32)  # depth 8 would be the largest axis
  got = spec({"blocks": {"k": x}, "other": x, "opt": [{"mu": {"blocks": {"k": x}}}]})
  assert got["blocks"]["k"] == P(None, "fsdp")  # within the layer's (4, 6): 4 divides
  assert got["opt"][0]["mu"]["blocks"]["k"] == P(None, "fsdp")  # Adam's moments alike
  assert got["other"] == P("fsdp")  # not stacked: the largest axis
  assert spec({"blocks": {"k": jax.ShapeDtypeStruct((8, 3), jnp.float32)}})["blocks"]["k"] == P()


def _dit_params(hidden=128, depth=2):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: dit_lib.DiT(
      latent_channels=4, patch_size=2, hidden_size=hidden, depth=depth, num_heads=4,
      mlp_ratio=4, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param).to_pure_dict()
  return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)


def test_per_device_bytes_of_the_train_state_shrink_by_n():
  """Measured from the placed arrays' shards: params and Adam state / N (to within
  the replicated biases), and each array's bytes are exactly its shard's."""
  params = _dit_params()
  tx = optax.adamw(1e-3)
  state0 = step_lib.init_state(params, tx)
  full_params = sharding.per_device_bytes(step_lib.replicate(state0.params,
                                                             sharding.make_mesh(fsdp=1)))
  assert full_params == sum(x.nbytes for x in jax.tree.leaves(params))
  got = {}
  for n in (1, 2, 4, 8):
    mesh = sharding.make_mesh(fsdp=n)
    state = step_lib.place_state(state0, mesh)
    got[n] = (sharding.per_device_bytes(state.params),
              sharding.per_device_bytes(state.opt_state))
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
      shard_bytes = {s.data.nbytes for s in x.addressable_shards}
      assert len(shard_bytes) == 1  # the same on every device
      spec = sharding.leaf_spec(path, x.shape, n)
      assert x.sharding.spec == spec
      assert shard_bytes.pop() == (x.nbytes // n if "fsdp" in spec else x.nbytes)
      if sharding.is_stacked(path):  # the DiT's [depth, ...] blocks: never split by depth
        assert x.shape[0] == 2 and (not spec or spec[0] is None)
    # The abstract path (ShapeDtypeStruct + sharding) measures the same.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state)
    assert sharding.per_device_bytes(abstract.params) == got[n][0]
  assert got[1][0] == full_params
  for n in (2, 4, 8):
    for i in (0, 1):
      ratio = got[1][i] / got[n][i]
      assert 0.9 * n < ratio <= n, (n, i, ratio)


def test_put_reshards_device_arrays():
  mesh = sharding.make_mesh(fsdp=4)
  x = jnp.arange(64.0).reshape(8, 8)
  sharded = sharding.put({"x": x}, sharding.state_shardings({"x": x}, mesh, min_shard_size=0))
  assert sharded["x"].sharding.spec == P("fsdp")
  back = sharding.put(sharded, sharding.replicated(mesh))
  assert back["x"].sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(back["x"]), np.asarray(x))
